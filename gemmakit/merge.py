"""Model merging: each method a small function over aligned tensors, plus a streamed mergekit-style recipe runner.

Formulas follow mergekit (`merge_methods/*.py`, `sparsify.py`) so that the same recipe gives the same weights;
δ_i = θ_i − θ_base throughout. WARP's three steps (EMA anchor, SLERP of task vectors relative to the init,
LITI towards the init) are here too, since they are the same kind of tensor arithmetic.

`run_recipe` never holds a whole model: it opens every input's safetensors lazily (`safe_open`), reads one
tensor name at a time from all inputs, merges it, and appends it to the output shard being filled, which is
written as soon as it reaches `shard_size`. Peak memory is about (largest tensor × number of inputs) plus one
output shard.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gemmakit.errors import ConfigError, FormatError, InputError

DOT_THRESHOLD = 0.9995  # mergekit: beyond this |cos| the two tensors count as parallel and SLERP falls back to LERP
EPS = 1e-8


def _work(t: torch.Tensor) -> torch.Tensor:
    """Merge arithmetic runs in fp32 (fp64 stays fp64), whatever the storage dtype."""
    return t.double() if t.dtype == torch.float64 else t.float()


# --- methods over aligned tensors --------------------------------------------------------------------------------
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Σ w_i θ_i, divided by Σ w_i when `normalize` (mergekit's default, the usual surprise: issue #214)."""
    if len(weights) != len(tensors) or not tensors:
        raise InputError(f"linear merge: {len(tensors)} tensors but {len(weights)} weights")
    out = _work(tensors[0]) * weights[0]  # accumulate in place: one working tensor, whatever the number of inputs
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(_work(t), alpha=w)
    if normalize:
        total = sum(weights)
        if abs(total) < EPS:
            raise InputError(f"linear merge: weights {list(weights)} sum to 0; cannot normalise (set normalize: false)")
        out /= total
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (t = 0 gives `a`), mergekit's rule.

    The angle comes from the normalised flattened tensors; the coefficients multiply the original (unnormalised)
    tensors. When |cos| > `dot_threshold` the arc is numerically degenerate and plain LERP is used instead.
    """
    v0, v1 = _work(a).flatten(), _work(b).flatten()
    n0, n1 = v0.norm(), v1.norm()
    n0 = n0 if n0 > EPS else torch.ones_like(n0)
    n1 = n1 if n1 > EPS else torch.ones_like(n1)
    dot = float(((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return ((1 - t) * v0 + t * v1).view(a.shape)
    theta = math.acos(dot)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return (s0 * v0 + s1 * v1).view(a.shape)


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density · numel)` largest |δ| entries of the whole tensor (at least one), zero the rest."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().flatten().float(), descending=True)[:k]] = 1
    return delta * mask.view_as(delta)


RESCALES = ("l1", "inverse_density", "none")


def random_prune(delta: torch.Tensor, density: float, rescale: str = "l1",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli), then rescale.

    Rescale rules, named because the libraries differ: "l1" multiplies by ‖δ‖₁ / ‖masked‖₁ (mergekit since
    a2dda31, its default); "inverse_density" divides by the density, i.e. 1/(1−p) as in the DARE paper and PEFT;
    "none" keeps the masked values.
    """
    if rescale not in RESCALES:
        raise InputError(f"DARE rescale must be one of {', '.join(RESCALES)}; got {rescale!r}")
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, float(density)), generator=generator).to(delta.dtype)
    masked = delta * mask
    if rescale == "inverse_density":
        return masked / density
    if rescale == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            return masked * (before / after)
    return masked


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    densities: Sequence[float] | None = None, sparsify: str | None = None,
                    consensus: str | None = None, normalize: bool = False, lam: float = 1.0,
                    rescale: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit's generalised task arithmetic: base + λ · combine(w_i · sparsify(δ_i)).

    `sparsify` is None, "magnitude" (TIES) or "random" (DARE); `consensus` None or "sum" (TIES sign election:
    sign of Σ w_i δ_i, zero counted positive, keep entries agreeing with it and divide by the sum of agreeing
    weights when `normalize`) or "count" (majority of signs).
    """
    b = _work(base)
    densities = densities if densities is not None else [1.0] * len(tensors)
    deltas = []
    for t, d in zip(tensors, densities, strict=True):
        delta = _work(t) - b
        if sparsify == "magnitude":
            delta = magnitude_prune(delta, d)
        elif sparsify == "random":
            delta = random_prune(delta, d, rescale, generator)
        elif sparsify is not None:
            raise InputError(f"unknown sparsification {sparsify!r}; expected 'magnitude' or 'random'")
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * base.dim()))
    weighted = stacked * w
    if consensus is not None:
        if consensus == "sum":
            majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        elif consensus == "count":
            majority = torch.where(weighted.sign().sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        else:
            raise InputError(f"unknown consensus {consensus!r}; expected 'sum' (TIES) or 'count'")
        mask = (weighted.sign() == majority).to(stacked.dtype)
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < EPS] = 1
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         normalize: bool = True, lam: float = 1.0) -> torch.Tensor:
    """TIES: trim each δ to its top-density magnitudes, elect signs by weighted sum, disjoint (normalised) mean."""
    return task_arithmetic(base, tensors, weights, densities, "magnitude", "sum", normalize, lam)


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         rescale: str = "l1", consensus: str | None = None, normalize: bool = False, lam: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (drop and rescale) on each δ, then a weighted sum (dare_linear) or TIES sign election (dare_ties)."""
    return task_arithmetic(base, tensors, weights, densities, "random", consensus, normalize, lam, rescale, generator)


