"""Agile classifier on ETHOS with the real Gemma 3 270M: the gemma-cookbook notebook's experiment, 7x smaller model.

The notebook (`responsible/agile_classifiers.ipynb`) tunes Gemma 2B (instruct) with LoRA rank 4 on q/v, sequence
length 128, batch 2, Adam 5e-4, 4 epochs, on ETHOS binary labelled `isHate >= median` (515 positives of 998),
shuffled with `df.sample(frac=1, random_state=32)` and split into the first 800 (train) and the last 198 (test).
It reports F1 (argmax = threshold 0.5) 0.80 / ROC-AUC 0.78 with 200 training examples and 0.84 / 0.88 with 800.

Here: the same shuffle (pandas' `sample` draws numpy's `RandomState(32).permutation`, so the order is identical),
the same recipe through `gemmakit.safety.agile`, training on the first N of the 800 for each `--train-sizes` N
(a fresh model each time), then scoring all 198 held-out comments. Reported: F1 at 0.5 (the notebook's number),
optimal F1, ROC-AUC, AU-PRC, training and scoring time. A bench, not CI: the full run takes a while on a CPU.

    .venv/bin/python bench/agile_ethos.py                                  # 200 and 800, 4 epochs, bf16, 1 thread
    .venv/bin/python bench/agile_ethos.py --train-sizes 20 --epochs 1      # smoke test (~1 min)

`--dtype bfloat16` (default) keeps the frozen base weights in bf16 and the LoRA weights in fp32. Measured on the
2-core AVX512-BF16 dev machine, 1 thread: 0.38-0.65 s per step in bf16 (depending on other jobs' load) against
1.15-1.24 s in fp32, at the same loss (60 examples x 2 epochs: 2.30/1.02 fp32, 2.34/1.01 bf16). The default run
is 400 + 1,600 steps, so ~13-22 min in bf16 (~40 min in fp32). JSON is rewritten after every run, so a stopped
bench keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gemmakit
from gemmakit.safety.agile import AgileConfig, train_agile
from gemmakit.safety.datasets import read_ethos
from gemmakit.safety.metrics import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ethos_binary.csv"
PUBLISHED = {200: {"f1": 0.80, "roc_auc": 0.78}, 800: {"f1": 0.8374, "roc_auc": 0.8817}}  # Gemma 2B, notebook


def split(examples: list[Any], held_out: int, seed: int) -> tuple[list[Any], list[Any]]:
    """The notebook's `df.sample(frac=1, random_state=seed)` then `df[:-held_out]`, `df[-held_out:]`."""
    order = np.random.RandomState(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    return shuffled[:len(shuffled) - held_out], shuffled[len(shuffled) - held_out:]


def run_one(size: int, train: list[Any], test: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train on the first `size` training examples (fresh model), score the held-out set, return the figures."""
    model = gemmakit.load("default", dtype=args.dtype)
    config = AgileConfig(epochs=args.epochs)
    subset = train[:size]
    print(f"== {size} training examples ({sum(e.label for e in subset)} positive), {args.epochs} epochs, "
          f"{args.dtype}, {torch.get_num_threads()} thread(s)", flush=True)
    start = time.perf_counter()
    classifier = train_agile(model, subset, config, progress=not args.quiet)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = classifier.probabilities([e.prompt for e in test], batch_size=args.batch_size)
    score_s = time.perf_counter() - start
    report = evaluate([e.label for e in test], scores, threshold=0.5)
    steps = args.epochs * -(-size // config.batch_size)
    return {
        "train_size": size, "train_positives": sum(e.label for e in subset), "steps": steps,
        "epoch_losses": [round(x, 4) for x in classifier.epoch_losses],
        "f1_at_0.5": _round(report["f1_at_threshold"]), "accuracy_at_0.5": _round(report["accuracy_at_threshold"]),
        "optimal_f1": _round(report["optimal_f1"]), "optimal_threshold": _round(report["optimal_threshold"]),
        "roc_auc": _round(report["roc_auc"]), "average_precision": _round(report["average_precision"]),
        "train_s": round(train_s, 1), "s_per_step": round(train_s / steps, 3),
        "score_s": round(score_s, 1), "held_out_texts_per_s": round(len(test) / score_s, 2),
        "published_gemma_2b": PUBLISHED.get(size),
        "held_out_scores": [round(x, 6) for x in scores],
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def table(runs: list[dict[str, Any]]) -> str:
    head = f"{'train':>5} {'F1@0.5':>7} {'optF1':>6} {'ROC-AUC':>7} {'AU-PRC':>6} {'train s':>8} {'s/step':>6} " \
           f"{'score s':>7}  published Gemma 2B (F1 / ROC-AUC)"
    lines = [head, "-" * len(head)]
    for r in runs:
        pub = r["published_gemma_2b"]
        published = f"{pub['f1']:.2f} / {pub['roc_auc']:.2f}" if pub else "-"
        lines.append(f"{r['train_size']:>5} {r['f1_at_0.5']:>7.3f} {r['optimal_f1']:>6.3f} {r['roc_auc']:>7.3f} "
                     f"{r['average_precision']:>6.3f} {r['train_s']:>8.1f} {r['s_per_step']:>6.3f} "
                     f"{r['score_s']:>7.1f}  {published}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a CPU shared with other jobs; 0 = torch's choice)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--held-out", type=int, default=198)
    parser.add_argument("--split-seed", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward when scoring")
    parser.add_argument("--out", type=Path, default=Path("bench/results/agile_ethos.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = read_ethos(args.data)
    train, test = split(examples, args.held_out, args.split_seed)
    too_big = [n for n in args.train_sizes if not 0 < n <= len(train)]
    if too_big:
        parser.error(f"--train-sizes {too_big}: must be in 1..{len(train)}")
    result: dict[str, Any] = {
        "model": "Gemma 3 270M (gemmakit default: Q4_K_M GGUF, dequantised)", "dtype": args.dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "data": {"file": args.data.name, "examples": len(examples), "positives": sum(e.label for e in examples),
                 "split_seed": args.split_seed, "train_pool": len(train), "held_out": len(test),
                 "held_out_positives": sum(e.label for e in test)},
        "recipe": {k: v for k, v in asdict(AgileConfig(epochs=args.epochs)).items()
                   if k not in ("instructions", "separator")},
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.train_sizes:
        result["runs"].append(run_one(size, train, test, args))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result["runs"][-1].items() if k != "held_out_scores"}), flush=True)
    print(table(result["runs"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
