"""GPU check (not CI): SFT with LoRA, offline KD and on-policy GKD on a tiny Gemma 3, all on CUDA (fp32 and bf16).

    python bench/distill_gpu_check.py      # prints one line per run; exits non-zero on a failed check
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import gemmakit  # noqa: E402
from gemmakit.train.data import read_jsonl  # noqa: E402
from gemmakit.train.distill import DistillConfig, train_distill  # noqa: E402
from gemmakit.train.lora import LoraConfig  # noqa: E402
from gemmakit.train.sft import SFTConfig, train_sft  # noqa: E402
from support.train_helpers import save_tiny_model, write_jsonl  # noqa: E402


def main() -> int:
    root = Path(tempfile.mkdtemp())
    student_dir = save_tiny_model("gemma3", root / "s", seed=0)
    teacher_dir = save_tiny_model("gemma3", root / "t", seed=1)
    rows = read_jsonl(write_jsonl(root / "d.jsonl", "prompt"))
    ok = True
    for dtype in ("float32", "bfloat16"):
        g = gemmakit.load(student_dir, dtype=dtype)
        g.module.to("cuda")
        h = train_sft(g.module, g.tokenizer, rows, SFTConfig(out=str(root / f"sft-{dtype}"), lr=3e-2, max_steps=20,
                                                             progress=False, lora=LoraConfig(r=8)), eval_rows=rows)
        good = h[-1]["loss"] < 0.5 * h[0]["loss"] and all(math.isfinite(r["loss"]) for r in h)
        ok &= good
        print(f"sft lora {dtype} cuda: loss {h[0]['loss']:.3f} -> {h[-1]['loss']:.3f}, eval {h[-1]['eval_loss']:.3f}"
              f" {'ok' if good else 'FAILED'}")
    for mode in ("offline", "gkd"):
        s, t = gemmakit.load(student_dir), gemmakit.load(teacher_dir)
        s.module.to("cuda")
        t.module.to("cuda")
        cfg = DistillConfig(out=str(root / mode), mode=mode, lr=1e-2, max_steps=12, top_k=16, max_new_tokens=6,
                            progress=False, schedule="constant")
        h = train_distill(s.module, s.tokenizer, rows, cfg, teacher=t.module, eval_rows=rows)
        losses = [r["loss"] for r in h]
        good = sum(losses[-3:]) < sum(losses[:3]) and all(math.isfinite(x) for x in losses)
        ok &= good
        print(f"distill {mode} cuda: loss {losses[0]:.3f} -> {losses[-1]:.3f} {'ok' if good else 'FAILED'}")
    print("device:", torch.cuda.get_device_name(0))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
