"""ShieldGemma scoring: P(violation) from the `Yes`/`No` logits at the last position, for many policies at once.

Eq. 1 of the ShieldGemma paper: P = (exp(LL(Yes)/T) + α) / (exp(LL(Yes)/T) + exp(LL(No)/T) + 2α), LL being the
token's log-likelihood. With α = 0 the vocabulary normaliser cancels, so two rows of the unembedding suffice;
α > 0 adds to absolute probabilities and therefore needs the full-vocabulary log-softmax.

Speed: every policy's prompt starts with the same preamble and the same user text, and only the guideline and
what follows it differ. Each text's prompts are tokenised whole, their longest common token prefix is prefilled
once (batched over texts, left-padded), the KV cache is copied per policy, and only each policy's tail runs
(right-padded: causal attention never lets a real token see the padding after it). Batches are cut so that one
long text does not left-pad shorter ones by more than MAX_PADDING tokens.

What is left is arithmetic: profiled on the 270M in fp32 (1 thread, short texts), ~78% of the time is the linear
layers, ~9% attention, ~10% GeGLU's elementwise ops. The policy tails are ~87% of the tokens and cannot be shared
(each attends to its own text). Running the ~28-token preamble common to all texts once per batch and copying its
K/V into every row was tried: 4.8% fewer tokens, but no measurable gain (its batch-of-one forward is slow per
token), so it was left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gemmakit.cache import KVCache
from gemmakit.decoding.engine import left_pad
from gemmakit.errors import InputError, TokenizerError
from gemmakit.model import Transformer
from gemmakit.safety.policies import Policy, get_policies
from gemmakit.safety.prompts import render, split_point

Item = str | tuple[str, str | None]
MAX_PADDING = 256  # left-padding tokens a batch of prefixes may carry (~2/3 of one text's four policy tails)


class TokenizerLike(Protocol):
    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]: ...
    def token_id(self, piece: str) -> int | None: ...


def violation_probability(yes: torch.Tensor, no: torch.Tensor, temperature: float = 1.0,
                          alpha: float = 0.0) -> torch.Tensor:
    """Eq. 1 elementwise. With alpha > 0, `yes`/`no` must be full-vocabulary log-probabilities; with alpha = 0
    raw logits give the same result (the normaliser cancels). Computed in float64."""
    a, b = yes.double() / temperature, no.double() / temperature
    if alpha == 0:
        return torch.sigmoid(a - b)
    ea, eb = a.exp(), b.exp()
    return (ea + alpha) / (ea + eb + 2 * alpha)


@dataclass(frozen=True)
class PolicyResult:
    """One policy's verdict on one text."""

    policy: str
    score: float
    threshold: float

    @property
    def violated(self) -> bool:
        return self.score >= self.threshold


@dataclass(frozen=True)
class Classification:
    """All policies' verdicts on one text; the text's overall score is the maximum (the paper's aggregation)."""

    results: tuple[PolicyResult, ...]

    @property
    def scores(self) -> dict[str, float]:
        return {r.policy: r.score for r in self.results}

    @property
    def top(self) -> PolicyResult:
        """The policy with the highest score (the first of equal ones)."""
        return max(self.results, key=lambda r: r.score)

    @property
    def score(self) -> float:
        return self.top.score

    @property
    def flagged(self) -> list[PolicyResult]:
        return [r for r in self.results if r.violated]

    @property
    def violated(self) -> bool:
        return any(r.violated for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "max": self.score, "flagged": [r.policy for r in self.flagged],
                "thresholds": {r.policy: r.threshold for r in self.results}}


