"""How good an SAE is at its site: L0, fraction of variance unexplained, delta LM loss, dead and dense latents.

FVU is computed the corrected way (SAELens PR #443): the sum of squared errors over all tokens divided by the
sum of squared deviations from the mean, not an average of per-token ratios. Special tokens (BOS above all)
are excluded from every statistic and are not replaced when splicing, as in Gemma Scope's evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gemmakit.scope.sae import SAE
from gemmakit.scope.sites import as_transformer, capture, parse_site, splice
from gemmakit.scope.store import special_mask


@dataclass
class SAEMetrics:
    tokens: int
    l0: float
    fvu: float
    ce_clean: float
    ce_spliced: float
    delta_ce: float
    dead_fraction: float  # latents that never fired on these tokens
    dense_fraction: float  # latents firing on more than `dense_threshold` of tokens
    density: torch.Tensor  # per-latent firing frequency

    def summary(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("density")
        return d


def reconstruction_stats(sae: SAE, x: torch.Tensor) -> dict[str, Any]:
    """L0, FVU and per-latent firing counts for activations x [N, d] (no model needed)."""
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
        fired = (f > 0).sum(0)
        return {"n": x.shape[0], "l0": float((f > 0).sum(1).float().mean()),
                "sse": float((x_hat - x).pow(2).sum()), "sum": x.sum(0).double(), "sumsq": float(x.pow(2).sum()),
                "fired": fired}


def evaluate(model: Any, sae: SAE, site: str, sequences: np.ndarray | torch.Tensor, batch_size: int = 8,
             dense_threshold: float = 0.1) -> SAEMetrics:
    """Run token windows [S, T] through the model clean and with the SAE spliced in at `site`."""
    tok = getattr(model, "tokenizer", None)
    module = as_transformer(model)
    seqs = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    site = str(parse_site(site))
    n, sse, sumsq, total = 0, 0.0, 0.0, torch.zeros(sae.d_in, dtype=torch.float64)
    l0_sum, fired = 0.0, torch.zeros(sae.d_sae, dtype=torch.long)
    ce_clean = ce_spliced = 0.0
    n_pred = 0
    for start in range(0, len(seqs), batch_size):
        ids = seqs[start:start + batch_size].to(module.device)
        special = torch.from_numpy(special_mask(ids.cpu().numpy(), tok)).to(ids.device)
        with torch.inference_mode():
            with capture(module, [site]) as acts:
                logits = module(ids)
            x = acts[site][~special].float()
            stats = reconstruction_stats(sae, x.to(sae.W_enc.device))
            with splice(module, site, sae, keep=special):
                logits_sae = module(ids)
        targets = ids[:, 1:]
        valid = ~special[:, 1:]  # predictions of special tokens are not scored
        ce_clean += float(_ce(logits[:, :-1], targets)[valid].sum())
        ce_spliced += float(_ce(logits_sae[:, :-1], targets)[valid].sum())
        n_pred += int(valid.sum())
        n += stats["n"]
        sse += stats["sse"]
        sumsq += stats["sumsq"]
        total += stats["sum"].cpu()
        l0_sum += stats["l0"] * stats["n"]
        fired += stats["fired"].cpu()
    if n == 0:
        raise ValueError("no non-special tokens to evaluate on")
    var = sumsq - float(total.pow(2).sum()) / n  # sum ||x - mean||^2
    density = fired.float() / n
    ce_clean, ce_spliced = ce_clean / max(n_pred, 1), ce_spliced / max(n_pred, 1)
    return SAEMetrics(tokens=n, l0=l0_sum / n, fvu=sse / var, ce_clean=ce_clean, ce_spliced=ce_spliced,
                      delta_ce=ce_spliced - ce_clean, dead_fraction=float((fired == 0).float().mean()),
                      dense_fraction=float((density > dense_threshold).float().mean()), density=density)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def density_histogram(density: torch.Tensor, bins: Sequence[float] | None = None) -> list[tuple[float, int]]:
    """Counts of latents per log10 firing frequency bin (dead latents go in the first bin, at -inf)."""
    edges = list(bins) if bins is not None else [-7, -6, -5, -4, -3, -2, -1, 0]
    logd = torch.log10(density.clamp(min=1e-10))
    counts = [int((density == 0).sum())]
    live = logd[density > 0]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        counts.append(int(((live >= lo) & (live < hi)).sum()) + (int((live >= hi).sum()) if hi == edges[-1] else 0))
    return [(float("-inf"), counts[0])] + list(zip(edges[:-1], counts[1:], strict=True))
