"""Load and save SAEs in the three formats released SAEs come in; `load_sae` tells them apart by their files.

- Gemma Scope 1 (Gemma 2): `params.npz` with W_enc, W_dec, b_enc, b_dec, threshold; layer, width and L0 live
  only in the folder names (`gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz`).
- Gemma Scope 2 (Gemma 3): `params.safetensors` with lower-case keys (w_enc, w_dec, ...) and a `config.json`
  naming the site by Hugging Face hook point (`model.layers.9.output`).
- SAELens: `cfg.json` + `sae_weights.safetensors`; the site is a TransformerLens hook name. Our own SAEs are
  saved this way by default, so SAELens can read them too.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gemmakit.errors import FormatError, GemmaKitError, InputError
from gemmakit.scope.sae import SAE, JumpReLUSAE, SAEInfo, TopKSAE, make_sae
from gemmakit.scope.sites import parse_site

FORMATS = ("gemma_scope_1", "gemma_scope_2", "saelens")
GS1_FILE, GS2_FILE, GS2_CONFIG = "params.npz", "params.safetensors", "config.json"
SAELENS_FILE, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
_WIDTH_LABELS = {"4k": 4096, "16k": 16384, "32k": 32768, "65k": 65536, "131k": 131072, "262k": 262144,
                 "524k": 524288, "1m": 1048576}
_GS1_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}


def width_label(d_sae: int) -> str:
    """16384 -> "16k" (Gemma Scope's folder spelling); other widths are written out."""
    for label, n in _WIDTH_LABELS.items():
        if n == d_sae:
            return label
    return str(d_sae)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format name, folder) for an SAE folder or one of its files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    folder = p if p.is_dir() else p.parent
    if p.is_file():
        if p.name == GS1_FILE or p.suffix == ".npz":
            return "gemma_scope_1", p
        if p.name in (SAELENS_FILE, SAELENS_CONFIG):
            return "saelens", folder
        if p.name in (GS2_FILE, GS2_CONFIG):
            return "gemma_scope_2", folder
    if (folder / GS1_FILE).exists():
        return "gemma_scope_1", folder / GS1_FILE
    if (folder / GS2_FILE).exists():
        return "gemma_scope_2", folder
    if (folder / SAELENS_FILE).exists():
        return "saelens", folder
    raise FormatError(f"{p}: not an SAE; expected {GS1_FILE} (Gemma Scope 1), {GS2_FILE} + {GS2_CONFIG} "
                      f"(Gemma Scope 2) or {SAELENS_CONFIG} + {SAELENS_FILE} (SAELens)")


