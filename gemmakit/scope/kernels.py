"""The SAE training step as one autograd function that exploits sparsity, plus a plain reference to test it.

A JumpReLU or TopK SAE at L0 ~ 60 out of 16k latents has 99.6% zeros in f, yet a dense implementation pays
for all of them four more times after the encoder: decoder forward, both decoder gradients and the encoder
weight gradient. Here only the encoder matmul is dense; the decoder runs as `embedding_bag` over the active
latents, W_dec's gradient is a sparse (CSR) product, the gradient reaching f is sampled only where f is active
(`torch.sparse.sampled_addmm`), and W_enc's gradient is a sparse product again. The threshold's
straight-through gradients (Gemma Scope: rectangle kernel of bandwidth eps, nothing reaches z) only need the
few positions inside the kernel's window. When f is still dense (early in training) it falls back to dense
matmuls, which are then faster.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

DENSE_FRACTION = 0.05  # above this fraction of active latents, dense matmuls beat the sparse kernels


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _crow(counts: torch.Tensor) -> torch.Tensor:
    crow = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def _sampled(g: torch.Tensor, w_dec: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, n_latents: int
             ) -> torch.Tensor:
    """(g @ W_dec^T) at the positions (row, col) of a CSR pattern: the gradient reaching f there."""
    if cols.numel() == 0:
        return torch.zeros(0, dtype=g.dtype, device=g.device)
    pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=g.dtype, device=g.device), (g.shape[0], n_latents))
    return torch.sparse.sampled_addmm(pattern, g, w_dec.t(), beta=0.0).values()


class SparseSAEStep(torch.autograd.Function):
    """(x, W_enc, b_enc, threshold, W_dec, b_dec) -> (x_hat [B, d], l0 [B], fired [d_sae]).

    `k` > 0 selects TopK (threshold unused), else JumpReLU with straight-through estimators of bandwidth `eps`:
    dJumpReLU/dtheta = -(theta/eps) K((z - theta)/eps), dH/dtheta = -(1/eps) K(...), dJumpReLU/dz = H(z - theta),
    K the rectangle 1[|u| < 1/2]. `l0` carries the Heaviside gradient for the sparsity penalty; `fired` counts
    how many rows used each latent (no gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
                w_dec: torch.Tensor, b_dec: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, ...]:
        pre = torch.addmm(b_enc, x, w_enc)
        b, s = pre.shape
        win_crow = win_cols = None
        if k > 0:
            vals, cols = pre.topk(k, dim=1, sorted=False)
            vals = vals.relu()
            cols = cols.reshape(-1)
            vals = vals.reshape(-1)
            counts = torch.full((b,), k, dtype=torch.long, device=x.device)
            l0 = (vals > 0).view(b, k).sum(1).to(x.dtype)
            active = vals > 0
        else:
            u = pre - threshold
            mask = u > 0
            counts = mask.sum(1)
            cols = mask.nonzero()[:, 1]
            vals = pre[mask]
            l0 = counts.to(x.dtype)
            active = None
            window = u.abs_() < eps / 2  # u is not needed any more: reuse its memory
            win_crow, win_cols = _crow(window.sum(1)), window.nonzero()[:, 1]
        crow = _crow(counts)
        fired = torch.bincount(cols if active is None else cols[active], minlength=s)
        dense = cols.numel() > DENSE_FRACTION * b * s
        if dense:
            f = _csr(crow, cols, vals, (b, s)).to_dense()
            x_hat = torch.addmm(b_dec, f, w_dec)
        else:
            x_hat = F.embedding_bag(cols, w_dec, crow[:-1], mode="sum", per_sample_weights=vals) + b_dec
        ctx.save_for_backward(x, w_dec, threshold, crow, cols, vals,
                              active if active is not None else torch.empty(0, dtype=torch.bool),
                              win_crow if win_crow is not None else torch.empty(0, dtype=torch.long),
                              win_cols if win_cols is not None else torch.empty(0, dtype=torch.long))
        ctx.k, ctx.eps, ctx.dense, ctx.shape = k, eps, dense, (b, s)
        ctx.mark_non_differentiable(fired)
        return x_hat, l0, fired

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, g_l0: torch.Tensor | None, _g_fired: Any) -> tuple[Any, ...]:
        x, w_dec, threshold, crow, cols, vals, active, win_crow, win_cols = ctx.saved_tensors
        b, s = ctx.shape
        g = g.contiguous()
        grad_b_dec = g.sum(0)
        if ctx.dense:
            grad_w_dec = _csr(crow, cols, vals, (b, s)).to_dense().t() @ g
            gf_dense = g @ w_dec.t()
            rows = torch.repeat_interleave(torch.arange(b, device=g.device), crow.diff())
            g_act = gf_dense[rows, cols]
        else:
            grad_w_dec = _csr(crow, cols, vals, (b, s)).t().to_sparse_csr() @ g
            g_act = _sampled(g, w_dec, crow, cols, s)
        if active.numel():
            g_act = g_act * active
        grad_b_enc = torch.zeros(s, dtype=g.dtype, device=g.device).index_add_(0, cols, g_act)
        g_pre_t = _csr(crow, cols, g_act, (b, s)).t().to_sparse_csr()
        grad_w_enc = (g_pre_t @ x).t()
        grad_threshold = None
        if ctx.k == 0 and win_cols.numel():
            win_rows = torch.repeat_interleave(torch.arange(b, device=g.device), win_crow.diff())
            g_win = gf_dense[win_rows, win_cols] if ctx.dense else _sampled(g, w_dec, win_crow, win_cols, s)
            contrib = -(threshold[win_cols] / ctx.eps) * g_win
            if g_l0 is not None:
                contrib = contrib - g_l0[win_rows] / ctx.eps
            grad_threshold = torch.zeros_like(threshold).index_add_(0, win_cols, contrib)
        elif ctx.k == 0:
            grad_threshold = torch.zeros_like(threshold)
        return None, grad_w_enc, grad_b_enc, grad_threshold, grad_w_dec, grad_b_dec, None, None


def sae_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None,
             w_dec: torch.Tensor, b_dec: torch.Tensor, k: int = 0, eps: float = 1e-3
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast training forward: (x_hat, l0 per row, firing count per latent)."""
    if threshold is None:
        threshold = torch.zeros(w_enc.shape[1], dtype=x.dtype, device=x.device)
    return SparseSAEStep.apply(x, w_enc, b_enc, threshold, w_dec, b_dec, k, eps)


# --- reference: the same maths written with dense tensors and two tiny autograd functions ------------------------
class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        z, theta = ctx.saved_tensors
        kernel = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return g * (z > theta), (-(theta / ctx.eps) * kernel * g).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        z, theta = ctx.saved_tensors
        kernel = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return torch.zeros_like(z), (-(1.0 / ctx.eps) * kernel * g).sum(0), None


def reference_step(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None,
                   w_dec: torch.Tensor, b_dec: torch.Tensor, k: int = 0, eps: float = 1e-3
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (x_hat, l0) with the straight-through estimators as the JumpReLU paper states them."""
    pre = x @ w_enc + b_enc
    if k > 0:
        vals, idx = pre.topk(k, dim=1)
        f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        return f @ w_dec + b_dec, (f > 0).sum(1).to(x.dtype)
    f = _JumpReLU.apply(pre, threshold, eps)
    return f @ w_dec + b_dec, _Step.apply(pre, threshold, eps).sum(1)