# --- WARP (arXiv 2406.16768) ---------------------------------------------------------------------------------------
def ema_update(ema: torch.Tensor, current: torch.Tensor, mu: float) -> torch.Tensor:
    """WARP's anchor: θ_ema ← (1 − μ) θ_ema + μ θ, in place (μ = 0.01 in the paper's defaults)."""
    return ema.mul_(1 - mu).add_(current.detach().to(ema.dtype), alpha=mu)


class EMAWeights:
    """An exponential moving average of a module's parameters, updated once per optimizer step."""

    def __init__(self, module: torch.nn.Module, mu: float) -> None:
        if not 0 < mu <= 1:
            raise InputError(f"EMA rate mu must lie in (0, 1], got {mu}")
        self.mu = mu
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            ema_update(self.shadow[name], p, self.mu)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)


def slerp_task_vectors(init: torch.Tensor, tensors: Sequence[torch.Tensor], lam: float | None = None,
                       dot_threshold: float = DOT_THRESHOLD) -> torch.Tensor:
    """WARP's SLERP of task vectors δ_m = θ_m − θ_init, one angle per tensor (i.e. per layer weight).

    M = 2: θ_init + sin((1−λ)Ω)/sin Ω · δ_1 + sin(λΩ)/sin Ω · δ_2, preserving ‖δ‖ where LERP shrinks it.
    M > 2: iterative, slerp(slerp(θ_1..θ_{M−1}), θ_M, λ = 1/M) (App. B.3); `lam` applies to M = 2 only.
    """
    if not tensors:
        raise InputError("slerp_task_vectors needs at least one fine-tuned tensor")
    i = _work(init)
    merged = _work(tensors[0]) - i
    for m, t in enumerate(tensors[1:], start=2):
        step = lam if (lam is not None and len(tensors) == 2) else 1.0 / m
        merged = slerp(merged, _work(t) - i, step, dot_threshold)
    return i + merged


def liti(init: torch.Tensor, merged: torch.Tensor, eta: float) -> torch.Tensor:
    """LITI: (1 − η) θ_init + η θ_merged, the next iteration's init (η = 0.3 in WARP)."""
    return (1 - eta) * _work(init) + eta * _work(merged)


