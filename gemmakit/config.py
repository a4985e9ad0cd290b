"""`GemmaConfig`: every number that decides a Gemma model's shape and numerics, as plain data.

Model sizes are data, not code: one preset per released text size, plus constructors from a Hugging Face
`config.json` and from GGUF metadata. Values llama.cpp leaves implicit in GGUF files (local rope base, the
5:1 sliding pattern, the query scale, Gemma 2's window) are filled in here, in one place.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit.errors import ConfigError

FAMILIES = ("gemma", "gemma2", "gemma3")
SLIDING = "sliding"
GLOBAL = "global"


@dataclass(frozen=True)
class GemmaConfig:
    """Hyperparameters of one Gemma text model (any generation).

    `family` is "gemma" (Gemma 1), "gemma2" or "gemma3"; it selects the block layout (pre-norm vs sandwich
    norms) and is otherwise redundant with the explicit numbers, which always win.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int = 8192
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_theta_global: float = 10_000.0
    rope_theta_local: float = 10_000.0
    rope_scale_global: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    use_qk_norm: bool = False
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown Gemma family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.family, self.num_layers))
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}")
        bad = set(self.layer_types) - {SLIDING, GLOBAL}
        if bad:
            raise ConfigError(f"unknown layer types {sorted(bad)}; expected {SLIDING!r} or {GLOBAL!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a sliding_window > 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    # --- derived values -------------------------------------------------------------------------------------
    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2 and 3 normalise after attention and after the MLP as well as before."""
        return self.family != "gemma"

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope_theta(self, layer: int) -> float:
        return self.rope_theta_local if self.is_sliding(layer) else self.rope_theta_global

    def rope_scale(self, layer: int) -> float:
        """Linear rope scaling factor: Gemma 3 4B+ divide global layers' frequencies by 8, never local ones."""
        return 1.0 if self.is_sliding(layer) else self.rope_scale_global

    def num_parameters(self) -> int:
        """Parameter count (tied embedding counted once)."""
        d, q, kv, f = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        norms = (4 if self.sandwich_norms else 2) * d + (2 * self.head_dim if self.use_qk_norm else 0)
        per_layer = d * q * 2 + d * kv * 2 + 3 * d * f + norms
        return self.vocab_size * d + self.num_layers * per_layer + d

    def replace(self, **changes: Any) -> GemmaConfig:
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    # --- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> GemmaConfig:
        """A released size by name, e.g. "gemma3-270m", "gemma2-9b", "gemma-7b" (see `PRESETS`)."""
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_hf_config(cls, source: dict[str, Any] | str | Path) -> GemmaConfig:
        """Build from a transformers `config.json` (a dict, the file, or the model directory)."""
        where = "config"
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError as e:
                raise ConfigError(f"{where}: not found; an HF model directory needs a config.json") from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from e
        return _from_hf_dict(source, where)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "<gguf>") -> GemmaConfig:
        """Build from GGUF metadata, filling in what llama.cpp hard-codes instead of storing."""
        return _from_gguf(metadata, source)


def default_layer_types(family: str, num_layers: int) -> tuple[str, ...]:
    """Gemma 1: all global. Gemma 2: even layers local (layer 0 local). Gemma 3: every 6th layer global."""
    if family == "gemma":
        return (GLOBAL,) * num_layers
    if family == "gemma2":
        return tuple(SLIDING if (i + 1) % 2 else GLOBAL for i in range(num_layers))
    return tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(num_layers))


def _gemma1(name: str, **kw: Any) -> GemmaConfig:
    return GemmaConfig(family="gemma", vocab_size=256000, max_position=8192, name=name, **kw)


def _gemma2(name: str, **kw: Any) -> GemmaConfig:
    return GemmaConfig(
        family="gemma2", vocab_size=256000, max_position=8192, sliding_window=4096,
        attn_softcap=50.0, final_softcap=30.0, name=name, **kw,
    )


def _gemma3(name: str, vocab: int, ctx: int, window: int, scale: float, **kw: Any) -> GemmaConfig:
    return GemmaConfig(
        family="gemma3", vocab_size=vocab, max_position=ctx, sliding_window=window, rope_theta_local=10_000.0,
        rope_theta_global=1_000_000.0, rope_scale_global=scale, use_qk_norm=True, name=name, **kw,
    )


