"""A/B of gemmakit's default CPU path against an older commit: decode and prefill, interleaved runs.

    python bench/ab_decode.py --old 34f98d1 [--rounds 3] [--threads 2]

Each round runs the old tree and then this one, each in a fresh process (load "default"; 128 greedy tokens
after a 50-token prompt; the best of two 1024-token prefills). Alternating old and new spreads the machine's
load over both, so the difference is worth more than two figures taken minutes apart.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def child() -> None:
    import torch

    import gemmakit
    from gemmakit.cache import KVCache

    model = gemmakit.load("default")
    text = DATA.read_text()[:20000] if DATA.exists() else "The capital of France is Paris. " * 400
    ids = model.tokenizer.encode(text)
    prompt, long = ids[1000:1050], torch.tensor([ids[:1024]])
    model.generate_ids([prompt], 8, stop=False)  # warm up (the public API exists in both revisions)
    start = time.perf_counter()
    new = len(model.generate_ids([prompt], 128, stop=False)[0])
    times = [start, time.perf_counter()]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            cache = KVCache(model.module.config, 1, long.shape[1], model.module.dtype)
            start = time.perf_counter()
            model.module(long, cache=cache, last_only=True)
            best = min(best, time.perf_counter() - start)
    print(f"decode {new / (times[-1] - times[0]):.1f} tok/s  prefill {long.shape[1] / best:.0f} tok/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old_tree), args.old],
                       check=True)
        try:
            for round_ in range(1, args.rounds + 1):
                for name, tree in (("old", old_tree), ("new", ROOT)):
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(tree))
                    out = subprocess.run([sys.executable, __file__, "--old", args.old, "--child"], env=env,
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
                    print(f"round {round_} {name}: {out[-1]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=True)


if __name__ == "__main__":
    main()
