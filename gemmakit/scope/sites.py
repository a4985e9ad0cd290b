"""Named activation sites ("layers.{i}.resid_post|attn_out|mlp_out") and the hooks that read or change them.

The model exposes one identity `Site` module per site that runs only while hooked, so everything here is plain
`register_forward_hook`: capture stores the tensor, steering adds to it, splicing replaces it. Contexts remove
their hooks on exit even when the forward raises, so a model is never left altered.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gemmakit.errors import InputError
from gemmakit.model import Site, Transformer

KINDS = ("resid_post", "attn_out", "mlp_out")
_SITE_RE = re.compile(r"^layers\.(\d+)\.(resid_post|attn_out|mlp_out)$")

# Gemma Scope 2 names sites by Hugging Face module hook points, SAELens by TransformerLens hook names.
_HF_HOOKS = {"resid_post": "model.layers.{}.output", "attn_out": "model.layers.{}.self_attn.o_proj.input",
             "mlp_out": "model.layers.{}.post_feedforward_layernorm.output"}
_TL_HOOKS = {"resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.attn.hook_z",
             "mlp_out": "blocks.{}.hook_mlp_out"}


@dataclass(frozen=True)
class SiteName:
    layer: int
    kind: str

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    @property
    def hf_hook(self) -> str:
        return _HF_HOOKS[self.kind].format(self.layer)

    @property
    def tl_hook(self) -> str:
        return _TL_HOOKS[self.kind].format(self.layer)


def parse_site(name: str) -> SiteName:
    """"layers.9.resid_post" -> SiteName(9, "resid_post"); also accepts GS2 (HF) and SAELens (TL) hook names."""
    m = _SITE_RE.match(name)
    if m:
        return SiteName(int(m.group(1)), m.group(2))
    for table in (_HF_HOOKS, _TL_HOOKS):
        for kind, pattern in table.items():
            m = re.fullmatch(re.escape(pattern).replace(r"\{\}", r"(\d+)"), name)
            if m:
                return SiteName(int(m.group(1)), kind)
    raise InputError(f"unknown site {name!r}; expected 'layers.<i>.<kind>' with kind one of {', '.join(KINDS)}")


def as_transformer(model: Any) -> Transformer:
    """Accept a `Gemma` (anything with `.module`) or a bare `Transformer`."""
    module = getattr(model, "module", model)
    if not isinstance(module, Transformer):
        raise InputError(f"expected a gemmakit Gemma or Transformer, got {type(model).__name__}")
    return module


def site_module(model: Any, site: str | SiteName) -> Site:
    """The identity module standing at `site` in this model (range-checked)."""
    s = site if isinstance(site, SiteName) else parse_site(site)
    module = as_transformer(model)
    n = len(module.model.layers)
    if not 0 <= s.layer < n:
        raise InputError(f"site {s}: layer {s.layer} does not exist (the model has layers 0..{n - 1})")
    block = module.model.layers[s.layer]
    return block.self_attn.attn_out if s.kind == "attn_out" else getattr(block, s.kind)


def site_width(model: Any, site: str | SiteName) -> int:
    """d of the activation at `site`: hidden size, or heads x head_dim for attn_out."""
    s = site if isinstance(site, SiteName) else parse_site(site)
    c = as_transformer(model).config
    return c.num_heads * c.head_dim if s.kind == "attn_out" else c.hidden_size


@contextmanager
def hook(model: Any, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Run `fn(x)` on the activation at `site` during every forward inside the block; a returned tensor
    replaces the activation (None leaves it). The general tool under capture, steer and splice."""
    module = site_module(model, site)

    def _hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor | None:
        return fn(out)

    handle = module.register_forward_hook(_hook)
    try:
        yield
    finally:
        handle.remove()


class Captured(dict):
    """site name -> activation [B, T, d] from the latest forward (or all forwards concatenated on T)."""


@contextmanager
def capture(model: Any, sites: Sequence[str], concat: bool = False) -> Iterator[Captured]:
    """Record the activations at `sites` during forwards run inside the block.

    Each forward overwrites the entry, unless `concat=True`: then a generation's prefill and decode steps are
    joined along the token axis, giving one [B, T_total, d] tensor. Tensors are detached copies and ordinary
    (not inference-mode) tensors, so they can feed computations that track gradients.
    """
    names = [str(parse_site(s)) for s in sites]
    acts = Captured()
    handles = []
    try:
        for name in names:
            module = site_module(model, name)

            def _hook(_mod: nn.Module, _inp: Any, out: torch.Tensor, name: str = name) -> None:
                with torch.inference_mode(False):  # a normal tensor, usable with autograd (e.g. SAE training)
                    x = out.detach().clone()
                acts[name] = torch.cat([acts[name], x], dim=1) if concat and name in acts else x

            handles.append(module.register_forward_hook(_hook))
        yield acts
    finally:
        for h in handles:
            h.remove()


def last_layer(sites: Sequence[str]) -> int:
    return max(parse_site(s).layer for s in sites)


def activations(model: Any, ids: torch.Tensor, sites: Sequence[str], pad: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """Activations at `sites` for ids [B, T], running layers only up to the last one needed and no logits."""
    module = as_transformer(model)
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    with torch.inference_mode(), capture(module, sites) as acts:
        module(ids.to(module.device), pad=pad, stop_after_layer=last_layer(sites))
    return dict(acts)


@contextmanager
def steer(model: Any, site: str, vector: torch.Tensor, coeff: float = 1.0, skip_first: bool = True
          ) -> Iterator[None]:
    """Add `coeff * vector` to the activation at `site` during every forward inside the block (e.g. a feature's
    decoder row during generation).

    With `skip_first` the first position of the first forward (the prompt's `<bos>`) is left alone, as
    Neuronpedia leaves special tokens unsteered: Gemma's BOS residual is huge and steering it derails the model.
    """
    state = {"calls": 0}

    def add(x: torch.Tensor) -> torch.Tensor:
        delta = (coeff * vector).to(device=x.device, dtype=x.dtype)
        if delta.shape[-1] != x.shape[-1]:
            raise InputError(f"steering vector has {delta.shape[-1]} dims but site {site} has {x.shape[-1]}")
        out = x + delta
        if skip_first and state["calls"] == 0 and x.shape[1] > 1:
            out[:, 0] = x[:, 0]
        state["calls"] += 1
        return out

    with hook(model, site, add):
        yield


@contextmanager
def splice(model: Any, site: str, sae: nn.Module, keep: torch.Tensor | None = None) -> Iterator[None]:
    """Replace the activation at `site` by the SAE's reconstruction during forwards inside the block.

    `keep` [B, T] (bool) marks positions left untouched, e.g. BOS, whose outsized norm no SAE is trained on.
    """

    def replace(x: torch.Tensor) -> torch.Tensor:
        x_hat = sae(x.to(sae_dtype(sae))).to(x.dtype)
        if keep is not None:
            x_hat = torch.where(keep.to(x.device)[..., None], x, x_hat)
        return x_hat

    with hook(model, site, replace):
        yield


def sae_dtype(sae: nn.Module) -> torch.dtype:
    return next(sae.parameters()).dtype
