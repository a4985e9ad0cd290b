"""Speed of the native block kernels (gemmakit/decoding/native/blocks.h) for one decoded token (m = 1), in GB/s of
weight bytes read, next to gemmakit's int8 kernel on the same shape; with `--rows M ...`, for M activation rows at once
(a batched decode step, a prefill) in GMAC/s.

Why GB/s: decoding reads every weight once per token, so a matrix-vector kernel is as fast as it streams its
weights; Q4_K reads 4.5 bits a weight where int8 reads 8, and the question is whether the unpacking keeps up with
memory. Shapes are Gemma 2 2B's MLP: [9216, 2304] (gate/up) and [2304, 9216] (down). Each timed call reads a
different copy of the matrix (together well past the last-level cache), as a decode step reads each layer's weights
from memory; "hot" repeats one matrix (cache-resident, where the L3 holds it).

    .venv/bin/python bench/block_kernels.py [--threads 2] [--calls 300] [--pool-mb 384] [--rows 1 4 8 64 512]

Why --rows: with M activation rows each weight block is unpacked once for up to 8 rows (block_dot_run), so the
kernels turn from memory-bound (M = 1) to compute-bound (a prompt's hundreds of rows); GMAC/s (M * rows * cols
multiply-adds per second) compares them across M. Shapes there: [9216, 2304] Q4_K and Q6_K (Gemma 2 2B's gate/up),
[6912, 1152] Q5_0 and Q8_0 (Gemma 3 1B's gate/up as a Q4_K_M file's legacy-type layers would be).

Not run in CI. Weights are random bytes with small fp16 scales (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemmakit.decoding.native import kernels
from gemmakit.decoding.native.build import library
from gemmakit.quant import Int8Linear
from gemmakit.weights.gguf_quants import BLOCK_SIZES

TYPES = {"Q4_K": 12, "Q6_K": 14, "Q8_0": 8, "Q5_0": 6}
SCALE_OFFSET = {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q5_0": (0,)}


def random_blocks(name: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    block, size = BLOCK_SIZES[TYPES[name]]
    blocks = torch.randint(0, 256, (rows * cols // block, size), dtype=torch.uint8, generator=gen)
    small = torch.full((blocks.shape[0],), 1e-3, dtype=torch.float16).view(torch.uint8).view(-1, 2)
    for offset in SCALE_OFFSET[name]:
        blocks[:, offset:offset + 2] = small
    return blocks.view(rows, -1)


def time_calls(fn, pool: list, calls: int) -> float:
    """Median seconds per call, cycling through `pool` (one operand per call). The median, not the mean: on a
    shared machine a call whose thread is descheduled waits at the team's barrier for a whole time slice."""
    for item in pool[:4]:
        fn(item)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(pool[i % len(pool)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows_table(args: argparse.Namespace, gen: torch.Generator) -> None:
    """GMAC/s for each M of --rows, cycling through copies of the matrix (cold weights, as a step reads them)."""
    print(f"{'shape':>14} {'format':>6} {'M':>4} {'calls':>5} {'us/call':>9} {'GMAC/s':>7} {'weight GB/s':>11}")
    for rows, cols, names in ((9216, 2304, ("Q4_K", "Q6_K")), (6912, 1152, ("Q5_0", "Q8_0"))):
        for name in names:
            one = random_blocks(name, rows, cols, gen)
            nbytes = one.numel()
            copies = [one] + [one.clone() for _ in range(max(1, args.pool_mb * 2**20 // nbytes) - 1)]
            for m in args.rows:
                x = torch.randn(m, cols, generator=gen)
                # about a second of calls per figure (at ~20 GMAC/s), at least 5, at most --calls
                calls = max(5, min(args.calls, int(20e9 / (m * rows * cols))))

                def fn(blocks, x=x, t=TYPES[name]):
                    kernels.block_matvec(t, blocks, x)
                t = time_calls(fn, copies, calls)
                shape = f"[{rows}, {cols}]"
                print(f"{shape:>14} {name:>6} {m:4d} {calls:5d} {t * 1e6:9.0f} {m * rows * cols / t / 1e9:7.1f} "
                      f"{nbytes / t / 1e9:11.1f}", flush=True)
            del copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--pool-mb", type=int, default=384, help="bytes of matrix copies cycled through per shape")
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="activation rows per call (e.g. 1 4 8 64 512): the GMAC/s table instead of the m = 1 one")
    args = parser.parse_args()
    lib = library()
    if lib is None or not kernels.has_block_kernels():
        raise SystemExit("the native library is unavailable")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    if args.rows:
        print(f"threads {args.threads}, VNNI path: {bool(lib.gk_block_kernels_vnni())}, "
              f"cold = cycling through ~{args.pool_mb} MB of copies")
        rows_table(args, gen)
        return
    print(f"threads {args.threads}, m = 1, VNNI path: {bool(lib.gk_block_kernels_vnni())}, "
          f"cold = cycling through ~{args.pool_mb} MB of copies")
    print(f"{'shape':>14} {'format':>6} {'MB':>6} {'cold us':>8} {'cold GB/s':>9} {'hot us':>7} {'hot GB/s':>8}")
    for rows, cols, names in ((9216, 2304, ("Q4_K", "Q6_K", "int8")), (2304, 9216, ("Q4_K", "Q6_K", "int8"))):
        x = torch.randn(1, cols, generator=gen)
        for name in names:
            if name == "int8":
                one = Int8Linear(torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen),
                                 torch.rand(rows, generator=gen) * 1e-2)
                nbytes = rows * cols
                scales = one.scales.float().contiguous()
                copies = [one] + [Int8Linear(one.weight_int8.clone(), one.scales) for _ in
                                  range(max(1, args.pool_mb * 2**20 // nbytes) - 1)]

                def fn(lin, x=x, scales=scales):
                    kernels.int8_matvec(lin, x, scales)
            else:
                one = random_blocks(name, rows, cols, gen)
                nbytes = one.numel()
                copies = [one] + [one.clone() for _ in range(max(1, args.pool_mb * 2**20 // nbytes) - 1)]

                def fn(blocks, x=x, t=TYPES[name]):
                    kernels.block_matvec(t, blocks, x)
            cold = time_calls(fn, copies, args.calls)
            hot = time_calls(fn, copies[:1], args.calls)
            del copies
            shape = f"[{rows}, {cols}]"
            print(f"{shape:>14} {name:>6} {nbytes / 1e6:6.2f} {cold * 1e6:8.0f} {nbytes / cold / 1e9:9.1f} "
                  f"{hot * 1e6:7.0f} {nbytes / hot / 1e9:8.1f}")


if __name__ == "__main__":
    main()