PRESETS: dict[str, GemmaConfig] = {
    "gemma-2b": _gemma1("gemma-2b", hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256,
                        intermediate_size=16384, query_pre_attn_scalar=256),
    "gemma-7b": _gemma1("gemma-7b", hidden_size=3072, num_layers=28, num_heads=16, num_kv_heads=16, head_dim=256,
                        intermediate_size=24576, query_pre_attn_scalar=256),
    "gemma2-2b": _gemma2("gemma2-2b", hidden_size=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                         intermediate_size=9216, query_pre_attn_scalar=256),
    "gemma2-9b": _gemma2("gemma2-9b", hidden_size=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
                         intermediate_size=14336, query_pre_attn_scalar=256),
    "gemma2-27b": _gemma2("gemma2-27b", hidden_size=4608, num_layers=46, num_heads=32, num_kv_heads=16,
                          head_dim=128, intermediate_size=36864, query_pre_attn_scalar=144),
    "gemma3-270m": _gemma3("gemma3-270m", 262144, 32768, 512, 1.0, hidden_size=640, num_layers=18, num_heads=4,
                           num_kv_heads=1, head_dim=256, intermediate_size=2048, query_pre_attn_scalar=256),
    "gemma3-1b": _gemma3("gemma3-1b", 262144, 32768, 512, 1.0, hidden_size=1152, num_layers=26, num_heads=4,
                         num_kv_heads=1, head_dim=256, intermediate_size=6912, query_pre_attn_scalar=256),
    "gemma3-4b": _gemma3("gemma3-4b", 262208, 131072, 1024, 8.0, hidden_size=2560, num_layers=34, num_heads=8,
                         num_kv_heads=4, head_dim=256, intermediate_size=10240, query_pre_attn_scalar=256),
    "gemma3-12b": _gemma3("gemma3-12b", 262208, 131072, 1024, 8.0, hidden_size=3840, num_layers=48, num_heads=16,
                          num_kv_heads=8, head_dim=256, intermediate_size=15360, query_pre_attn_scalar=256),
    "gemma3-27b": _gemma3("gemma3-27b", 262208, 131072, 1024, 8.0, hidden_size=5376, num_layers=62, num_heads=32,
                          num_kv_heads=16, head_dim=128, intermediate_size=21504, query_pre_attn_scalar=168),
}

_HF_FAMILY = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return d[key]