# --- recipes -------------------------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    path: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A mergekit-style YAML recipe: `merge_method`, `models` (each with `parameters`), `base_model`,
    global `parameters`, `dtype`, `tokenizer_source`, `random_seed`. Values may be scalars, gradient lists
    (interpolated over layer position) or `[{filter: substring, value: ...}, ..., {value: fallback}]`."""

    method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = "base"
    random_seed: int = 0
    source: str = "<recipe>"


METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "warp")
NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "warp"}


def read_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such recipe file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return parse_recipe(doc, str(path), base_dir=path.parent)


def parse_recipe(doc: Any, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a recipe is a mapping with merge_method and models")
    if "slices" in doc:
        raise ConfigError(f"{source}: 'slices' (layer ranges) are not supported; list whole models under 'models'")
    method = doc.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"{source}: merge_method={method!r}; expected one of {', '.join(METHODS)}")

    def where(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or base_dir is None or not (base_dir / q).exists() else base_dir / q)

    entries = []
    for i, m in enumerate(doc.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"{source}: models[{i}] needs a 'model' path")
        entries.append(ModelEntry(where(str(m["model"])), dict(m.get("parameters") or {})))
    base = where(doc.get("base_model"))
    if method in NEEDS_BASE and base is None:
        raise ConfigError(f"{source}: merge_method {method} needs base_model")
    others = [e for e in entries if e.path != base]
    if not others:
        raise ConfigError(f"{source}: no models to merge besides the base")
    if method == "slerp" and len(others) != 1:
        raise ConfigError(f"{source}: slerp merges exactly two models (base_model and one other), got "
                          f"{len(others) + 1}")
    tokenizer = doc.get("tokenizer")
    tokenizer_source = doc.get("tokenizer_source", tokenizer.get("source", "base") if isinstance(tokenizer, dict)
                               else "base")
    if tokenizer_source not in (None, "base") and not Path(str(tokenizer_source)).is_dir():
        raise ConfigError(f"{source}: tokenizer_source={tokenizer_source!r}; use 'base' or an HF directory "
                          "('union' vocabularies are not supported)")
    return Recipe(method, entries, base, dict(doc.get("parameters") or {}), doc.get("dtype"), tokenizer_source,
                  int(doc.get("random_seed", 0)), source)


def evaluate(setting: Any, name: str, t: float) -> Any:
    """mergekit's `evaluate_setting`: scalars as they are, numeric lists interpolated at t, filters first-match."""
    if isinstance(setting, dict) and ("filter" in setting or "value" in setting):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            f = cond.get("filter") if isinstance(cond, dict) else None
            if f is None or f == "*" or f in name:
                return evaluate(cond.get("value") if isinstance(cond, dict) else cond, name, t)
        return None
    raise ConfigError(f"parameter value {setting!r} is neither a scalar, a list nor a filter list")


