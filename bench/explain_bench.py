"""Salience bench (not CI): the real Gemma 3 270M, a 512-token prompt, the model's own 16-token greedy reply as the
span; time and peak memory per method.

Each method runs in a fresh process that loads the model the default way (int8 GGUF fast path), so the peak RSS
of one method is not hidden by another's. Reported per method: the float32 copy's reload time (gradients need
float weights), the method's wall time (the gradient methods are one forward + one backward; integrated
gradients report their steps and time per step), completeness error for integrated gradients, and peak RSS
(ru_maxrss) after loading and after the method.

    .venv/bin/python bench/explain_bench.py                       # grad_l2, grad_dot_input, IG with 16 steps
    .venv/bin/python bench/explain_bench.py --ig-steps 64 --ig-max-steps 256

The prompt is tinyshakespeare (../shared/data) when present, else a fixed paragraph repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
FALLBACK = ("The river ran past the old mill, where the miller's daughter kept the accounts in a green ledger. "
            "Each spring the water rose, and each spring the town argued about the dam. ")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(model, n: int) -> list[int]:
    text = TEXT.read_text(encoding="utf-8")[:20000] if TEXT.exists() else FALLBACK * 60
    ids = model.encode(text)
    if len(ids) < n:
        raise SystemExit(f"the prompt text gives only {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def child(args: argparse.Namespace) -> None:
    import torch

    import gemmakit
    from gemmakit.explain.salience import float_model, make_problem, salience

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = gemmakit.load(args.model)
    load_s = time.perf_counter() - t0
    rss_load = peak_mb()
    ids = prompt_ids(model, args.prompt_tokens)
    problem = make_problem(model, ids, generate=args.span)
    t0 = time.perf_counter()
    _, weights = float_model(model)
    float_s = time.perf_counter() - t0
    rss_float = peak_mb()
    t0 = time.perf_counter()
    result = salience(model, ids, method=args.child, steps=args.ig_steps, batch=args.ig_batch,
                      max_steps=args.ig_max_steps, problem=problem, progress=True)
    took = time.perf_counter() - t0
    out = {"method": args.child, "prompt_tokens": problem.prompt_len, "span_tokens": problem.span[1] - problem.span[0],
           "span_text": "".join(result.target_tokens[problem.span[0]:problem.span[1]]),
           "load_s": round(load_s, 2), "float_copy_s": round(float_s, 2), "method_s": round(took, 2),
           "rss_after_load_mb": round(rss_load), "rss_after_float_copy_mb": round(rss_float),
           "peak_rss_mb": round(peak_mb()), "threads": torch.get_num_threads(), "weights": weights}
    if args.child == "integrated_gradients":
        d = result.details
        out.update(steps_used=d["steps_used"], s_per_step=round(took / d["steps_used"], 3),
                   completeness_error=d["completeness_error"], batch=args.ig_batch)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length, <bos> included")
    p.add_argument("--span", type=int, default=16, help="tokens of greedy reply to explain")
    p.add_argument("--methods", default="grad_l2,grad_dot_input,integrated_gradients")
    p.add_argument("--ig-steps", type=int, default=16, help="integrated gradients: initial nodes (16 = 2 x 8)")
    p.add_argument("--ig-max-steps", type=int, default=16, help="integrated gradients: node budget")
    p.add_argument("--ig-batch", type=int, default=4, help="integrated gradients: path points per forward")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"load average before: {os.getloadavg()}, cpus {os.cpu_count()}", flush=True)
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--prompt-tokens",
               str(args.prompt_tokens), "--span", str(args.span), "--ig-steps", str(args.ig_steps),
               "--ig-max-steps", str(args.ig_max_steps), "--ig-batch", str(args.ig_batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} failed (exit {proc.returncode})")
        row = json.loads(lines[-1][7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("\n| method | time (s) | steps | s/step | completeness err | peak RSS (MB) | RSS after int8 load (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['method_s']} | {r.get('steps_used', 1)} | {r.get('s_per_step', '-')} | "
              f"{r.get('completeness_error', '-')} | {r['peak_rss_mb']} | {r['rss_after_load_mb']} |")
    print(f"\nprompt {rows[0]['prompt_tokens']} tokens, span {rows[0]['span_tokens']} tokens "
          f"({rows[0]['span_text']!r}); float32 copy reloaded in {rows[0]['float_copy_s']} s")


if __name__ == "__main__":
    main()
