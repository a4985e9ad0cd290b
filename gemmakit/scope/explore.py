"""Feature analysis in the manner of Neuronpedia: what makes a latent fire, what it writes, how often.

`index_features` runs a set of token windows through the model once and keeps every non-zero activation
sparsely (token, latent, value); top-activating contexts, quantile samples, histograms and densities are then
cheap queries on that index. Logit effects read the decoder direction through the (tied) unembedding;
attn_out latents are first mapped through o_proj, since their directions live in the concatenated-heads space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gemmakit.scope.sae import SAE
from gemmakit.scope.sites import activations, as_transformer, parse_site, steer
from gemmakit.scope.store import special_mask


@dataclass
class FeatureIndex:
    """Sparse activations of every latent over token windows [S, T] (special tokens excluded)."""

    tokens: np.ndarray  # [S, T] int
    flat: torch.Tensor  # [nnz] position s*T + t
    latent: torch.Tensor  # [nnz]
    value: torch.Tensor  # [nnz]
    n_tokens: int  # non-special tokens seen
    d_sae: int

    def of(self, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self.latent == feature
        return self.flat[sel], self.value[sel]

    def density(self) -> torch.Tensor:
        return torch.bincount(self.latent, minlength=self.d_sae).float() / max(self.n_tokens, 1)

    def max_activation(self) -> torch.Tensor:
        out = torch.zeros(self.d_sae)
        return out.scatter_reduce(0, self.latent, self.value, reduce="amax", include_self=True)


def index_features(model: Any, sae: SAE, site: str, sequences: np.ndarray, batch_size: int = 8) -> FeatureIndex:
    tok = getattr(model, "tokenizer", None)
    seqs = np.asarray(sequences)
    t = seqs.shape[1]
    flats, latents, values, n_tokens = [], [], [], 0
    site = str(parse_site(site))
    for start in range(0, len(seqs), batch_size):
        ids = torch.from_numpy(seqs[start:start + batch_size].astype(np.int64))
        x = activations(model, ids, [site])[site].float()
        special = torch.from_numpy(special_mask(ids.numpy(), tok))
        with torch.no_grad():
            f = sae.encode(x.to(sae.W_enc.device)).cpu()
        f[special] = 0
        n_tokens += int((~special).sum())
        pos, lat = f.reshape(-1, f.shape[-1]).nonzero(as_tuple=True)
        flats.append(pos + start * t)
        latents.append(lat)
        values.append(f.reshape(-1, f.shape[-1])[pos, lat])
    return FeatureIndex(seqs, torch.cat(flats), torch.cat(latents), torch.cat(values), n_tokens, sae.d_sae)


def token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{int(i)}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def _example(model: Any, index: FeatureIndex, seq: int, pos: int, acts: dict[int, float], window: tuple[int, int]
             ) -> dict[str, Any]:
    lo, hi = max(0, pos - window[0]), min(index.tokens.shape[1], pos + window[1] + 1)
    ids = index.tokens[seq, lo:hi].tolist()
    return {"seq": int(seq), "pos": int(pos - lo), "tokens": token_strings(model, ids),
            "acts": [round(acts.get(p, 0.0), 4) for p in range(lo, hi)], "max": round(max(acts.values()), 4)}


def feature_examples(model: Any, index: FeatureIndex, feature: int, n_top: int = 10, n_bins: int = 4,
                     per_bin: int = 3, window: tuple[int, int] = (8, 4), seed: int = 0) -> dict[str, Any]:
    """Top-activating contexts (one per window, by its max) and samples from lower activation intervals."""
    flat, val = index.of(feature)
    if flat.numel() == 0:
        return {"top": [], "quantiles": []}
    t = index.tokens.shape[1]
    seq, pos = (flat // t).numpy(), (flat % t).numpy()
    per_seq: dict[int, dict[int, float]] = {}
    for s, p, v in zip(seq.tolist(), pos.tolist(), val.tolist(), strict=True):
        per_seq.setdefault(s, {})[p] = v
    best = sorted(((max(a.values()), s, max(a, key=a.get)) for s, a in per_seq.items()), reverse=True)
    top = [_example(model, index, s, p, per_seq[s], window) for _, s, p in best[:n_top]]
    rest = best[n_top:]
    quantiles = []
    if rest:
        top_max = best[0][0]
        rng = np.random.default_rng(seed)
        edges = np.linspace(0, top_max, n_bins + 1)
        for lo, hi in reversed(list(zip(edges[:-1], edges[1:], strict=True))):
            members = [r for r in rest if lo < r[0] <= hi]
            if not members:
                continue
            pick = rng.choice(len(members), size=min(per_bin, len(members)), replace=False)
            quantiles.append({"range": [round(float(lo), 4), round(float(hi), 4)], "count": len(members),
                              "examples": [_example(model, index, members[i][1], members[i][2],
                                                    per_seq[members[i][1]], window) for i in sorted(pick)]})
    return {"top": top, "quantiles": quantiles}


def activation_histogram(index: FeatureIndex, feature: int, bins: int = 30) -> dict[str, Any]:
    _, val = index.of(feature)
    if val.numel() == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(val.numpy(), bins=bins)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def output_directions(model: Any, sae: SAE, site: str, features: Sequence[int]) -> torch.Tensor:
    """The residual-stream direction each latent writes: W_dec[f], through o_proj for attn_out sites."""
    module = as_transformer(model)
    s = parse_site(site)
    dirs = sae.W_dec.detach()[torch.as_tensor(list(features), dtype=torch.long)].float()
    if s.kind == "attn_out":
        o_proj = module.model.layers[s.layer].self_attn.o_proj.weight.detach().float()
        dirs = dirs @ o_proj.t()
    return dirs


def logit_effects(model: Any, sae: SAE, site: str, features: Sequence[int], k: int = 10,
                  chunk: int = 32) -> list[dict[str, Any]]:
    """Top and bottom tokens of W_dec[f] @ W_U^T (the direct effect on the logits, no final norm)."""
    module = as_transformer(model)
    w_u = module.model.embed_tokens.weight.detach()
    out = []
    dirs = output_directions(model, sae, site, features)
    for start in range(0, len(features), chunk):
        with torch.no_grad():
            logits = dirs[start:start + chunk].to(w_u.dtype) @ w_u.t()
        top = logits.float().topk(k, dim=1)
        bottom = (-logits.float()).topk(k, dim=1)
        for i in range(logits.shape[0]):
            out.append({"pos": list(zip(token_strings(model, top.indices[i].tolist()),
                                        [round(v, 4) for v in top.values[i].tolist()], strict=True)),
                        "neg": list(zip(token_strings(model, bottom.indices[i].tolist()),
                                        [round(-v, 4) for v in bottom.values[i].tolist()], strict=True))})
    return out


def text_features(model: Any, sae: SAE, site: str, text: str | Sequence[int], top: int = 5) -> list[dict[str, Any]]:
    """For each token of a text, the latents that fire on it, strongest first."""
    ids = model.encode(text) if isinstance(text, str) else list(text)
    x = activations(model, torch.tensor([ids]), [site])[str(parse_site(site))][0].float()
    with torch.no_grad():
        f = sae.encode(x.to(sae.W_enc.device)).cpu()
    special = special_mask(np.asarray(ids), getattr(model, "tokenizer", None))
    rows = []
    for i, piece in enumerate(token_strings(model, ids)):
        vals, idx = f[i].topk(min(top, f.shape[1]))
        fired = [(int(j), round(float(v), 4)) for v, j in zip(vals, idx, strict=True) if v > 0 and not special[i]]
        rows.append({"token": piece, "features": fired})
    return rows


def steer_generate(model: Any, sae: SAE, site: str, feature: int, coeff: float, prompt: str,
                   max_new_tokens: int = 32, **sampling: Any) -> dict[str, str]:
    """Default and steered continuations side by side; steering adds coeff * W_dec[f] at the site."""
    default = model.generate(prompt, max_new_tokens, **sampling)
    with steer(model, site, sae.W_dec.detach()[feature], coeff):
        steered = model.generate(prompt, max_new_tokens, **sampling)
    return {"prompt": prompt, "feature": feature, "coeff": coeff, "default": default, "steered": steered}
