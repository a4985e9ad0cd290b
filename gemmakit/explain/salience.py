"""Sequence salience as LIT computes it: which prompt tokens did the model lean on to produce a target span?

The quantity explained is f = log p(span | everything before it), the span's summed token log-probability (the
negative of its summed cross-entropy, LIT's loss). Three methods:

- ``grad_l2``: ||df/dx_t|| for each input position t (one forward, one backward);
- ``grad_dot_input``: df/dx_t . x_t (same backward); positive means the token pushes towards the span;
- ``integrated_gradients``: (x_t - x'_t) . mean over the straight path x' -> x of df/dx_t, with the baseline x'
  the `<pad>` token's embedding at every position but `<bos>` (kept as is: Gemma's <bos> is a fixed context, not
  text), a composite Gauss-Legendre rule (64 nodes as 8 sub-intervals of 8; a sub-interval whose own
  completeness is off is split, see `integrated_gradients`), and the completeness error
  |sum(attr) - (f(x) - f(x'))| / |f(x) - f(x')| reported with the result.

Why not the zero baseline: every Gemma layer reads its input through an RMSNorm, which is scale-invariant except
within ~sqrt(eps) of zero, so f along alpha * x jumps from f(0) to near its final value over alpha < 1e-3. No
quadrature sees that step (on the tiny test models the zero baseline's completeness error stays above 100% at 8
to 64 nodes), while from `<pad>`, a real embedding of ordinary norm, 64 nodes give errors below 0.1%.

Where the gradient is taken: x_t is the residual stream that layer 0 reads, i.e. the embedding row *after*
Gemma's sqrt(d) scaling (`Transformer.embed`). That is the value transformers' `inputs_embeds` holds for every
Gemma family and the output of the embedding layer that captum's layer attributions hook, so our numbers compare
one to one. Gradient . input and integrated gradients are the same at the raw row E[id] (the factor sqrt(d) moves
from x to the gradient); only the gradient's L2 norm differs, by exactly sqrt(d), a constant.

Quantised models (the default GGUF load) have integer weights and no gradients: the gradients are computed on a
float32 copy of the same checkpoint, reloaded from the model's `source` with ``dtype="float32"`` and kept for
later calls. The result's ``details["weights"]`` says which.

Integrated gradients are our own code rather than captum's ``IntegratedGradients``, which the tests use as the
reference (with one interval and no refinement ours is its "gausslegendre" rule, equal to 1e-5): ours walks the
path in chunks under a progress bar with the memory of one chunk, refines where completeness fails (captum has no
adaptive rule), and depends on nothing beyond torch. captum's ``LLMGradientAttribution`` expects a
transformers model and tokenizer (``generate``, HF tokenisation), which a gemmakit ``Transformer`` is not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gemmakit.errors import InputError
from gemmakit.model import Transformer

METHODS = ("grad_l2", "grad_dot_input", "integrated_gradients")
DEFAULT_STEPS = 64  # Gauss-Legendre nodes: completeness error < 0.1% on the tiny test models (32: up to 3.7%)
DEFAULT_INTERVALS = 8  # ... as 8 sub-intervals of 8 nodes, any of which is split while completeness is off


# --- the model, as a float function of its input embeddings ---------------------------------------------------
def is_plain_float(module: Transformer) -> bool:
    """True when every weight is an ordinary float32 parameter (so autograd runs through the model as is)."""
    if not isinstance(module.model.embed_tokens, nn.Embedding):
        return False
    for block in module.model.layers:
        projections = (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                       block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
        if any(type(p) is not nn.Linear for p in projections):
            return False
    return all(p.dtype == torch.float32 for p in module.parameters())


def float_model(gemma: Any) -> tuple[Any, str]:
    """(a Gemma whose module is plain float32, a sentence saying which weights those are).

    A float32 model is used as it is. Anything else (int8/int4 layers, bf16) is reloaded from `gemma.source`
    with dtype="float32": the same checkpoint dequantised exactly as the float reference path does. The copy is
    kept on the Gemma object, so a page or a loop pays for it once.
    """
    if is_plain_float(gemma.module):
        return gemma, "the model's own float32 weights"
    cached = gemma.__dict__.get("_explain_float")
    if cached is not None:
        return cached
    source = getattr(gemma, "source", None)
    if source is None:
        raise InputError("gradients need float weights: this model is quantised (or not float32) and has no "
                         "`source` to reload a float32 copy from; load it with dtype='float32'")
    from gemmakit.api import load

    copy = load(source, dtype="float32")
    note = f"a float32 copy of the same checkpoint, reloaded from {source} (the loaded model is not plain float32)"
    gemma.__dict__["_explain_float"] = (copy, note)
    return copy, note


@contextmanager
def no_param_grads(*modules: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients inside the block (restored after): autograd then builds the graph
    only from the tensors we differentiate by, and never touches a parameter's `.grad`."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def span_logprob(module: Transformer, ids: torch.Tensor, span: tuple[int, int],
                 h0: torch.Tensor | None = None) -> torch.Tensor:
    """f = sum over positions j in [a, b) of log p(ids[j] | ids[:j]); [N] for N rows of input embeddings.

    `ids` is one row [L] (L >= b); only ids[:b-1] are fed. `h0` [N, b-1, d] replaces the scaled embeddings that
    layer 0 reads (a pre-hook on layer 0), so f can be differentiated by, or evaluated at, any input embeddings.
    Only the span's b - a positions are projected onto the vocabulary.
    """
    a, b = span
    if not 1 <= a < b <= ids.shape[0]:
        raise InputError(f"span [{a}, {b}) must lie within token positions 1..{ids.shape[0]} (0 is <bos>)")
    inputs = ids[: b - 1].to(module.device)
    n = 1 if h0 is None else h0.shape[0]
    handle = None
    if h0 is not None:
        handle = module.model.layers[0].register_forward_pre_hook(lambda _m, args: (h0, *args[1:]))
    try:
        h = module.hidden_states(inputs.expand(n, -1))
    finally:
        if handle is not None:
            handle.remove()
    logits = module.unembed(h[:, a - 1: b - 1]).float()
    targets = ids[a:b].to(logits.device).view(1, -1, 1).expand(n, -1, 1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1).sum(-1)


def input_embeddings(module: Transformer, ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """x = E[ids] * sqrt(d) [b-1, d], exactly what layer 0 reads in the model's own forward."""
    with torch.no_grad():
        return module.embed(ids[: span[1] - 1].to(module.device).view(1, -1))[0].float()


