"""Converted (quantised) models on disk: one safetensors file per (source file, scheme), reused on later loads.

Reading a GGUF means dequantising k-quants in numpy and re-quantising for torch's kernels: tens of seconds.
The result is saved once as safetensors (the tensors exactly as the quantised module holds them, plus the
config, the scheme and the tokenizer's GGUF metadata in the header), so a later load only maps a file.

Cache key: a fingerprint of the source, sha256 over (size, mtime, first MiB, last MiB), not a hash of the
whole file. A full sha256 of a 250 MB GGUF costs about a second per load (more on a busy machine) and would
alone use half of the 2 s load budget; the fingerprint costs ~1 ms and still changes when the file is
replaced, rewritten, truncated or grown, or edited at either end (where GGUF keeps its header and the
tensor index). Only an in-place edit of middle bytes that also restores the mtime would be missed.
Directories (HF checkpoints) are fingerprinted over every file they hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError, InputError
from gemmakit.weights.aligned_safetensors import save_aligned, without_padding

FORMAT_VERSION = "3"  # 2: tensors 64-byte aligned (used in place from the memory map); 3: + the 3-bit ranker
_EDGE = 1 << 20


def cache_root() -> Path:
    """`$GEMMAKIT_CACHE`, else `~/.cache/gemmakit`."""
    env = os.environ.get("GEMMAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemmakit"


def fingerprint(path: str | Path) -> str:
    """A cheap content fingerprint of a file or directory (see the module docstring for why not full sha256)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        st = file.stat()
        h.update(f"{file.relative_to(path) if path.is_dir() else file.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(file, "rb") as f:
            h.update(f.read(_EDGE))
            if st.st_size > _EDGE:
                f.seek(max(_EDGE, st.st_size - _EDGE))
                h.update(f.read(_EDGE))
    return h.hexdigest()


def cache_path(source: str | Path, scheme_name: str) -> Path:
    """Where the conversion of `source` to `scheme_name` lives in the cache."""
    source = Path(source)
    return cache_root() / f"{source.stem}-{scheme_name}-{fingerprint(source)[:20]}-v{FORMAT_VERSION}.safetensors"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def tokenizer_metadata(source: Path) -> dict[str, Any] | None:
    """The `tokenizer.*` keys of a GGUF file (enough to rebuild its tokenizer), or None for other formats."""
    with open(source, "rb") as f:
        if source.is_dir() or f.read(4) != b"GGUF":
            return None
    from gemmakit.weights.gguf_reader import GGUFFile

    with GGUFFile(source) as g:
        return {k: _jsonable(v) for k, v in g.metadata.items() if k.startswith("tokenizer.")}


def save(module: torch.nn.Module, path: str | Path, scheme_name: str, source: str | Path,
         tensor_types: dict[str, str] | None = None) -> Path:
    """Write a quantised module as safetensors; the header carries what `load` needs to rebuild it."""

    path, source = Path(path), Path(source)
    config = dataclasses.asdict(module.config)
    config.pop("extra", None)
    tok = tokenizer_metadata(source) if not source.is_dir() else None
    meta = {
        "gemmakit.format": FORMAT_VERSION,
        "gemmakit.scheme": scheme_name,
        "gemmakit.config": json.dumps(config),
        "gemmakit.source": str(source.resolve()),
        "gemmakit.fingerprint": fingerprint(source),
        "gemmakit.tensor_types": json.dumps(tensor_types or {}),
        "gemmakit.tokenizer": json.dumps(tok) if tok is not None else "",
    }
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_aligned(state, tmp, meta)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file under the real name
    return path


def read_header(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("gemmakit.format") != FORMAT_VERSION:
        raise FormatError(f"{path}: not a gemmakit converted model of format v{FORMAT_VERSION} "
                          f"(found {meta.get('gemmakit.format')!r}); re-create it with `gemmakit quantize`")
    return meta


def load(path: str | Path):
    """(module, tokenizer, source, tensor_types) from a converted file; tensors are memory-mapped."""
    from safetensors.torch import load_file

    from gemmakit.quant import build_quantized
    from gemmakit.tokenizer import Tokenizer

    path = Path(path)
    meta = read_header(path)
    cfg = json.loads(meta["gemmakit.config"])
    cfg["layer_types"] = tuple(cfg["layer_types"])
    config = GemmaConfig(**cfg)
    # the file's tensors are 64-byte aligned (see aligned_safetensors), so they are used in place from the
    # memory map; a tensor that is not (a file written by another tool) is copied rather than risk torch's
    # int8/int4 kernels on a misaligned pointer (a SIGSEGV with torch 2.13)
    state = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in without_padding(load_file(str(path))).items()}
    module = build_quantized(config, state)
    module.quant_scheme = meta["gemmakit.scheme"]
    source = Path(meta["gemmakit.source"])
    if meta["gemmakit.tokenizer"]:
        tokenizer = Tokenizer.from_gguf_metadata(json.loads(meta["gemmakit.tokenizer"]), source=str(path))
    elif source.is_dir():
        tokenizer = Tokenizer.from_dir(source)
    else:
        raise FormatError(f"{path}: holds no tokenizer and its source {source} is not an HF directory")
    return module, tokenizer, source, json.loads(meta["gemmakit.tensor_types"])


def is_converted(path: str | Path) -> bool:
    """True for a safetensors file written by `save` (checked by its header, not its name)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        return False
    try:
        read_header(path)
    except Exception:
        return False
    return True


def convert(source: str | Path, scheme_name: str, out: str | Path | None = None, progress: bool = True) -> Path:
    """Read `source`, quantise it to `scheme_name` (tqdm bar per tensor), save to `out` or the cache."""
    from tqdm import tqdm

    from gemmakit.loader import build_model, read_checkpoint
    from gemmakit.quant import count_convertible, quantize_model, scheme

    scheme(scheme_name)  # validate before the slow read
    source = Path(source)
    out = Path(out) if out is not None else cache_path(source, scheme_name)
    if out.is_dir() or out.suffix != ".safetensors":
        raise InputError(f"{out}: the output must be a file name ending in .safetensors")
    start = time.perf_counter()
    checkpoint = read_checkpoint(source)
    module = build_model(checkpoint.config, checkpoint.state, torch.float32, checkpoint.source)
    del checkpoint.state
    with tqdm(total=count_convertible(module), desc=f"converting to {scheme_name}", unit="tensor",
              disable=not progress, leave=False) as bar:
        quantize_model(module, scheme_name, progress=bar.update)
    save(module, out, scheme_name, source, checkpoint.tensor_types)
    if progress:
        print(f"[gemmakit: converted {source.name} to {scheme_name} in {time.perf_counter() - start:.0f} s, "
              f"saved {out}]")
    return out


def cached(source: str | Path, scheme_name: str, progress: bool = True) -> Path:
    """The cached conversion of `source`, created on first use. Conversions of the same file to the same scheme
    in older formats are then deleted: each is a full copy of the weights that nothing reads any more."""
    path = cache_path(source, scheme_name)
    if path.exists():
        return path
    path = convert(source, scheme_name, path, progress)
    prefix = path.name[:path.name.rindex("-v") + 2]
    for old in path.parent.glob(f"{prefix}*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
            if progress:
                print(f"[gemmakit: removed {old.name}, an older format of the same conversion]")
    return path