def load_sae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from a folder or file in any of the three formats."""
    fmt, where = detect_format(path)
    loader = {"gemma_scope_1": _load_gs1, "gemma_scope_2": _load_gs2, "saelens": _load_saelens}[fmt]
    sae = loader(where)
    sae.info.extra.setdefault("format", fmt)
    return sae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_sae(sae: SAE, path: str | Path, format: str = "saelens") -> Path:  # noqa: A002 - the natural name
    """Write `sae` into folder `path` in `format`; returns the folder."""
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if format == "saelens":
        _save_saelens(sae, folder)
    elif format in ("gemma_scope_1", "gemma_scope_2"):
        if not isinstance(sae, JumpReLUSAE):
            raise InputError(f"{folder}: Gemma Scope formats hold JumpReLU SAEs only; save a "
                             f"{sae.architecture} SAE with format='saelens'")
        (_save_gs1 if format == "gemma_scope_1" else _save_gs2)(sae, folder)
    else:
        raise InputError(f"unknown SAE format {format!r}; expected one of {', '.join(FORMATS)}")
    return folder


# --- Gemma Scope 1 --------------------------------------------------------------------------------------------
def gs1_info(file: Path) -> SAEInfo:
    """Layer, site, width and L0 from the folder names, the only place Gemma Scope 1 records them."""
    info = SAEInfo()
    text = file.as_posix()
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"gemma-scope-[^/]*-(res|mlp|att)(?:[-/]|$)", text)
    if layer and kind:
        info.site = f"layers.{layer.group(1)}.{_GS1_SITES[kind.group(1)]}"
    l0 = re.search(r"average_l0_(\d+)", text)
    if l0:
        info.target_l0 = float(l0.group(1))
    width = re.search(r"width_(\w+?)(?:/|$)", text)
    if width:
        info.extra["width_label"] = width.group(1)
    if layer:
        info.extra["layer"] = int(layer.group(1))
    model = re.search(r"gemma-scope-(\d+b)-(pt|it)", text)
    if model:
        info.model_name = f"google/gemma-2-{model.group(1)}"
    return info


def _load_gs1(file: Path) -> SAE:
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise FormatError(f"{file}: not a readable Gemma Scope params.npz ({e})") from e
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(v.astype(np.float32, copy=False))
               for k, v in arrays.items()}
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise FormatError(f"{file}: has a non-trivial scaling_factor, which this loader does not fold")
    return _build_jumprelu(tensors, gs1_info(file), str(file))


def _save_gs1(sae: JumpReLUSAE, folder: Path) -> None:
    arrays = {k: v.float().cpu().numpy() for k, v in sae.tensors().items()}
    np.savez(folder / GS1_FILE, **arrays)


# --- Gemma Scope 2 --------------------------------------------------------------------------------------------
def _load_gs2(folder: Path) -> SAE:
    config_path = folder / GS2_CONFIG
    config = _read_json(config_path) if config_path.exists() else {}
    kind = config.get("type", "sae")
    hook_in, hook_out = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
    if kind != "sae" or config.get("affine_connection") or (hook_in and hook_out and hook_in != hook_out):
        raise FormatError(f"{config_path}: a Gemma Scope 2 {kind} (hooks {hook_in} -> {hook_out}); only SAEs "
                          "(same hook in and out, no affine skip) are supported")
    arch = config.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise FormatError(f"{config_path}: architecture {arch!r}; Gemma Scope 2 SAEs are 'jump_relu'")
    tensors = _read_safetensors(folder / GS2_FILE)
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    info = SAEInfo(model_name=config.get("model_name"), target_l0=_float_or_none(config.get("l0")))
    if hook_in:
        try:
            info.site = str(parse_site(hook_in))
        except GemmaKitError:
            info.extra["hf_hook_point_in"] = hook_in
    info.extra.update({k: v for k, v in config.items() if k not in ("model_name", "l0")})
    sae = _build_jumprelu(tensors, info, str(folder / GS2_FILE))
    if "width" in config and int(config["width"]) != sae.d_sae:
        raise FormatError(f"{config_path}: width {config['width']} but the weights have d_sae={sae.d_sae}")
    return sae


def _save_gs2(sae: JumpReLUSAE, folder: Path) -> None:
    tensors = {("w_" + k[2:] if k.startswith("W_") else k): v.float().contiguous().cpu()
               for k, v in sae.tensors().items()}
    save_file(tensors, str(folder / GS2_FILE))
    hook = parse_site(sae.info.site).hf_hook if sae.info.site else None
    config = {"width": sae.d_sae, "model_name": sae.info.model_name, "architecture": "jump_relu",
              "l0": sae.info.target_l0, "affine_connection": False, "hf_hook_point_in": hook,
              "hf_hook_point_out": hook, "type": "sae"}
    (folder / GS2_CONFIG).write_text(json.dumps(config, indent=2))


# --- SAELens ----------------------------------------------------------------------------------------------------
def _load_saelens(folder: Path) -> SAE:
    cfg_path = folder / SAELENS_CONFIG
    if not cfg_path.exists():
        raise FormatError(f"{folder}: has {SAELENS_FILE} but no {SAELENS_CONFIG}")
    cfg = _read_json(cfg_path)
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):  # the latter is folded into the weights on save
        raise FormatError(f"{cfg_path}: normalize_activations={norm!r} is not supported")
    tensors = _read_safetensors(folder / SAELENS_FILE)
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    ours = cfg.get("gemmakit") or {}
    hook = meta.get("hook_name", cfg.get("hook_name"))
    info = SAEInfo(model_name=meta.get("model_name", cfg.get("model_name")),
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
                   target_l0=_float_or_none(ours.get("target_l0")), extra=dict(ours.get("extra") or {}))
    info.site = ours.get("site")
    if info.site is None and hook:
        try:
            info.site = str(parse_site(hook))
        except GemmaKitError:
            info.extra["hook_name"] = hook
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{cfg_path}: needs integer d_in and d_sae ({e})") from e
    if arch == "jumprelu":
        sae: SAE = JumpReLUSAE(d_in, d_sae, info)
    elif arch == "topk":
        if "k" not in cfg:
            raise FormatError(f"{cfg_path}: a topk SAE without k")
        sae = TopKSAE(d_in, d_sae, int(cfg["k"]), info)
    else:
        raise FormatError(f"{cfg_path}: architecture {arch!r}; supported: jumprelu, topk")
    return sae.load_tensors(tensors, str(folder / SAELENS_FILE))


def _save_saelens(sae: SAE, folder: Path) -> None:
    site = parse_site(sae.info.site) if sae.info.site else None
    save_file({k: v.float().contiguous().cpu() for k, v in sae.tensors().items()}, str(folder / SAELENS_FILE))
    cfg: dict[str, Any] = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": sae.info.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "hook_z" if site and site.kind == "attn_out" else "none",
        "metadata": {"model_name": sae.info.model_name, "hook_name": site.tl_hook if site else None,
                     "hf_hook_name": site.hf_hook if site else None, "prepend_bos": True},
        "gemmakit": {"site": sae.info.site, "target_l0": sae.info.target_l0,
                     "extra": {k: v for k, v in sae.info.extra.items() if k != "format"}},
    }
    if isinstance(sae, TopKSAE):
        cfg["k"] = sae.k
    (folder / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))


# --- shared -------------------------------------------------------------------------------------------------------
def _build_jumprelu(tensors: dict[str, torch.Tensor], info: SAEInfo, source: str) -> SAE:
    if "W_enc" not in tensors or tensors["W_enc"].dim() != 2:
        raise FormatError(f"{source}: no 2-D W_enc among {sorted(tensors)}")
    d_in, d_sae = tensors["W_enc"].shape
    return make_sae("jumprelu", int(d_in), int(d_sae), info=info).load_tensors(tensors, source)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise FormatError(f"{file}: missing")
    try:
        return {k: v.float() for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{file}: not a readable safetensors file ({e})") from e


def _read_json(file: Path) -> dict[str, Any]:
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{file}: not readable JSON ({e})") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{file}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _float_or_none(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None
