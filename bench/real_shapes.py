"""Random-weight models in the exact shapes of released Gemma sizes, as the GGUF files people download (issue 13).

    python bench/real_shapes.py [--sizes gemma3-1b,gemma2-2b] [--types Q4_K_M,Q8_0] [--force]
    python bench/real_shapes.py --list

Decoding speed, load time and memory do not depend on what the weights say, only on their shapes and the
file's block types, so a model in a released size's shape, re-quantised by llama.cpp's own quantiser, measures
what a user's Q4_K_M download would, with no download. Each file is built once and cached under
`$GEMMAKIT_CACHE/bench-models/` (default ~/.cache/gemmakit/bench-models):

1. the shape: `GemmaConfig.preset(size)` with the vocabulary of the embedded model's tokenizer (262144 pieces;
   the file carries that tokenizer, so prompts tokenise as usual);
2. the weights: seeded N(0, 0.02) made tensor by tensor, in fp16, and streamed by `gemmakit.export.write_gguf`
   into an F16 GGUF (a 9B model never exists in memory: about one tensor does). Norm weights are N(0, 0.02)
   too, in HF's convention (the multiplier is 1 + w), so activations keep a sane scale;
3. llama.cpp's quantiser (`llama_cpp.llama_model_quantize`, default parameters) makes the Q4_K_M / Q8_0 file
   from it, exactly as `llama-quantize` makes the published ones; the F16 intermediate is deleted afterwards;
4. the file is checked: llama.cpp loads it and evaluates one token to finite logits.

Perplexity on these files is meaningless (random weights): `bench/compare.py` skips it for them
(`is_random_model`). Every file's metadata name starts with `gemmakit-random-`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

SIZES = ("gemma3-1b", "gemma2-2b", "gemma3-4b", "gemma2-9b")
TYPES = ("Q4_K_M", "Q8_0")
NAME_PREFIX = "gemmakit-random-"
STD = 0.02
SEED = 1234
# bits per weight of llama.cpp's output, for the quantiser's progress bar only (a Q4_K_M mixes Q4_K/Q6_K/Q5_0)
_BITS = {"Q4_K_M": 5.0, "Q8_0": 8.5}


def models_root() -> Path:
    from gemmakit.weights.converted import cache_root

    return cache_root() / "bench-models"


def model_path(size: str, qtype: str) -> Path:
    return models_root() / f"random-{size}-{qtype}.gguf"


def is_random_model(path: str | Path, name: str | None = None) -> bool:
    """A file this script made: it lies under the bench-models folder, or its `general.name` says so."""
    try:
        Path(path).resolve().relative_to(models_root().resolve())
        return True
    except ValueError:
        return bool(name and name.startswith(NAME_PREFIX))


def default_tokenizer():
    """The embedded Gemma 3 270M's tokenizer, read from its GGUF (262144 pieces)."""
    from gemmakit.loader import resolve
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.weights.gguf_reader import GGUFFile

    path = resolve("default")
    with GGUFFile(path) as f:
        return Tokenizer.from_gguf_metadata(f.metadata, str(path))


def bench_config(size: str, vocab_size: int):
    """The released size's shape with the embedded tokenizer's vocabulary."""
    from gemmakit.config import GemmaConfig

    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    return GemmaConfig.preset(size).replace(vocab_size=vocab_size, name=NAME_PREFIX + size)


