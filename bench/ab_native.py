"""A/B of two builds of the native library in one process: this tree's against an older commit's, alternating.

    python bench/ab_native.py --old HEAD~1 [--rows 1,8,16] [--kernels] [--rounds 40] [--threads 2]

Why: on this workplace's shared hosts one figure moves by 30% between runs minutes apart, far more than most kernel
changes gain. Both libraries are loaded side by side (the old commit's sources from git, compiled with the same
compiler and flags) and every round runs A then B on the same operands, so both see the same machine; the median
over the rounds and how many rounds B won are what to quote.

- `--rows`: the fused greedy step (`gk_greedy_step`, layers and ranked head) of the embedded 270M with that many
  rows at position ~100, 5 steps a round.
- `--kernels`: one-row products over GGUF blocks (Q4_K and Q6_K [9216, 2304], Q5_0 [6912, 1152]), each call on
  another of 16 copies (past the last-level cache, as decoding reads them).

The old build must have the same struct layouts (`abi.check`); a commit that changed them says so and stops.
Not CI.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemmakit.decoding.native import abi
from gemmakit.decoding.native.build import FLAGS, HEADERS, SOURCES, compiler, library

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def old_library(rev: str, out: Path) -> ctypes.CDLL:
    """The native library built from commit `rev`'s sources (same compiler and flags as this tree's)."""
    for path in (*SOURCES, *HEADERS):
        rel = path.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True)
        if text.returncode != 0:
            raise SystemExit(f"{rev} has no {rel}: {text.stderr.strip()}")
        (out / path.name).write_text(text.stdout)
    target = out / "old.so"
    proc = subprocess.run([compiler(), *FLAGS, *(str(out / p.name) for p in SOURCES), "-o", str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"building {rev}'s library failed:\n{proc.stderr[-2000:]}")
    lib = ctypes.CDLL(str(target))
    try:
        abi.check(lib)
    except Exception as err:  # noqa: BLE001 - reported, the comparison cannot run
        raise SystemExit(f"{rev}'s structs differ from this tree's ({err}): compare whole runs instead "
                         "(bench/ab_decode.py)") from None
    abi.bind_functions(lib)
    return lib


def report(name: str, times: list[list[float]], unit: float = 1e3, what: str = "ms") -> None:
    a, b = (statistics.median(t) * unit for t in times)
    wins = sum(y < x for x, y in zip(*times, strict=True))
    print(f"{name}: old {a:.2f} {what}  new {b:.2f} {what}  new/old {b / a:.3f}  new faster in {wins}/{len(times[0])}")


def steps(libs: list[ctypes.CDLL], rows_list: list[int], rounds: int) -> None:
    import gemmakit
    from gemmakit.cache import SlotCache
    from gemmakit.decoding.native.decoder import NativeDecoder

    model = gemmakit.load("default")
    decoders = [NativeDecoder(model.module, lib) for lib in libs]
    prompt = torch.tensor([[model.tokenizer.bos_id] + [818, 5279, 529, 7001] * 25])
    for n in rows_list:
        setups = []
        with torch.inference_mode():
            for decoder in decoders:
                slots = SlotCache(model.config, n, 256, model.module.dtype)
                for row in range(n):
                    decoder.prefill(prompt, slots.view(row))
                setups.append((decoder, slots))
            ids, rows, times = torch.full((n,), 100), list(range(n)), [[], []]
            for _ in range(rounds):
                for i, (decoder, slots) in enumerate(setups):
                    for row in rows:
                        slots.view(row).length = prompt.shape[1]
                    start = time.perf_counter()
                    for _ in range(5):
                        decoder.greedy_rows(ids, slots, rows)
                    times[i].append((time.perf_counter() - start) / 5)
        report(f"fused greedy step, {n} rows", times)


def kernels(libs: list[ctypes.CDLL], rounds: int, threads: int) -> None:
    from block_kernels import TYPES, random_blocks

    gen = torch.Generator().manual_seed(0)
    for name, rows, cols in (("Q4_K", 9216, 2304), ("Q6_K", 9216, 2304), ("Q5_0", 6912, 1152)):
        pool = [random_blocks(name, rows, cols, gen) for _ in range(16)]
        x, y, times = torch.randn(1, cols), torch.empty(1, rows), [[], []]
        for r in range(10 * rounds):
            for i, lib in enumerate(libs):
                w = pool[(2 * r + i) % len(pool)]
                start = time.perf_counter()
                lib.gk_block_matvec(TYPES[name], w.data_ptr(), rows, cols, x.data_ptr(), 1, y.data_ptr(), threads)
                times[i].append(time.perf_counter() - start)
        report(f"{name} [{rows}, {cols}] one row", times, 1e6, "us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="HEAD", help="the commit whose native sources are A (default HEAD)")
    parser.add_argument("--rows", default="1,8", help="rows of the fused step, e.g. 1,4,8,16 ('' for none)")
    parser.add_argument("--kernels", action="store_true", help="also the one-row block products")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new = library()
    if new is None:
        raise SystemExit("this tree's native library is unavailable")
    with tempfile.TemporaryDirectory() as tmp:
        libs = [old_library(args.old, Path(tmp)), new]
        print(f"old = {args.old}, new = this tree; {args.threads} threads, {args.rounds} rounds")
        if args.rows:
            steps(libs, [int(n) for n in args.rows.split(",")], args.rounds)
        if args.kernels:
            kernels(libs, args.rounds, args.threads)


if __name__ == "__main__":
    main()
