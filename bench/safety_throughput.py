"""ShieldGemma-style scoring throughput: gemmakit's ShieldClassifier against the straightforward transformers way.

The baseline is the model card's code: for every (text, policy) pair, tokenise the whole prompt, run one full
forward that returns the logits of every position over the whole vocabulary, and softmax the Yes/No pair at the
last position. Ours shares each text's prefix across policies (KV cache), runs only the policy tails, reads two
unembedding rows, and batches texts. Same model (the Gemma 3 270M Q4_K_M GGUF, dequantised), same dtype.

    .venv/bin/python bench/safety_throughput.py                       # 200 texts x 4 policies, baseline on 25
    .venv/bin/python bench/safety_throughput.py --baseline-texts 200  # the full baseline (slow on a small CPU)

The baseline runs on the first `--baseline-texts` texts, interleaved with ours batch by batch (transformers on
each text of a batch, ours one text at a time, ours on the whole batch) so that all three see the same machine
load; the speedup is measured on exactly those texts, and ours then scores all `--texts` for its throughput.
Scores of the two are compared on the shared texts. CPU seconds are reported beside wall seconds: with
`--threads 1` on a machine shared with other jobs they are the steadier measure (`speedup_batched_cpu`).
`token_forwards` counts the tokens each side runs through the layers (transformers also projects every one onto
the 262k vocabulary; ours projects one per policy onto two rows): their quotient, not overhead, is what bounds
the speedup on short texts, where the policy tails dominate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.loader import default_model_path
from gemmakit.safety import ADVERTISED, ShieldClassifier, render

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_texts(count: int) -> list[str]:
    """A round-robin mix of XSTest prompts, ETHOS comments and HarmBench behaviours (short to long, as screened
    in practice) when ../shared is present; otherwise generated sentences."""
    from gemmakit.safety.datasets import read_dataset

    names = ["xstest_prompts.csv", "ethos_binary.csv", "harmbench_behaviors_text_all.csv"]
    if all((DATA / n).exists() for n in names):
        sources = [[e.prompt for e in read_dataset(DATA / n)] for n in names]
        texts = [source[i] for i in range(count) for source in sources][:count]
    else:
        texts = [f"Question {i}: how would someone go about {'planning ' * (i % 7)}a trip to city number {i}?"
                 for i in range(count)]
    return texts


def baseline_pairs(model, tokenizer, text: str, policies: list[str]) -> dict[str, float]:
    """The model card's way: one full forward (all positions, whole vocabulary) per policy."""
    yes, no = tokenizer.convert_tokens_to_ids("Yes"), tokenizer.convert_tokens_to_ids("No")
    scores = {}
    with torch.inference_mode():
        for policy in policies:
            inputs = tokenizer(render(policy, text), add_special_tokens=False, return_tensors="pt")
            logits = model(**inputs).logits
            scores[policy] = float(torch.softmax(logits[0, -1, [yes, no]].float(), dim=0)[0])
    return scores


class Clock:
    """Accumulates wall and process CPU seconds over `with` blocks. On a CPU shared with other jobs the wall time
    of a 1-thread run swings by 2x with their load; its CPU time is what the work itself cost."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *_: object) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--baseline-texts", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (on a CPU shared with other jobs, 1 avoids the ~10x "
                             "slowdown of OpenMP threads waiting for each other; default: torch's choice)")
    parser.add_argument("--ours-default-load", action="store_true",
                        help="load ours with gemmakit.load('default') as users get it (int8 weights, bf16 "
                             "activations on an AVX512-BF16 CPU) instead of --dtype; the scores then differ slightly")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = list(ADVERTISED)
    texts = load_texts(args.texts)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    ours = gemmakit.load("default") if args.ours_default_load else gemmakit.load("default", dtype=args.dtype)
    clf = ShieldClassifier(ours, policies=policies, batch_size=args.batch_size)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    clf.score_batch(texts[:1])  # warm-up both
    baseline_pairs(reference, tokenizer, texts[0], policies[:1])

    # the shared subset, batch by batch and interleaved, so that all sides see the same machine load
    subset = texts[:args.baseline_texts]
    base_s, ours_single_s, ours_subset_s = Clock(), Clock(), Clock()
    diff = 0.0
    embedded: list[int] = []
    for begin in range(0, len(subset), args.batch_size):
        batch = subset[begin:begin + args.batch_size]
        with base_s:
            base = [baseline_pairs(reference, tokenizer, text, policies) for text in batch]
        with ours_single_s:
            mine = [clf.score(text) for text in batch]
        hook = clf.module.model.embed_tokens.register_forward_hook(lambda _m, a, _o: embedded.append(a[0].numel()))
        with ours_subset_s:
            clf.score_batch(batch)
        hook.remove()
        diff = max(diff, *(abs(b[p] - m[p]) for b, m in zip(base, mine, strict=True) for p in policies))
    with Clock() as ours_all_s:
        clf.score_batch(texts)

    lengths = [len(clf.prompt_ids(clf.policies[0], t)) for t in texts]
    base_tokens = sum(len(clf.prompt_ids(p, t)) for t in subset for p in clf.policies)
    report = {
        "model": path.name, "dtype": args.dtype, "policies": policies, "threads": torch.get_num_threads(),
        "ours_loaded_as": "gemmakit.load default (quantised)" if args.ours_default_load else args.dtype,
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "shared_subset_texts": len(subset),
        "transformers_s": round(base_s.wall, 2),
        "ours_one_text_at_a_time_s": round(ours_single_s.wall, 2),
        "ours_batched_s": round(ours_subset_s.wall, 2),
        "speedup_one_text_at_a_time": round(base_s.wall / ours_single_s.wall, 2),
        "speedup_batched": round(base_s.wall / ours_subset_s.wall, 2),
        "cpu_s": {"transformers": round(base_s.cpu, 2), "ours_one_text_at_a_time": round(ours_single_s.cpu, 2),
                  "ours_batched": round(ours_subset_s.cpu, 2)},
        "speedup_batched_cpu": round(base_s.cpu / ours_subset_s.cpu, 2),
        "ours_all_texts": len(texts), "ours_all_s": round(ours_all_s.wall, 2),
        "ours_all_cpu_s": round(ours_all_s.cpu, 2),
        "ours_pairs_per_s": round(len(texts) * len(policies) / ours_all_s.wall, 2),
        "transformers_pairs_per_s": round(len(subset) * len(policies) / base_s.wall, 2),
        "token_forwards": {"transformers": base_tokens, "ours_batched": sum(embedded)},
        "max_score_difference": float(f"{diff:.2e}"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
