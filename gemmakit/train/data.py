"""Training data: JSONL rows to (token ids, loss mask) with the model's own chat template, and a resumable order.

Three row shapes are read: `{"messages": [...]}` (loss on every assistant turn), `{"prompt", "completion"}`
(rendered as one user turn and one model turn; loss on the completion) and `{"text"}` (plain language
modelling; loss on every token). The mask marks the tokens the model must *produce*: an answer's text and its
`<end_of_turn>`, so the model learns to stop, but never the template's `<start_of_turn>model\\n` scaffolding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmakit.errors import InputError
from gemmakit.jsonl import iter_jsonl

ASSISTANT_ROLES = ("assistant", "model")


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where ids[i] is a target token (the model is trained to produce it)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the teacher's top-k for offline distillation


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = [row for _, row in iter_jsonl(path, "JSONL with 'messages', 'prompt'/'completion' or 'text' per line")]
    if not rows:
        raise InputError(f"{path}: no examples")
    return rows


def encode_chat(messages: Sequence[Mapping[str, Any]], tokenizer: Any) -> Example:
    """Render the conversation with the chat template; mask each assistant turn's tokens up to `<end_of_turn>`.

    Each turn's start is the length of the rendered prompt before it (ending in `<start_of_turn>model\\n`), so
    the mask agrees with what the model sees at generation time.
    """
    from gemmakit.chat import render_chat

    full = render_chat(messages, tokenizer, add_generation_prompt=False)
    mask = [0] * len(full)
    eot = tokenizer.token_id("<end_of_turn>")
    for k, m in enumerate(messages):
        if m.get("role") not in ASSISTANT_ROLES:
            continue
        prompt = render_chat(messages[:k], tokenizer, add_generation_prompt=True)
        start = len(prompt)
        while start > 0 and full[:start] != prompt[:start]:  # text merged across the boundary: back off
            start -= 1
        end = start
        while end < len(full) and full[end] != eot:
            end += 1
        for i in range(start, min(end + 1, len(full))):
            mask[i] = 1
    return Example(full, mask)


def encode_row(row: Mapping[str, Any], tokenizer: Any, where: str = "row") -> Example:
    if "messages" in row:
        messages = row["messages"]
        if not any(isinstance(m, Mapping) and m.get("role") in ASSISTANT_ROLES for m in messages or []):
            raise InputError(f"{where}: 'messages' has no assistant turn to learn from")
        return encode_chat(messages, tokenizer)
    if "prompt" in row and "completion" in row:
        return encode_chat([{"role": "user", "content": str(row["prompt"])},
                            {"role": "assistant", "content": str(row["completion"])}], tokenizer)
    if "text" in row:
        ids = tokenizer.encode(str(row["text"]), add_bos=True)
        return Example(ids, [0] + [1] * (len(ids) - 1))
    raise InputError(f"{where}: expected a 'messages' list, 'prompt' + 'completion', or 'text'; got keys "
                     f"{sorted(row)}")


def encode_rows(rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int,
                source: str = "data") -> list[Example]:
    """Encode and truncate (keeping the start, as TRL does); drop rows left with nothing to learn."""
    out = []
    for n, row in enumerate(rows, start=1):
        ex = encode_row(row, tokenizer, f"{source}:{n}")
        ex = Example(ex.ids[:max_length], ex.mask[:max_length])
        if sum(ex.mask[1:]):
            out.append(ex)
    if not out:
        raise InputError(f"{source}: no example has answer tokens within max_length={max_length}")
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and loss mask [B, T]; causal attention makes right padding harmless."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.mask)] = torch.tensor(e.mask, dtype=torch.bool)
    return ids, mask


class Batches:
    """Micro-batches in a seeded per-epoch shuffle; `position` (epoch, offset) is saved in checkpoints so a
    resumed run reads exactly the batches the interrupted one would have read next."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int) -> None:
        self.examples, self.batch_size, self.seed, self.pad_id = list(examples), batch_size, seed, pad_id
        self.epoch, self.offset = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self, rank: int = 0, world: int = 1) -> list[Example]:
        """The next global micro-batch of `batch_size` examples; under data parallelism rank r keeps every
        world-th one, so any number of processes reads the same global batch."""
        order = self._order()
        if self.offset >= len(order):
            self.epoch, self.offset = self.epoch + 1, 0
            order = self._order()
        chosen = order[self.offset: self.offset + self.batch_size]
        self.offset += self.batch_size
        return [self.examples[i] for i in chosen[rank::world]]

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def seek(self, position: Mapping[str, int]) -> None:
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])

    def all(self, rank: int = 0, world: int = 1) -> Iterator[list[Example]]:
        """Every example once, in file order (for evaluation)."""
        for start in range(0, len(self.examples), self.batch_size):
            yield self.examples[start: start + self.batch_size][rank::world]