def gradient(module: Transformer, ids: torch.Tensor, span: tuple[int, int]
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x [b-1, d], df/dx [b-1, d], f): one forward and one backward."""
    x = input_embeddings(module, ids, span)
    leaf = x.clone().unsqueeze(0).requires_grad_()
    with no_param_grads(module), torch.enable_grad():
        f = span_logprob(module, ids, span, leaf)
        (g,) = torch.autograd.grad(f.sum(), leaf)
    return x, g[0], float(f.detach()[0])


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in (0, 1) and weights summing to 1 (captum's "gausslegendre" rule)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


def ig_baseline(module: Transformer, x: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The `<pad>` embedding (scaled like every input) at every position but 0 (<bos>), which keeps its own."""
    with torch.no_grad():
        pad = module.embed(torch.tensor([[pad_id]], device=module.device))[0, 0].float()
    base = pad.expand_as(x).clone()
    base[0] = x[0]
    return base


@dataclass
class _Piece:
    """One sub-interval [lo, hi] of the path: its per-position integral and its own completeness gap."""

    lo: float
    hi: float
    integral: torch.Tensor  # [T, d]: sum of w * df/dx over the interval's nodes
    gap: float = 0.0


def integrated_gradients(module: Transformer, ids: torch.Tensor, span: tuple[int, int], pad_id: int,
                         steps: int = DEFAULT_STEPS, batch: int = 8, progress: bool = False,
                         intervals: int = DEFAULT_INTERVALS, max_steps: int | None = None,
                         tolerance: float = 0.01) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-position attributions [b-1] and {f_input, f_baseline, attribution_sum, completeness_error, steps}.

    The path integral of df/dx along x' + alpha (x - x') is a composite Gauss-Legendre rule: `intervals` equal
    sub-intervals of steps / intervals nodes each, `batch` nodes per forward; attribution_t = (x_t - x'_t) .
    integral_t. Each sub-interval checks itself, since its share of the sum must equal f(hi) - f(lo); while the
    whole sum misses f(x) - f(x') by more than `tolerance` (relative) and fewer than `max_steps` nodes (default
    4 x steps) were spent, the worst sub-interval is split in two. The real 270M needs this: along the path some
    stretches of alpha change f by tens of nats in a few hundredths (see docs/explain.md). `intervals=1,
    max_steps=steps` is captum's "gausslegendre" rule exactly.
    """
    from tqdm import tqdm

    if steps < 1 or batch < 1 or not 1 <= intervals <= steps or steps % intervals:
        raise InputError(f"integrated gradients needs steps >= 1, batch >= 1 and 1 <= intervals <= steps with "
                         f"steps a multiple of intervals; got steps={steps}, batch={batch}, intervals={intervals}")
    per = steps // intervals
    budget = max(steps, 4 * steps if max_steps is None else max_steps)
    x = input_embeddings(module, ids, span)
    base = ig_baseline(module, x, pad_id)
    nodes, weights = gauss_legendre(per)
    f_at: dict[float, float] = {}
    bar = tqdm(total=steps, desc="integrated gradients", unit="step", disable=not progress)

    def values(alphas: list[float]) -> None:
        """f at path points not yet known (endpoints of sub-intervals), without gradients."""
        todo = sorted({a for a in alphas if a not in f_at})
        with torch.no_grad():
            for i in range(0, len(todo), batch):
                a = torch.tensor(todo[i:i + batch], dtype=x.dtype, device=x.device).view(-1, 1, 1)
                f_at.update(zip(todo[i:i + batch], span_logprob(module, ids, span, base + a * (x - base)).tolist(),
                                strict=True))

    def integrate(pieces: list[tuple[float, float]]) -> list[_Piece]:
        alphas = torch.tensor([lo + (hi - lo) * n for lo, hi in pieces for n in nodes], dtype=x.dtype)
        w = torch.tensor([(hi - lo) * v for lo, hi in pieces for v in weights], dtype=x.dtype)
        grads = []
        with no_param_grads(module), torch.enable_grad():
            for i in range(0, len(alphas), batch):
                a = alphas[i:i + batch].to(x.device).view(-1, 1, 1)
                leaf = (base + a * (x - base)).requires_grad_()
                (g,) = torch.autograd.grad(span_logprob(module, ids, span, leaf).sum(), leaf)
                grads.append(g * w[i:i + batch].to(x.device).view(-1, 1, 1))
                bar.update(a.shape[0])
        g = torch.cat(grads).view(len(pieces), per, *x.shape).sum(1)
        values([e for lo, hi in pieces for e in (lo, hi)])
        out = []
        for (lo, hi), integral in zip(pieces, g, strict=True):
            share = float(((x - base) * integral).sum())
            out.append(_Piece(lo, hi, integral, abs(share - (f_at[hi] - f_at[lo]))))
        return out

    pieces = integrate([(k / intervals, (k + 1) / intervals) for k in range(intervals)])
    used = steps
    delta = f_at[1.0] - f_at[0.0]

    def error() -> float:
        total = sum(((x - base) * p.integral).sum() for p in pieces)
        return abs(float(total) - delta) / max(abs(delta), 1e-12)

    while error() > tolerance and used + 2 * per <= budget:
        worst = max(range(len(pieces)), key=lambda k: pieces[k].gap)
        lo, hi = pieces[worst].lo, pieces[worst].hi
        bar.total += 2 * per
        pieces[worst: worst + 1] = integrate([(lo, (lo + hi) / 2), ((lo + hi) / 2, hi)])
        used += 2 * per
    bar.close()
    attr = ((x - base) * sum(p.integral for p in pieces)).sum(-1)
    return attr, {"f_input": f_at[1.0], "f_baseline": f_at[0.0], "attribution_sum": float(attr.sum()),
                  "completeness_error": error(), "steps_used": used, "intervals": len(pieces)}


# --- the problem: prompt, target, span --------------------------------------------------------------------------
@dataclass
class Problem:
    """ids = <bos> + prompt + target; the span is [a, b) within the target's tokens."""

    ids: list[int]
    prompt_len: int  # <bos> included
    span: tuple[int, int]

    @property
    def absolute_span(self) -> tuple[int, int]:
        return self.prompt_len + self.span[0], self.prompt_len + self.span[1]

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.prompt_len:]


