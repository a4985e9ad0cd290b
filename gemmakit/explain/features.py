"""Feature attribution through an SAE: which (position, latent) pairs carry the target span's log-probability?

The SAE is spliced in at its site as an exact decomposition, the way attribution patching with error nodes does:

    x  =  f(x) @ W_dec  +  b_dec  +  e,        e = x - x_hat (held constant)

so the forward pass is the model's own (the error term e carries what the SAE misses) and the gradient of the
span's log-probability with respect to the latents f and to e comes from one backward. Then, per position t:

    attribution(t, i) = f_i(x_t) * d logp / d f_i         (gradient x activation of latent i)
    error(t)          = e_t . d logp / d e_t
    bias(t)           = b_dec . d logp / d e_t

and sum_i attribution(t, i) + bias(t) + error(t) = x_t . d logp / d x_t, the plain gradient x activation of the
site (exact: f enters only through f @ W_dec). The error's share of the absolute attribution tells how much of
the site's contribution the SAE leaves unexplained. `<bos>` (position 0), whose residual no SAE is trained on,
is never ranked and is left out of the shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmakit.errors import InputError
from gemmakit.explain.salience import Problem, float_model, make_problem, no_param_grads, span_logprob, token_pieces
from gemmakit.scope.explore import FeatureIndex, feature_examples, logit_effects
from gemmakit.scope.sae import SAE
from gemmakit.scope.sites import hook, parse_site, site_width
from gemmakit.scope.store import ActivationStore


def sae_site(sae: SAE, site: str | None) -> str:
    """The site to splice at: the one given, else the one the SAE records."""
    name = site or sae.info.site
    if not name:
        raise InputError("this SAE does not record its site; give one, e.g. site='layers.6.resid_post'")
    return str(parse_site(name))


@dataclass
class FeatureAttribution:
    """Attributions of the span's log-probability to (position, latent) pairs at one site.

    `attributions` [T, d_sae] and `error`/`bias`/`total` [T] are per input position (position 0 is <bos>;
    `tokens` leaves it out, so token k is position k + 1). `features` ranks latents by their summed
    attribution over positions, each with its positions and, when computed, a dashboard summary.
    """

    site: str
    tokens: list[str]
    prompt_tokens: int
    span: tuple[int, int]
    target_logprob: float
    attributions: torch.Tensor
    activations: torch.Tensor
    error: torch.Tensor
    bias: torch.Tensor
    total: torch.Tensor
    features: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def error_share(self) -> float:
        """|error| / (|latents| + |bias| + |error|), absolute attributions summed over positions after <bos>."""
        feat = float(self.attributions[1:].abs().sum())
        err, bias = float(self.error[1:].abs().sum()), float(self.bias[1:].abs().sum())
        return err / max(feat + err + bias, 1e-30)

    def top_pairs(self, k: int = 20) -> list[dict[str, Any]]:
        """The k (position, latent) pairs of largest |attribution|, <bos> excluded."""
        flat = self.attributions[1:].flatten()
        k = min(k, int((flat != 0).sum()))
        idx = flat.abs().topk(k).indices if k else torch.zeros(0, dtype=torch.long)
        d = self.attributions.shape[1]
        out = []
        for i in idx.tolist():
            pos, lat = divmod(i, d)
            out.append({"token_index": pos, "token": self.tokens[pos], "feature": lat,
                        "activation": float(self.activations[pos + 1, lat]),
                        "attribution": float(self.attributions[pos + 1, lat])})
        return out

    def to_dict(self, pairs: int = 20) -> dict[str, Any]:
        return {"site": self.site, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "span": list(self.span), "target_logprob": self.target_logprob,
                "total": float(self.total[1:].sum()), "latents": float(self.attributions[1:].sum()),
                "bias": float(self.bias[1:].sum()), "error": float(self.error[1:].sum()),
                "error_share": self.error_share, "features": self.features, "pairs": self.top_pairs(pairs),
                **self.details}


def attribute(gemma: Any, sae: SAE, prompt: str | Sequence[int], target: str | Sequence[int] | None = None,
              generate: int | None = None, span: str | Sequence[int] | None = None, site: str | None = None,
              top: int = 10, store: ActivationStore | str | Path | None = None, problem: Problem | None = None,
              summaries: bool = True) -> FeatureAttribution:
    """Gradient x activation of every SAE latent at `site` for the span's log-probability (module docstring).

    `top` latents are listed with their dashboard summaries: logit effects always, and density, max activation
    and top-activating contexts when an activation store of the same site is given.
    """
    site = sae_site(sae, site)
    if site_width(gemma, site) != sae.d_in:
        raise InputError(f"the SAE takes {sae.d_in}-wide activations but site {site} is "
                         f"{site_width(gemma, site)} wide")
    problem = problem or make_problem(gemma, prompt, target, generate, span)
    fmodel, weights = float_model(gemma)
    module = fmodel.module
    ids = torch.tensor(problem.ids, dtype=torch.long)
    a, b = problem.absolute_span
    dtype = next(sae.parameters()).dtype
    state: dict[str, torch.Tensor] = {}

    def node(x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().to(dtype)
        f = sae.encode(xs).detach().requires_grad_()
        err = (xs - sae.decode(f).detach()).requires_grad_()
        state.update(x=xs, f=f, err=err)
        return (sae.decode(f) + err).to(x.dtype)

    with no_param_grads(module, sae), torch.enable_grad(), hook(module, site, node):
        logp = span_logprob(module, ids, (a, b))
        grad_f, grad_e = torch.autograd.grad(logp.sum(), [state["f"], state["err"]])
    f, err, x = state["f"][0].detach(), state["err"][0].detach(), state["x"][0]
    grad_e = grad_e[0]
    tokens = token_pieces(gemma.tokenizer, problem.ids[1: problem.prompt_len]) + token_pieces(
        gemma.tokenizer, problem.target_ids)
    result = FeatureAttribution(
        site, tokens, problem.prompt_len - 1, problem.span, float(logp.detach()[0]),
        attributions=(f * grad_f[0]).float(), activations=f.float(), error=(err * grad_e).sum(-1).float(),
        bias=(sae.b_dec.detach() * grad_e).sum(-1).float(), total=(x * grad_e).sum(-1).float(),
        details={"weights": weights, "objective": "log p(span)",
                 "method": "gradient x activation with the SAE spliced in and an error node"})
    per_latent = result.attributions[1:].sum(0)
    order = per_latent.abs().topk(min(top, int((per_latent != 0).sum()))).indices.tolist()
    for lat in order:
        col = result.attributions[1:, lat]
        where = torch.nonzero(col).flatten().tolist()
        result.features.append({
            "feature": lat, "attribution": float(per_latent[lat]),
            "positions": [{"token_index": p, "token": tokens[p], "activation": float(result.activations[p + 1, lat]),
                           "attribution": float(col[p])} for p in where]})
    if summaries and order:
        found = feature_summaries(fmodel, sae, site, order, store)
        for entry in result.features:
            entry["summary"] = found[entry["feature"]]
    return result


# --- dashboard summaries ------------------------------------------------------------------------------------------
def store_index(store: ActivationStore, sae: SAE, max_rows: int | None = 200_000, batch: int = 4096) -> FeatureIndex:
    """A sparse index of the SAE's latents over a stored activation set, encoded from the stored rows (no model
    run). The store's (sequence, position) rows place each activation in its context window."""
    n = len(store) if max_rows is None else min(len(store), max_rows)
    seqs = store.sequences()
    where = store.positions()[:n]
    t = seqs.shape[1]
    device = sae.W_enc.device
    flats, lats, vals = [], [], []
    for start in range(0, n, batch):
        rows = store.rows(torch.arange(start, min(start + batch, n)))
        with torch.no_grad():
            f = sae.encode(rows.to(device=device, dtype=sae.W_enc.dtype)).float().cpu()
        r, lat = f.nonzero(as_tuple=True)
        pos = torch.from_numpy(where[start + r.numpy()].astype(np.int64))
        flats.append(pos[:, 0] * t + pos[:, 1])
        lats.append(lat)
        vals.append(f[r, lat])
    empty = torch.zeros(0, dtype=torch.long)
    return FeatureIndex(seqs, torch.cat(flats) if flats else empty, torch.cat(lats) if lats else empty,
                        torch.cat(vals) if vals else torch.zeros(0), n, sae.d_sae)