def random_tensors(config, seed: int = SEED, std: float = STD) -> Iterator[tuple[str, object]]:
    """(canonical name, fp16 tensor) pairs, each made only when asked for (seeded per tensor: reproducible)."""
    import torch

    from gemmakit.export import gguf_tensor_plan

    for i, (name, shape) in enumerate(gguf_tensor_plan(config)):
        g = torch.Generator().manual_seed(seed + i)
        yield name, torch.empty(shape, dtype=torch.float16).normal_(0.0, std, generator=g)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """llama.cpp logs a line per tensor on fd 2; keep it in a file (shown if the quantiser fails)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize(src: Path, dst: Path, qtype: str, params_count: int, threads: int) -> None:
    """llama.cpp's own quantiser, default parameters, with a progress bar that watches the output grow."""
    import llama_cpp
    from tqdm import tqdm

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    tmp = dst.with_suffix(".tmp")
    log = dst.with_suffix(".quantize.log")
    done = threading.Event()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)  # the bar's own stderr: fd 2 goes to the log meanwhile
    bar = tqdm(total=int(params_count * _BITS[qtype] / 8), unit="B", unit_scale=True, desc=f"quantising {qtype}",
               file=terminal)

    def watch() -> None:
        while not done.wait(1.0):
            with contextlib.suppress(OSError):
                bar.n = tmp.stat().st_size
                bar.refresh()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with _stderr_to(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    finally:
        done.set()
        watcher.join()
        bar.close()
        terminal.close()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-10:])
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize({src} -> {qtype}) failed with {rc}; log {log}:\n{tail}")
    tmp.replace(dst)
    log.unlink(missing_ok=True)


def check_loads(path: Path, bos: int, threads: int) -> None:
    """llama.cpp loads the file and one token gives finite logits."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval([bos])
    logits = np.asarray(llm.scores[0])
    del llm
    if not np.isfinite(logits).all():
        raise SystemExit(f"{path}: llama.cpp computes non-finite logits from this file")


def build(sizes: list[str], types: list[str], threads: int, force: bool = False) -> list[Path]:
    """Build the missing files (one F16 intermediate per size, shared by its types, deleted afterwards)."""
    from gemmakit.export import write_gguf

    bad = [t for t in types if t not in TYPES]
    if bad:
        raise SystemExit(f"unknown file type {bad[0]!r}; choose from {', '.join(TYPES)}")
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    paths = []
    for size in sizes:
        wanted = [t for t in types if force or not model_path(size, t).exists()]
        if wanted:
            tokenizer = tokenizer or default_tokenizer()
            config = bench_config(size, tokenizer.vocab_size)
            params = sum(_numel(shape) for _, shape in _plan(config))
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=root, prefix=f".{size}-") as work:
                f16 = Path(work) / f"random-{size}-F16.gguf"
                write_gguf(f16, config, tokenizer, random_tensors(config), "F16", progress=True)
                written = time.perf_counter() - start
                print(f"[real_shapes] {size}: {params / 1e9:.2f}B parameters, F16 {f16.stat().st_size / 1e9:.2f} GB "
                      f"written in {written:.0f} s", file=sys.stderr)
                for qtype in wanted:
                    t0 = time.perf_counter()
                    quantize(f16, model_path(size, qtype), qtype, params, threads)
                    check_loads(model_path(size, qtype), tokenizer.bos_id, threads)
                    print(f"[real_shapes] {model_path(size, qtype).name}: "
                          f"{model_path(size, qtype).stat().st_size / 1e9:.2f} GB, quantised and checked in "
                          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
            print(f"[real_shapes] {size}: {time.perf_counter() - start:.0f} s in all", file=sys.stderr)
        paths += [model_path(size, t) for t in types]
    return paths


def _plan(config):
    from gemmakit.export import gguf_tensor_plan

    return gguf_tensor_plan(config)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="gemma3-1b,gemma2-2b", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--types", default="Q4_K_M", help=f"comma list of {', '.join(TYPES)}")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp quantiser threads")
    p.add_argument("--force", action="store_true", help="rebuild files that exist")
    p.add_argument("--list", action="store_true", help="list the cached files and exit")
    args = p.parse_args()
    if args.list:
        root = models_root()
        files = sorted(root.glob("*.gguf")) if root.is_dir() else []
        for f in files:
            print(f"{f}\t{f.stat().st_size / 1e9:.2f} GB")
        if not files:
            print(f"(no files under {root}; build them with `python bench/real_shapes.py`)", file=sys.stderr)
        return 0
    for path in build(args.sizes.split(","), args.types.split(","), args.threads, args.force):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
