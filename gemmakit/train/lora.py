"""LoRA adapters on a model's linear layers, saved and loaded in PEFT's on-disk format.

A wrapped layer computes `W x + scaling * B(A(dropout(x)))` with `scaling = alpha / r` (or `alpha / sqrt(r)`
with rsLoRA), A initialised like PEFT (Kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh adapter changes
nothing. The wrapper keeps the base `weight` parameter under its own name, so `state_dict()` still holds the
canonical transformers names (`...q_proj.weight`) plus `...q_proj.lora_A.weight` / `lora_B.weight`; those are
exactly PEFT's adapter names once prefixed with `base_model.model.`, which is what makes the files portable.

Adapter weights are kept in fp32 even on a bf16 base (as PEFT's `autocast_adapter_dtype` does): the update is
small and would lose most of its bits in bf16.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gemmakit.errors import FormatError, InputError

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class LoraConfig:
    """What to adapt and how strongly; field names and meanings follow PEFT's `LoraConfig`.

    `target_modules` is a list of module-name suffixes (`"q_proj"` matches `model.layers.3.self_attn.q_proj`)
    or one regular expression that must match a whole name. `layers` restricts adapters to those block indices
    (PEFT's `layers_to_transform`). `rank_pattern` / `alpha_pattern` override r / alpha for names matching a key.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str = ALL_PROJECTIONS
    layers: Sequence[int] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise InputError(f"LoraConfig.r must be a positive rank, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoraConfig.dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise InputError("LoraConfig.target_modules is empty; name at least one linear layer, e.g. 'q_proj'")

    def targets(self, name: str) -> bool:
        """PEFT's matching rule: regex full match for a string, else exact name or `.suffix` match."""
        if isinstance(self.target_modules, str):
            hit = re.fullmatch(self.target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in self.target_modules)
        if hit and self.layers is not None:
            m = _LAYER.search(name)
            hit = m is not None and int(m.group(1)) in set(self.layers)
        return hit

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        return _pattern(self.rank_pattern, name, self.r), _pattern(self.alpha_pattern, name, self.alpha)

    def to_peft(self, base_model_name: str | None) -> dict[str, Any]:
        """The `adapter_config.json` fields PEFT needs to rebuild the same adapter (unset ones take its defaults)."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
            "target_modules": self.target_modules if isinstance(self.target_modules, str)
            else sorted(self.target_modules),
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, d: dict[str, Any], source: str = CONFIG_FILE) -> LoraConfig:
        """Read PEFT's config dict, refusing the variants whose forward differs from plain LoRA."""
        if d.get("peft_type", "LORA") != "LORA":
            raise FormatError(f"{source}: peft_type={d.get('peft_type')!r}; only LORA adapters are supported")
        for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False)):
            if d.get(key, plain) not in (plain, None):
                raise FormatError(f"{source}: {key}={d[key]!r} is not supported (plain LoRA needs {plain!r})")
        if d.get("modules_to_save"):
            raise FormatError(f"{source}: modules_to_save={d['modules_to_save']!r} is not supported")
        layers = d.get("layers_to_transform")
        targets = d.get("target_modules")
        if not targets:
            targets = ("q_proj", "v_proj")  # PEFT's default map for Gemma models
        return cls(
            r=int(d.get("r", 8)), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            layers=[layers] if isinstance(layers, int) else layers, use_rslora=bool(d.get("use_rslora", False)),
            rank_pattern={k: int(v) for k, v in (d.get("rank_pattern") or {}).items()},
            alpha_pattern={k: float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
        )


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT: the key matches a trailing part of the module name
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoraLinear(nn.Module):
    """A linear layer plus a low-rank update; `weight`/`bias` are the base layer's own parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, [out, in], in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (exact in fp32; rounds to the base dtype otherwise)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` holding this layer's (possibly merged) base weight."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, " \
               f"merged={self.merged}"


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def lora_modules(module: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLinear):
            yield name, sub


def apply_lora(module: nn.Module, config: LoraConfig, freeze_base: bool = True,
               dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap every `nn.Linear` that `config` targets; returns the wrapped module names.

    With `freeze_base` (PEFT's behaviour) every other parameter stops requiring gradients, so an optimizer over
    `lora_parameters(module)` trains only the adapters.
    """
    if any(True for _ in lora_modules(module)):
        raise InputError("the module already has LoRA adapters; call merge_lora or remove_lora first")
    chosen = [(name, sub) for name, sub in module.named_modules()
              if isinstance(sub, nn.Linear) and config.targets(name)]
    if not chosen:
        raise InputError(f"LoraConfig.target_modules={config.target_modules!r} (layers={config.layers}) matches no "
                         "nn.Linear in the module; Gemma's are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                         "down_proj (a quantised model's Int8Linear/Int4Linear layers cannot take adapters: load it "
                         "with dtype='float32' or 'bfloat16')")
    if freeze_base:
        module.requires_grad_(False)
    for name, sub in chosen:
        r, alpha = config.rank_and_alpha(name)
        _set_submodule(module, name, LoraLinear(sub, r, alpha, config.dropout, config.use_rslora, dtype))
    module.lora_config = config  # what save_adapter writes to adapter_config.json
    return [name for name, _ in chosen]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every wrapped layer), for the optimizer."""
    return [p for _, sub in lora_modules(module) for p in (sub.lora_A.weight, sub.lora_B.weight)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`{<module name>.lora_A.weight: A, <module name>.lora_B.weight: B}` in the module's own names."""
    out: dict[str, torch.Tensor] = {}
    for name, sub in lora_modules(module):
        out[f"{name}.lora_A.weight"] = sub.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = sub.lora_B.weight.detach()
    return out


def merge_lora(module: nn.Module, unload: bool = True) -> list[str]:
    """Fold every adapter into its base weight (PEFT's `merge_and_unload`); returns the merged names.

    With `unload` the wrappers are replaced by plain `nn.Linear`s, so the module is an ordinary model again
    (exportable, mergeable); without it they stay, marked merged, and `unmerge_lora` can take the update out.
    """
    names = []
    for name, sub in list(lora_modules(module)):
        sub.merge()
        if unload:
            _set_submodule(module, name, sub.to_linear())
        names.append(name)
    if unload:
        module.__dict__.pop("lora_config", None)
    return names


def unmerge_lora(module: nn.Module) -> None:
    for _, sub in lora_modules(module):
        sub.unmerge()


def remove_lora(module: nn.Module) -> list[str]:
    """Drop every adapter (taking merged updates back out first), restoring the base model's layers."""
    names = []
    for name, sub in list(lora_modules(module)):
        sub.unmerge()
        _set_submodule(module, name, sub.to_linear())
        names.append(name)
    module.__dict__.pop("lora_config", None)
    return names


def save_adapter(module: nn.Module, directory: str | Path, config: LoraConfig | None = None,
                 base_model_name: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as PEFT does, so `PeftModel.from_pretrained`
    loads them onto the transformers model of the same base. `config` defaults to the one `apply_lora` used."""
    state = lora_state_dict(module)
    if not state:
        raise InputError("the module has no LoRA adapters to save; call apply_lora first")
    config = config or getattr(module, "lora_config", None)
    if config is None:
        raise InputError("save_adapter needs the LoraConfig the adapters were made with (config=...)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_peft(base_model_name), indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, `{module name}.lora_A.weight`-keyed tensors) of a PEFT adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.exists():
        raise FormatError(f"{directory}: no {CONFIG_FILE}; expected a PEFT LoRA adapter directory")
    if not weights_path.exists():
        raise FormatError(f"{directory}: no {WEIGHTS_FILE} (adapter_model.bin is not read: pickle is unsafe)")
    try:
        config = LoraConfig.from_peft(json.loads(config_path.read_text()), str(config_path))
    except json.JSONDecodeError as e:
        raise FormatError(f"{config_path}: not valid JSON ({e})") from e
    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{weights_path}: cannot read safetensors file: {e}") from e
    tensors = {}
    for key, tensor in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)  # in-memory `.default.` form
        if not re.search(r"\.lora_[AB]\.weight$", name):
            raise FormatError(f"{weights_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are read)")
        tensors[name] = tensor
    return config, tensors


def load_adapter(module: nn.Module, directory: str | Path, freeze_base: bool = True) -> list[str]:
    """Wrap the layers a saved PEFT adapter names and load its A/B weights; returns the wrapped names."""
    config, tensors = read_adapter(directory)
    wanted = sorted({k.rsplit(".", 2)[0] for k in tensors})
    known = dict(module.named_modules())
    missing = [n for n in wanted if not isinstance(known.get(n), nn.Linear)]
    if missing:
        raise FormatError(f"{directory}: adapter targets {missing[:3]} which are not linear layers of this model")
    config = LoraConfig(**{**config.__dict__, "target_modules": "|".join(re.escape(n) for n in wanted),
                           "layers": None})
    ranks = {name: tensors[f"{name}.lora_A.weight"].shape[0] for name in wanted}
    names = apply_lora(module, config, freeze_base)
    for name in names:
        sub = module.get_submodule(name)
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        if (a.shape[0] != sub.r or tuple(a.shape[1:]) != (sub.in_features,)
                or tuple(b.shape) != (sub.out_features, ranks[name])):
            raise FormatError(f"{directory}: {name} has lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected "
                              f"[{sub.r}, {sub.in_features}] / [{sub.out_features}, {sub.r}] (r from the config)")
        with torch.no_grad():
            sub.lora_A.weight.copy_(a)
            sub.lora_B.weight.copy_(b)
    return names