class ShieldClassifier:
    """Score texts against ShieldGemma policies with a Gemma model (ShieldGemma itself, or any Gemma).

    `model` is a loaded `Gemma` (tokenizer included) or a bare `Transformer` with `tokenizer=`. `threshold` is one
    number or a dict policy name -> number (missing names get 0.5). `batch_size` counts texts per forward.
    """

    def __init__(self, model: Any, policies: Sequence[str | Policy] | str | Policy | None = None,
                 threshold: float | dict[str, float] = 0.5, temperature: float = 1.0, alpha: float = 0.0,
                 tokenizer: TokenizerLike | None = None, batch_size: int = 8, variant: str = "chat_template",
                 yes: str = "Yes", no: str = "No") -> None:
        self.module: Transformer = model if isinstance(model, Transformer) else model.module
        self.tokenizer: TokenizerLike = tokenizer if tokenizer is not None else model.tokenizer
        self.policies = get_policies(policies)
        if temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        if alpha < 0:
            raise InputError(f"alpha must be >= 0, got {alpha}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.temperature, self.alpha, self.batch_size, self.variant = temperature, alpha, batch_size, variant
        self.thresholds = self._thresholds(threshold)
        self.label_ids = [self._token(yes), self._token(no)]

    def _thresholds(self, threshold: float | dict[str, float]) -> dict[str, float]:
        names = [p.name for p in self.policies]
        if isinstance(threshold, dict):
            unknown = sorted(set(threshold) - set(names))
            if unknown:
                raise InputError(f"threshold: policies {unknown} are not among the classifier's {names}")
            values = {name: float(threshold.get(name, 0.5)) for name in names}
        else:
            values = dict.fromkeys(names, float(threshold))
        for name, value in values.items():
            if not 0 <= value <= 1:
                raise InputError(f"threshold for {name!r} must be in [0, 1], got {value}")
        return values

    def _token(self, piece: str) -> int:
        """The id of a label token in this model's own vocabulary (Gemma 2 and 3 vocabularies differ)."""
        token = self.tokenizer.token_id(piece)
        if token is None:
            raise TokenizerError(f"label token {piece!r} is not in the model's vocabulary; ShieldGemma scoring "
                                 "needs single-token labels")
        return token

    # --- prompts ------------------------------------------------------------------------------------------------
    def prompt_ids(self, policy: Policy, prompt: str, response: str | None = None) -> list[int]:
        """Token ids of the whole ShieldGemma prompt, `<bos>` first, tokenised in one piece."""
        return self.tokenizer.encode(render(policy, prompt, response, bos=False, variant=self.variant),
                                     add_bos=True)

    # --- scoring ------------------------------------------------------------------------------------------------
    def score(self, prompt: str, response: str | None = None) -> dict[str, float]:
        """P(violation) per policy for one prompt (or one prompt + response)."""
        return self.score_batch([(prompt, response)])[0]

    def classify(self, prompt: str, response: str | None = None) -> Classification:
        return self.classify_batch([(prompt, response)])[0]

    def classify_batch(self, items: Sequence[Item]) -> list[Classification]:
        return [self.verdict(scores) for scores in self.score_batch(items)]

    def verdict(self, scores: dict[str, float]) -> Classification:
        return Classification(tuple(PolicyResult(name, s, self.thresholds[name]) for name, s in scores.items()))

    def score_batch(self, items: Sequence[Item]) -> list[dict[str, float]]:
        """Scores for many texts; an item is a prompt or a (prompt, response) pair. Prefix-cached and batched."""
        pairs = [_pair(item) for item in items]
        encoded = [[self.prompt_ids(p, prompt, response) for p in self.policies] for prompt, response in pairs]
        splits = [split_point(e) for e in encoded]
        order = sorted(range(len(pairs)), key=lambda i: (splits[i], max(map(len, encoded[i]))))
        out = torch.empty(len(pairs), len(self.policies), dtype=torch.float64)
        with torch.inference_mode():
            for chunk in self._chunks(order, splits):
                out[chunk] = self._score_chunk([encoded[i] for i in chunk], [splits[i] for i in chunk])
        names = [p.name for p in self.policies]
        return [dict(zip(names, row.tolist(), strict=True)) for row in out]

    def _chunks(self, order: list[int], splits: list[int]) -> list[list[int]]:
        """Consecutive texts (sorted by prefix length) in chunks of at most `batch_size`, closed early when the
        next text would left-pad the chunk by more than MAX_PADDING tokens: one 1,200-token text among 60-token
        ones would otherwise run ~7 rows of padding through every layer (7.5% of all tokens of the
        bench's 200-text mix) and make their policy tails attend over it."""
        chunks: list[list[int]] = [[]]
        for i in order:
            chunk = chunks[-1]
            padding = len(chunk) * splits[i] - sum(splits[j] for j in chunk)
            if chunk and (len(chunk) == self.batch_size or padding > MAX_PADDING):
                chunks.append(chunk := [])
            chunk.append(i)
        return chunks if chunks[0] else []

    def _score_chunk(self, encoded: list[list[list[int]]], splits: list[int]) -> torch.Tensor:
        module, device = self.module, self.module.device
        prefix_ids, pad = left_pad([ids[:n] for ids, n in zip((e[0] for e in encoded), splits, strict=True)],
                                   module.config.pad_id)
        tails = [[e[p][n:] for e, n in zip(encoded, splits, strict=True)] for p in range(len(self.policies))]
        capacity = prefix_ids.shape[1] + max(len(t) for per_policy in tails for t in per_policy)
        if capacity > module.config.max_position:
            raise InputError(f"a ShieldGemma prompt of {capacity} tokens exceeds the model's context of "
                             f"{module.config.max_position}; shorten the text")
        cache = KVCache(module.config, len(encoded), capacity, module.dtype, device)
        cache.pad.copy_(pad)
        module.hidden_states(prefix_ids.to(device), cache)
        columns = []
        for p, per_policy in enumerate(tails):
            branch = cache if p == len(tails) - 1 else cache.clone()
            tail_ids, last = _right_pad(per_policy, module.config.pad_id)
            h = module.hidden_states(tail_ids.to(device), branch)
            columns.append(self._probabilities(h[torch.arange(len(per_policy)), last.to(device)]))
        return torch.stack(columns, dim=1)

    def _probabilities(self, h_last: torch.Tensor) -> torch.Tensor:
        """Eq. 1 from last-position residuals [B, d]: two unembedding rows, or the full vocabulary when alpha > 0."""
        rows = torch.tensor(self.label_ids, device=h_last.device)
        if self.alpha == 0:
            logits = self.module.unembed(h_last[:, None], rows=rows)[:, 0].float()
            return violation_probability(logits[:, 0], logits[:, 1], self.temperature).cpu()
        logprobs = torch.log_softmax(self.module.unembed(h_last[:, None])[:, 0].float(), dim=-1)[:, rows]
        return violation_probability(logprobs[:, 0], logprobs[:, 1], self.temperature, self.alpha).cpu()

    def score_uncached(self, prompt: str, response: str | None = None) -> dict[str, float]:
        """The slow reference path: one separate forward per policy over the whole prompt (for tests)."""
        scores = {}
        with torch.inference_mode():
            for policy in self.policies:
                ids = torch.tensor([self.prompt_ids(policy, prompt, response)], device=self.module.device)
                h = self.module.hidden_states(ids)[:, -1]
                scores[policy.name] = float(self._probabilities(h)[0])
        return scores


def aggregate(scores: dict[str, float]) -> float:
    """The multi-harm score of the ShieldGemma paper: the maximum over the per-policy probabilities."""
    return max(scores.values()) if scores else math.nan


def _pair(item: Item) -> tuple[str, str | None]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    raise InputError(f"items must be prompts (str) or (prompt, response) pairs, got {type(item).__name__}")


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] left-aligned, and each row's last real index [B]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
