"""Perplexity and argmax agreement of each quantisation scheme against the fp32 reference, on the real 270M.

    python bench/scheme_accuracy.py [--schemes int8-rescore,gguf-rescore] [--windows 4]

Each scheme's model scores the same 512-token windows of tinyshakespeare (../shared/data) as the fp32 load of the
same file (the file's weights dequantised exactly); prints perplexity, its ratio to fp32, the share of positions
whose argmax agrees with fp32's, and the mean absolute logit error over the fp32 logits' standard deviation.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import gemmakit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def window_logits(model: gemmakit.Gemma, windows: list[list[int]]) -> tuple[float, torch.Tensor]:
    """Perplexity over the windows (each scored from its own BOS) and the stacked logits."""
    nll, count, stacked = 0.0, 0, []
    for window in windows:
        with torch.inference_mode():
            logits = model.logits(window)[0].float()
        targets = torch.tensor(window[1:])
        nll -= torch.log_softmax(logits[:-1], -1).gather(1, targets[:, None]).sum().item()
        count += len(targets)
        stacked.append(logits)
    return math.exp(nll / count), torch.cat(stacked)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--schemes", default="int8-rescore,gguf-rescore")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args()
    reference = gemmakit.load(args.model, dtype="float32")
    ids = reference.tokenizer.encode(Path(args.data).read_text()[:200_000], add_bos=False)
    windows = [[reference.tokenizer.bos_id, *ids[w * 511:(w + 1) * 511]] for w in range(args.windows)]
    ref_ppl, ref_logits = window_logits(reference, windows)
    print(f"fp32          perplexity {ref_ppl:.3f}")
    for scheme in args.schemes.split(","):
        ppl, logits = window_logits(gemmakit.load(args.model, quant=scheme), windows)
        agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        error = ((logits - ref_logits).abs().mean() / ref_logits.std()).item()
        print(f"{scheme:13} perplexity {ppl:.3f} ({ppl / ref_ppl:.4f}x fp32), argmax agrees {agree:.1%}, "
              f"mean |error| / std {error:.4f}")


if __name__ == "__main__":
    main()
