"""Sparse autoencoders as Gemma Scope defines them: one class per architecture over a shared base.

    pre   = x @ W_enc + b_enc                  (no b_dec subtracted at the input, no input normalisation)
    f     = JumpReLU_theta(pre) = pre * (pre > theta)     or     TopK: keep the k largest, ReLU
    x_hat = f @ W_dec + b_dec

Shapes follow the released files: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc/threshold [d_sae],
b_dec [d_in]. Training-time input scaling is folded into the weights before an SAE is saved, so an SAE always
takes raw activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from gemmakit.errors import FormatError, InputError


@dataclass
class SAEInfo:
    """What an SAE was trained on; carried through every format that has room for it."""

    site: str | None = None  # our site name, e.g. "layers.9.resid_post"
    model_name: str | None = None
    target_l0: float | None = None
    apply_b_dec_to_input: bool = False  # SAELens TopK/standard SAEs may subtract b_dec first; Gemma Scope never
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAE(nn.Module):
    """Shared parts: parameters, decode, forward, pre-activations. Subclasses define `encode`."""

    architecture: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(self, d_in: int, d_sae: int, info: SAEInfo | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise InputError(f"SAE sizes must be positive, got d_in={d_in}, d_sae={d_sae}")
        self.d_in, self.d_sae = d_in, d_sae
        self.info = info or SAEInfo()
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, site={self.info.site}"

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.info.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their canonical names (Gemma Scope 1 / SAELens spelling)."""
        return {name: getattr(self, name).detach() for name in self.param_names}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> SAE:
        """Copy weights in, checking every name and shape; errors name the file they came from."""
        missing = [n for n in self.param_names if n not in tensors]
        if missing:
            raise FormatError(f"{source}: missing SAE tensors {missing}; found {sorted(tensors)}")
        with torch.no_grad():
            for name in self.param_names:
                p, t = getattr(self, name), tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise FormatError(f"{source}: tensor {name} has shape {list(t.shape)}, expected {list(p.shape)}")
                p.copy_(t.to(p.dtype))
        return self

    def scale_inputs(self, scale: float) -> None:
        """Fold an input scaling into the weights: after this the SAE takes x * scale where it took x.

        Training divides activations by s (unit mean squared norm); calling this with s on the trained SAE
        gives one for raw activations: pre and f scale by s, so b_enc, b_dec (and theta) scale by s.
        """
        with torch.no_grad():
            self.b_enc.mul_(scale)
            self.b_dec.mul_(scale)


class JumpReLUSAE(SAE):
    """Gemma Scope's SAE: f = pre * (pre > theta) with a learned per-latent threshold theta."""

    architecture = "jumprelu"
    param_names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")

    def __init__(self, d_in: int, d_sae: int, info: SAEInfo | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(d_in, d_sae, info, dtype, device)
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return (pre > self.threshold) * torch.relu(pre)  # the reference code's exact expression

    def scale_inputs(self, scale: float) -> None:
        super().scale_inputs(scale)
        with torch.no_grad():
            self.threshold.mul_(scale)


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): the k largest pre-activations per token, through ReLU; the rest are zero."""

    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, info: SAEInfo | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        super().__init__(d_in, d_sae, info, dtype, device)
        if not 1 <= k <= d_sae:
            raise InputError(f"TopK SAE needs 1 <= k <= d_sae ({d_sae}), got k={k}")
        self.k = k

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))


ARCHITECTURES: dict[str, type[SAE]] = {"jumprelu": JumpReLUSAE, "topk": TopKSAE}


def make_sae(architecture: str, d_in: int, d_sae: int, k: int | None = None, info: SAEInfo | None = None,
             dtype: torch.dtype = torch.float32) -> SAE:
    """Build an empty SAE of a named architecture ("jumprelu" or "topk")."""
    if architecture == "jumprelu":
        return JumpReLUSAE(d_in, d_sae, info, dtype)
    if architecture == "topk":
        if k is None:
            raise InputError("a TopK SAE needs k")
        return TopKSAE(d_in, d_sae, k, info, dtype)
    raise InputError(f"unknown SAE architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