def _from_hf_dict(d: dict[str, Any], where: str) -> GemmaConfig:
    model_type = d.get("model_type")
    if model_type == "gemma3" and "text_config" in d:  # multimodal wrapper: the text model is nested
        d = {**d["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in _HF_FAMILY:
        raise ConfigError(
            f"{where}: unknown architecture model_type={model_type!r}; gemmakit reads Gemma text models "
            f"({', '.join(sorted(_HF_FAMILY))})"
        )
    family = _HF_FAMILY[model_type]
    heads = int(_require(d, "num_attention_heads", where))
    hidden = int(_require(d, "hidden_size", where))
    head_dim = int(d.get("head_dim") or hidden // heads)
    layers = int(_require(d, "num_hidden_layers", where))
    types = d.get("layer_types")
    layer_types = tuple(SLIDING if t == "sliding_attention" else GLOBAL for t in types) if types else ()
    theta_global, theta_local, scale = _hf_rope(d, family)
    window = d.get("sliding_window") if family != "gemma" else None
    if family == "gemma3" and d.get("use_bidirectional_attention"):
        raise ConfigError(f"{where}: bidirectional (embedding) Gemma 3 models are not causal LMs; not supported")
    eos = d.get("eos_token_id", 1)
    return GemmaConfig(
        family=family,
        vocab_size=int(_require(d, "vocab_size", where)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(_require(d, "intermediate_size", where)),
        max_position=int(d.get("max_position_embeddings", 8192)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or head_dim),
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        rope_theta_global=theta_global,
        rope_theta_local=theta_local,
        rope_scale_global=scale,
        attn_softcap=d.get("attn_logit_softcapping"),
        final_softcap=d.get("final_logit_softcapping"),
        use_qk_norm=family == "gemma3",
        bos_id=int(d.get("bos_token_id") if d.get("bos_token_id") is not None else 2),
        eos_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 1)),
        pad_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else 0),
        name=str(d.get("_name_or_path", "")),
    )


def _hf_rope(d: dict[str, Any], family: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear scale) from either old or new transformers rope keys."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
        theta_g = float(full.get("rope_theta", 1_000_000.0 if family == "gemma3" else 10_000.0))
        theta_l = float(local.get("rope_theta", 10_000.0))
        return theta_g, theta_l, _linear_factor(full)
    if isinstance(params, dict):  # single rope dict (Gemma 1/2 in transformers 5)
        theta = float(params.get("rope_theta", 10_000.0))
        return theta, theta, _linear_factor(params)
    default_g = 1_000_000.0 if family == "gemma3" else 10_000.0
    theta_g = float(d.get("rope_theta", default_g))
    theta_l = float(d.get("rope_local_base_freq", 10_000.0 if family == "gemma3" else theta_g))
    return theta_g, theta_l, _linear_factor(d.get("rope_scaling") or {})


def _linear_factor(rope: dict[str, Any]) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ConfigError(f"unsupported rope scaling type {kind!r}; Gemma uses only 'linear'")
    return float(rope.get("factor", 1.0))


def _from_gguf(meta: dict[str, Any], source: str) -> GemmaConfig:
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise ConfigError(f"{source}: unknown architecture general.architecture={arch!r}; expected gemma, gemma2 "
                          "or gemma3")

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is None:
            raise ConfigError(f"{source}: GGUF metadata lacks {full!r}")
        return default

    hidden = int(get("embedding_length"))
    layers = int(get("block_count"))
    heads = int(get("attention.head_count"))
    kv = get("attention.head_count_kv", heads)
    head_dim = int(get("attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else 0
    if not vocab:
        raise ConfigError(f"{source}: cannot tell the vocabulary size (no tokenizer.ggml.tokens)")
    # llama.cpp derives the query scale from the size: 27B models use d_model / heads, others head_dim.
    is_27b = (arch == "gemma2" and layers == 46) or (arch == "gemma3" and layers == 62)
    qscale = hidden / heads if is_27b else head_dim
    common: dict[str, Any] = dict(
        family=arch, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(kv), head_dim=head_dim, intermediate_size=int(get("feed_forward_length")),
        max_position=int(get("context_length", 8192)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)), query_pre_attn_scalar=float(qscale),
        bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)), eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)), name=str(meta.get("general.name", "")),
    )
    if arch == "gemma":
        theta = float(get("rope.freq_base", 10_000.0))
        return GemmaConfig(**common, rope_theta_global=theta, rope_theta_local=theta)
    if arch == "gemma2":
        theta = float(get("rope.freq_base", 10_000.0))
        return GemmaConfig(
            **common, sliding_window=int(get("attention.sliding_window", 4096)),
            rope_theta_global=theta, rope_theta_local=theta,
            attn_softcap=float(get("attn_logit_softcapping", 50.0)),
            final_softcap=float(get("final_logit_softcapping", 30.0)),
        )
    pattern = int(get("attention.sliding_window_pattern", 6))
    if f"{arch}.rope.scaling.factor" in meta:
        scale = float(meta[f"{arch}.rope.scaling.factor"])
    else:  # released 4B/12B/27B use x8 on global layers; 270M and 1B use none
        scale = 8.0 if layers >= 34 else 1.0
    final_cap = meta.get(f"{arch}.final_logit_softcapping")
    return GemmaConfig(
        **common, sliding_window=int(get("attention.sliding_window", 512 if layers <= 26 else 1024)),
        layer_types=tuple(SLIDING if (i + 1) % pattern else GLOBAL for i in range(layers)),
        rope_theta_global=float(get("rope.freq_base", 1_000_000.0)),
        rope_theta_local=float(get("rope.freq_base_swa", 10_000.0)),
        rope_scale_global=scale, use_qk_norm=True,
        final_softcap=float(final_cap) if final_cap else None,
    )



def _f32(value: Any) -> float:
    """GGUF stores floats as f32: 1e-6 arrives as 9.99999997e-07. Keep the 7 significant digits f32 holds."""
    return float(f"{float(value):.7g}")