def parse_span(span: str | Sequence[int] | None, n: int) -> tuple[int, int]:
    """"a:b" (Python slice rules: negatives count from the end, either side may be empty) or (a, b) -> [a, b)
    within n target tokens; None means the whole target."""
    if span is None:
        return 0, n
    if isinstance(span, str):
        parts = span.split(":")
        if len(parts) != 2:
            raise InputError(f"--span must look like 'a:b' (target token indices, Python slice), got {span!r}")
        try:
            a, b = (int(p) if p.strip() else None for p in parts)
        except ValueError as e:
            raise InputError(f"--span must look like 'a:b' with integers, got {span!r}") from e
    else:
        a, b = span
    start, stop, _ = slice(a, b).indices(n)
    if start >= stop:
        raise InputError(f"span {span!r} selects no token of the {n}-token target")
    return start, stop


def make_problem(gemma: Any, prompt: str | Sequence[int], target: str | Sequence[int] | None = None,
                 generate: int | None = None, span: str | Sequence[int] | None = None) -> Problem:
    """Tokenise (or generate greedily) the target; the prompt gets <bos>, the target none."""
    prompt_ids = gemma.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not prompt_ids or prompt_ids[0] != gemma.tokenizer.bos_id:
        prompt_ids = [gemma.tokenizer.bos_id, *prompt_ids]
    if (target is None) == (generate is None):
        raise InputError("give exactly one of a target (text or ids) and generate=N (the model's own continuation)")
    if target is not None:
        target_ids = gemma.tokenizer.encode(target, add_bos=False) if isinstance(target, str) else list(target)
    else:
        if generate < 1:
            raise InputError(f"generate must be >= 1 tokens, got {generate}")
        target_ids = gemma.generate_ids([prompt_ids], generate)[0]
    if not target_ids:
        raise InputError("the target is empty (the model stopped at once, or the text gives no token)")
    limit = gemma.config.max_position
    if len(prompt_ids) + len(target_ids) > limit:
        raise InputError(f"prompt + target are {len(prompt_ids) + len(target_ids)} tokens; the model's context is "
                         f"{limit}")
    return Problem([*prompt_ids, *target_ids], len(prompt_ids), parse_span(span, len(target_ids)))


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that "".join(pieces) == decode(ids). A token that ends inside a multi-byte
    character adds "" and the token that completes it carries the whole character."""
    if hasattr(tokenizer, "decode_stream"):
        stream = tokenizer.decode_stream()
        pieces = [stream.feed(int(i)) for i in ids]
        tail = stream.flush()
        if tail and pieces:
            pieces[-1] += tail
        return pieces
    pieces, before = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(list(ids[: k + 1]))
        if text.endswith("\ufffd") or not text.startswith(before):
            pieces.append("")
            continue
        pieces.append(text[len(before):])
        before = text
    return pieces


# --- the result ---------------------------------------------------------------------------------------------------
@dataclass
class Salience:
    """Scores over the text's tokens: the prompt's (<bos> left out) then the target's.

    Tokens from the span's last one on feed no prediction of the span and score 0. `details` holds what the
    method needs to be read: the gradient point, the weights used, and for integrated gradients the baseline,
    step count and completeness error.
    """

    tokens: list[str]
    ids: list[int]
    scores: list[float]
    prompt_tokens: int
    span: tuple[int, int]  # within the target's tokens
    method: str
    target_logprob: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def target_tokens(self) -> list[str]:
        return self.tokens[self.prompt_tokens:]

    def part(self, which: str = "prompt") -> tuple[list[str], list[float]]:
        """(pieces, scores) of the "prompt", the "target" or "all"."""
        cut = {"prompt": slice(0, self.prompt_tokens), "target": slice(self.prompt_tokens, None),
               "all": slice(None)}[which]
        return self.tokens[cut], self.scores[cut]

    def to_dict(self, granularity: str = "token", which: str = "prompt") -> dict[str, Any]:
        """{"tokens": [...], "scores": [...]} over the prompt's tokens (or segments), with the span and details."""
        from gemmakit.explain.segments import aggregate

        pieces, scores = self.part(which)
        if granularity != "token":
            segs = aggregate(pieces, scores, granularity)
            pieces, scores = [s.text for s in segs], [s.score for s in segs]
        return {"tokens": pieces, "scores": scores, "method": self.method, "granularity": granularity,
                "span": list(self.span), "span_text": "".join(self.target_tokens[self.span[0]:self.span[1]]),
                "target_logprob": self.target_logprob, **self.details}