def open_store(store: ActivationStore | str | Path, site: str) -> ActivationStore:
    if isinstance(store, ActivationStore):
        if store.site != site:
            raise InputError(f"{store.folder}: holds site {store.site}, but the SAE is at {site}")
        return store
    return ActivationStore(store, site)


_INDEXES: dict[tuple[str, int], FeatureIndex] = {}


def cached_index(store: ActivationStore, sae: SAE) -> FeatureIndex:
    key = (str(store.folder.resolve()) + store.site, id(sae))
    if key not in _INDEXES:
        _INDEXES[key] = store_index(store, sae)
    return _INDEXES[key]


def feature_summaries(model: Any, sae: SAE, site: str, features: Sequence[int],
                      store: ActivationStore | str | Path | None = None, k: int = 6) -> dict[int, dict[str, Any]]:
    """What a feature's dashboard shows in brief: top positive/negative logit effects; with a store of the same
    site, its density, max activation and top-activating contexts. `model` must have float weights."""
    effects = logit_effects(model, sae, site, list(features), k=k)
    out = {int(f): {"logits_pos": e["pos"], "logits_neg": e["neg"]} for f, e in zip(features, effects, strict=True)}
    if store is not None:
        index = cached_index(open_store(store, site), sae)
        density, peak = index.density(), index.max_activation()
        for f in features:
            ex = feature_examples(model, index, int(f), n_top=3)
            out[int(f)].update(density=float(density[f]), max_activation=float(peak[f]), top=ex["top"])
    return out


