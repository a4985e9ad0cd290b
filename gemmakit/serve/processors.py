"""Per-request logits processing for OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty`.

The scheduler calls the processor with the request's own generated ids and its fp32 logits [vocab] for the next
token. Penalties follow OpenAI's definition: logit[t] -= count(t) * frequency_penalty + (count(t) > 0) *
presence_penalty, counting only generated tokens (not the prompt).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

Processor = Callable[[list[int], torch.Tensor], torch.Tensor]


def make_processor(logit_bias: dict[int, float], presence: float, frequency: float) -> Processor | None:
    """None when nothing is asked for, so the scheduler keeps its fast path."""
    if not logit_bias and presence == 0 and frequency == 0:
        return None
    bias_ids = torch.tensor(list(logit_bias), dtype=torch.long)
    bias_values = torch.tensor(list(logit_bias.values()), dtype=torch.float32)

    def process(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(bias_ids):
            logits[bias_ids.to(logits.device)] += bias_values.to(logits.device, logits.dtype)
        if generated and (presence or frequency):
            counts = Counter(generated)
            ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
            n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= n * frequency + presence
        return logits

    return process
