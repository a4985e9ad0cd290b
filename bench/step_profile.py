"""Where a decode step's time goes as rows are added: the native layers (`advance_rows`), the greedy head
(`greedy`), and both fused (`greedy_rows`), on the embedded Gemma 3 270M, each row at the same position.

    .venv/bin/python bench/step_profile.py --threads 2 --rows 1,4,8,16 --position 100

Not CI: absolute times depend on the machine; compare rows against rows in one run.
"""

from __future__ import annotations

import argparse
import time

import torch

import gemmakit
from gemmakit.cache import SlotCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--position", type=int, default=100, help="cached tokens per row before the timed steps")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = gemmakit.load("default")
    decoder = model.decoder
    print(f"decoder: {decoder.name}; position {args.position}; threads {args.threads}")
    prompt = torch.tensor([[2] + [818, 5279, 529, 7001] * (args.position // 4)])[:, :args.position]
    for n in map(int, args.rows.split(",")):
        slots = SlotCache(model.config, n, args.position + 3 * args.steps + 8, model.module.dtype)
        rows = list(range(n))
        ids = torch.full((n,), 100)
        with torch.inference_mode():
            for row in rows:
                decoder.prefill(prompt, slots.view(row))
            decoder.greedy_rows(ids, slots, rows)  # warm up
            start = time.perf_counter()
            for _ in range(args.steps):
                h = decoder.advance_rows(ids, slots, rows)
            layers = time.perf_counter()
            for _ in range(args.steps):
                decoder.greedy(h)
            head = time.perf_counter()
            for _ in range(args.steps):
                decoder.greedy_rows(ids, slots, rows)
            fused = time.perf_counter()
        step = (fused - head) / args.steps
        print(f"rows {n:2d}: layers {1e3 * (layers - start) / args.steps:6.2f} ms  head "
              f"{1e3 * (head - layers) / args.steps:6.2f} ms  fused step {1e3 * step:6.2f} ms  -> {n / step:.0f} tok/s")


if __name__ == "__main__":
    main()