# --- steering -----------------------------------------------------------------------------------------------------
def clamp_hook(sae: SAE, feature: int, value: float):
    """A site hook holding latent `feature` at `value`: x + (value - f(x)) W_dec[feature] (Neuronpedia's clamp of
    the feature's decoded contribution); the first forward's position 0 (<bos>) is left alone."""
    direction = sae.W_dec.detach()[feature]
    calls = {"n": 0}

    def clamp(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            now = sae.encode(x.to(direction.dtype))[..., feature]
            out = x + ((value - now)[..., None] * direction).to(x.dtype)
        if calls["n"] == 0 and x.shape[1] > 1:
            out[:, 0] = x[:, 0]
        calls["n"] += 1
        return out

    return clamp


def steer_generate(gemma: Any, sae: SAE, site: str, feature: int, value: float, prompt: str, mode: str = "add",
                   max_new_tokens: int = 32, **sampling: Any) -> dict[str, Any]:
    """Default and steered continuations. "add": value x W_dec[f] is added at the site (gemmakit.scope.steer);
    "clamp": the latent is held at `value` (x + (value - f(x)) W_dec[f]) wherever the SAE reads the site.
    `<bos>` is never changed."""
    from gemmakit.scope.sites import steer

    if mode not in ("add", "clamp"):
        raise InputError(f"steering mode must be 'add' or 'clamp', got {mode!r}")
    if not 0 <= feature < sae.d_sae:
        raise InputError(f"feature {feature} does not exist (the SAE has latents 0..{sae.d_sae - 1})")
    site = sae_site(sae, site)
    default = gemma.generate(prompt, max_new_tokens, **sampling)
    direction = sae.W_dec.detach()[feature]
    if mode == "add":
        with steer(gemma, site, direction, value):
            steered = gemma.generate(prompt, max_new_tokens, **sampling)
    else:
        with hook(gemma, site, clamp_hook(sae, feature, value)):
            steered = gemma.generate(prompt, max_new_tokens, **sampling)
    return {"prompt": prompt, "feature": feature, "mode": mode, "value": value, "default": default,
            "steered": steered}
