"""Converted (quantised) models on disk: one safetensors file per (source file, scheme), reused on later loads.

Reading a GGUF means dequantising k-quants in numpy and re-quantising for torch's kernels: tens of seconds.
The result is saved once as safetensors (the tensors exactly as the quantised module holds them, plus the
config, the scheme and the tokenizer's GGUF metadata in the header), so a later load only maps a file.
This module knows the file and where the cache keeps it; it neither builds nor quantises models (the one
pipeline that does is `gemmakit.loader`).

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
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError
from gemmakit.weights.aligned_safetensors import save_aligned, without_padding
from gemmakit.weights.source import Checkpoint

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


def cache_path(source: str | Path, scheme_name: str, digest: str | None = None) -> Path:
    """Where the conversion of `source` to `scheme_name` lives in the cache (`digest`: its fingerprint, when the
    caller has it)."""
    source = Path(source)
    digest = digest or fingerprint(source)
    return cache_root() / f"{source.stem}-{scheme_name}-{digest[:20]}-v{FORMAT_VERSION}.safetensors"


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


def save(path: str | Path, state: dict[str, torch.Tensor], config: GemmaConfig, scheme_name: str,
         source: str | Path, tensor_types: dict[str, str] | None = None,
         tokenizer_metadata: dict[str, Any] | None = None, digest: str | None = None) -> Path:
    """Write a quantised model's state dict as aligned safetensors, atomically; the header carries what `read`
    needs to rebuild it: config, scheme, source and its fingerprint (`digest`, computed when not given), tensor
    types, and a GGUF source's `tokenizer.*` keys (other sources' tokenizers are read from beside the source)."""
    path, source = Path(path), Path(source)
    fields = dataclasses.asdict(config)
    fields.pop("extra", None)
    tok = {k: _jsonable(v) for k, v in tokenizer_metadata.items()} if tokenizer_metadata is not None else None
    meta = {
        "gemmakit.format": FORMAT_VERSION,
        "gemmakit.scheme": scheme_name,
        "gemmakit.config": json.dumps(fields),
        "gemmakit.source": str(source.resolve()),
        "gemmakit.fingerprint": digest or fingerprint(source),
        "gemmakit.tensor_types": json.dumps(tensor_types or {}),
        "gemmakit.tokenizer": json.dumps(tok) if tok is not None else "",
    }
    state = {k: v.contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_aligned(state, tmp, meta)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file under the real name
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The gemmakit metadata of a converted file; a FormatError for any other safetensors file or format."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: not a readable safetensors file: {e}") from e
    if "gemmakit.format" not in meta:
        raise FormatError(f"{path}: a safetensors file without gemmakit's conversion header; to load an HF "
                          "checkpoint give its directory (config.json, tokenizer and weights together)")
    if meta["gemmakit.format"] != FORMAT_VERSION:
        raise FormatError(f"{path}: not a gemmakit converted model of format v{FORMAT_VERSION} "
                          f"(found {meta.get('gemmakit.format')!r}); re-create it with `gemmakit quantize`")
    return meta


def read_config(meta: dict[str, str] | Any) -> GemmaConfig:
    """The `GemmaConfig` stored in a converted file's header."""
    cfg = json.loads(meta["gemmakit.config"])
    cfg["layer_types"] = tuple(cfg["layer_types"])
    return GemmaConfig(**cfg)


def read(path: str | Path, header: dict[str, str] | Any | None = None) -> Checkpoint:
    """The checkpoint a converted file holds: the quantised modules' tensors memory-mapped, the config, scheme
    and tensor types from the header, the tokenizer from the stored GGUF keys (or from beside the source).
    `header`: the file's metadata when the caller has already read it (`resolve_source` does)."""
    from safetensors.torch import load_file

    from gemmakit.tokenizer import Tokenizer

    path = Path(path)
    meta = header if header is not None else read_header(path)
    config = read_config(meta)
    # the file's tensors are 64-byte aligned (see aligned_safetensors), so they are used in place from the
    # memory map; a tensor that is not (a file written by another tool) is copied rather than risk torch's
    # int8/int4 kernels on a misaligned pointer (a SIGSEGV with torch 2.13)
    state = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in without_padding(load_file(str(path))).items()}
    source = Path(meta["gemmakit.source"])
    if meta["gemmakit.tokenizer"]:
        tokenizer = Tokenizer.from_gguf_metadata(json.loads(meta["gemmakit.tokenizer"]), source=str(path))
    elif source.is_dir() or source.parent.is_dir():
        tokenizer = Tokenizer.from_dir(source if source.is_dir() else source.parent)
    else:
        raise FormatError(f"{path}: holds no tokenizer and the directory of its source {source} is gone")
    return Checkpoint(config, state, tokenizer, source, json.loads(meta["gemmakit.tensor_types"]),
                      scheme=meta["gemmakit.scheme"])


def remove_older_formats(path: Path, progress: bool = True) -> None:
    """Delete the same conversion (same source name, scheme and fingerprint) in older formats: each is a full copy
    of the weights that nothing reads any more. Other sources' files are left alone."""
    prefix = path.name[:path.name.rindex("-v") + 2]
    for old in path.parent.glob(f"{prefix}*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
            if progress:
                print(f"[gemmakit: removed {old.name}, an older format of the same conversion]", file=sys.stderr)