def salience(gemma: Any, prompt: str | Sequence[int], target: str | Sequence[int] | None = None,
             generate: int | None = None, span: str | Sequence[int] | None = None, method: str = "grad_l2",
             steps: int = DEFAULT_STEPS, batch: int = 8, progress: bool = False,
             problem: Problem | None = None, max_steps: int | None = None) -> Salience:
    """Salience of every token before the span for the span's log-probability (see the module docstring).

        s = salience(gemma, "The capital of France is", target=" Paris.", method="grad_dot_input")
        s.to_dict("word")
    """
    if method not in METHODS:
        raise InputError(f"unknown salience method {method!r}; expected one of {', '.join(METHODS)}")
    problem = problem or make_problem(gemma, prompt, target, generate, span)
    fmodel, weights = float_model(gemma)
    module = fmodel.module
    ids = torch.tensor(problem.ids, dtype=torch.long)
    a, b = problem.absolute_span
    details: dict[str, Any] = {"weights": weights,
                               "gradient_point": "input embeddings after the sqrt(d) scaling (what layer 0 reads)",
                               "objective": "log p(span) = -(summed token cross-entropy of the span)"}
    if method == "integrated_gradients":
        pad = gemma.tokenizer.pad_id
        if pad is None or pad < 0:
            raise InputError("integrated gradients start from the <pad> embedding, and this tokenizer has no pad id")
        per_pos, info = integrated_gradients(module, ids, (a, b), pad, steps, batch, progress,
                                             max_steps=max_steps)
        details.update(info, steps=steps, rule="composite gauss-legendre, split while completeness > 1%",
                       baseline="the <pad> embedding at every position except <bos>")
        f = info["f_input"]
    else:
        x, g, f = gradient(module, ids, (a, b))
        per_pos = g.norm(dim=-1) if method == "grad_l2" else (g * x).sum(-1)
    scores = per_pos.detach().cpu().tolist() + [0.0] * (len(problem.ids) - (b - 1))
    text_ids = problem.ids[1:]
    tokens = token_pieces(gemma.tokenizer, problem.ids[1: problem.prompt_len]) + token_pieces(
        gemma.tokenizer, problem.target_ids)
    return Salience(tokens, text_ids, scores[1:], problem.prompt_len - 1, problem.span, method, f, details)