class _Inputs:
    """Lazy tensors of one HF directory, under canonical names (the tied lm_head dropped)."""

    def __init__(self, directory: str, stack: ExitStack) -> None:
        from gemmakit.weights.hf import canonical_name, shard_files

        self.directory = directory
        self.where: dict[str, tuple[Any, str]] = {}
        for path in shard_files(Path(directory)):
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{path}: cannot open safetensors file: {e}") from e
            for key in handle.keys():
                canon = canonical_name(key)
                if canon is not None and canon != "lm_head.weight":
                    self.where[canon] = (handle, key)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise FormatError(f"{self.directory}: has no tensor {name!r}, which the base model has; models to "
                              "merge must share an architecture")
        handle, key = self.where[name]
        return handle.get_tensor(key)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t for gradient lists: i / (L − 1) for layer i; 0 for embeddings and the final norm."""
    m = _LAYER.match(name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _merge_one(recipe: Recipe, name: str, t: float, base: torch.Tensor | None, others: list[torch.Tensor],
               generator: torch.Generator) -> torch.Tensor:
    g = {k: evaluate(v, name, t) for k, v in recipe.parameters.items()}
    entries = [e for e in recipe.models if e.path != recipe.base_model]

    def per_model(key: str, default: Any = None) -> list[Any]:
        values = []
        for e in entries:
            value = evaluate(e.parameters.get(key, g.get(key, default)), name, t)
            if value is None:
                raise ConfigError(f"{recipe.source}: model {e.path} needs parameter {key!r} for tensor {name}")
            values.append(value)
        return values

    method, lam = recipe.method, float(g.get("lambda", 1.0))
    if method == "slerp":
        tv = g.get("t")
        if tv is None:
            raise ConfigError(f"{recipe.source}: slerp needs parameter 't' for tensor {name}")
        return slerp(base, others[0], float(tv))
    if method == "warp":
        merged = slerp_task_vectors(base, others, g.get("lambda_slerp"))
        return liti(base, merged, float(g.get("eta", 1.0)))
    weights = [float(w) for w in per_model("weight")]
    if method == "task_arithmetic":
        return task_arithmetic(base, others, weights, normalize=bool(g.get("normalize", False)), lam=lam)
    densities = [float(d) for d in per_model("density", 1.0)]
    if method == "ties":
        return ties(base, others, weights, densities, bool(g.get("normalize", True)), lam)
    rescale = g.get("rescale", True)
    rescale = "l1" if rescale is True else "none" if rescale is False else str(rescale)
    consensus = "sum" if method == "dare_ties" else None
    return dare(base, others, weights, densities, rescale, consensus, bool(g.get("normalize", False)), lam, generator)


def _output_dtype(recipe: Recipe, first: torch.Tensor) -> torch.dtype:
    from gemmakit.loader import DTYPES

    if recipe.dtype is None:
        return first.dtype
    if recipe.dtype not in DTYPES:
        raise ConfigError(f"{recipe.source}: dtype={recipe.dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[recipe.dtype]


def run_recipe(recipe: Recipe, out: str | Path, shard_size: int = 2 ** 30, progress: bool = True) -> Path:
    """Merge tensor by tensor into an HF directory `out` (config.json from the base, tokenizer files copied)."""
    from gemmakit.export import ShardWriter, copy_tokenizer_files, write_hf_config
    from gemmakit.weights.hf import read_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference_dir = recipe.base_model or recipe.models[0].path
    config = read_config(reference_dir)
    with ExitStack() as stack:
        base = _Inputs(recipe.base_model, stack) if recipe.base_model else None
        # for linear merges the base (if named) is one of the weighted models, in the order listed
        ordered = recipe.models if recipe.method == "linear" else [e for e in recipe.models
                                                                     if e.path != recipe.base_model]
        inputs = [_Inputs(e.path, stack) if (base is None or e.path != recipe.base_model) else base
                  for e in ordered]
        names = list((base or inputs[0]).where)
        writer = ShardWriter(out, shard_size)
        dtype = None
        for index, name in enumerate(_progress(names, progress)):
            t = layer_position(name, config.num_layers)
            generator = torch.Generator().manual_seed(recipe.random_seed * 1_000_003 + index)
            b = base.get(name) if base is not None else None
            tensors = [src.get(name) for src in inputs]
            shapes = {tuple(x.shape) for x in tensors + ([b] if b is not None else [])}
            if len(shapes) > 1:
                raise FormatError(f"{recipe.source}: tensor {name} has different shapes across models: "
                                  f"{sorted(shapes)}")
            if recipe.method == "linear":
                weights = [_linear_weight(recipe, e, name, t) for e in ordered]
                g_norm = evaluate(recipe.parameters.get("normalize", True), name, t)
                merged = linear(tensors, weights, bool(g_norm))
            else:
                merged = _merge_one(recipe, name, t, b, tensors, generator)
            dtype = dtype or _output_dtype(recipe, (b if b is not None else tensors[0]))
            writer.add(name, merged.to(dtype))
            del tensors, b, merged
        writer.close()
    write_hf_config(config, out, dtype)
    if recipe.tokenizer_source:
        source = reference_dir if recipe.tokenizer_source == "base" else recipe.tokenizer_source
        copy_tokenizer_files(source, out)
    return out


def _linear_weight(recipe: Recipe, entry: ModelEntry, name: str, t: float) -> float:
    value = evaluate(entry.parameters.get("weight", recipe.parameters.get("weight")), name, t)
    if value is None:
        raise ConfigError(f"{recipe.source}: model {entry.path} needs parameter 'weight' for tensor {name}")
    return float(value)


def _progress(items: Sequence[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="merging", unit="tensor")
