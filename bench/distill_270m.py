"""Bench (not CI): distil the real Gemma 3 270M into a 4-layer Gemma 3 student on tinyshakespeare, against the same
student trained with plain cross-entropy for the same steps; reports held-out KL(teacher‖student) and perplexity.

The student keeps the teacher's (frozen, tied) embedding and starts from 4 of its 18 blocks (layers 0, 5, 11, 17,
so it has both sliding and global layers): a layer-dropped copy, the usual way to start a smaller student
cheaply. Both runs see the same batches, steps, learning rate and schedule; the only difference is the loss:
offline KD against the teacher's stored top-64 log-probs plus tail mass, or CE on the next token.

    OMP_NUM_THREADS=2 .venv/bin/python bench/distill_270m.py --steps 80
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gemmakit
from gemmakit.loader import build_model
from gemmakit.train.data import Example
from gemmakit.train.distill import OfflineKDLoss, attach_teacher_topk, save_teacher_topk
from gemmakit.train.loop import TrainConfig, train
from gemmakit.train.sft import CausalLMLoss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PICKS = (0, 5, 11, 17)


def windows(ids: list[int], length: int, bos: int) -> list[Example]:
    return [Example([bos] + ids[i: i + length], [0] + [1] * length) for i in range(0, len(ids) - length, length)]


def make_student(teacher: torch.nn.Module) -> torch.nn.Module:
    c = teacher.config
    config = c.replace(num_layers=len(PICKS), layer_types=tuple(c.layer_types[i] for i in PICKS))
    state = {}
    for name, t in teacher.state_dict().items():
        if name.startswith("model.layers."):
            layer, rest = name.split(".", 3)[2:]
            if int(layer) in PICKS:
                state[f"model.layers.{PICKS.index(int(layer))}.{rest}"] = t
        else:
            state[name] = t
    student = build_model(config, {k: v.float() for k, v in state.items()}, torch.float32, "student")
    student.requires_grad_(True)
    student.model.embed_tokens.weight.requires_grad_(False)  # shared with the teacher, frozen
    return student


@torch.no_grad()
def held_out(student: torch.nn.Module, teacher: torch.nn.Module, examples: list[Example], chunk: int = 128) -> dict:
    """Mean per-token CE (→ perplexity) and full-vocabulary KL(teacher‖student) on held-out windows."""
    ce = kl = n = 0.0
    for ex in examples:
        ids = torch.tensor([ex.ids])
        hs = student.hidden_states(ids)[0, :-1]
        ht = teacher.hidden_states(ids)[0, :-1].float()
        targets = ids[0, 1:]
        for s in range(0, hs.shape[0], chunk):
            s_logp = F.log_softmax(student.unembed(hs[s: s + chunk]).float(), -1)
            t_logp = F.log_softmax(teacher.unembed(ht[s: s + chunk].to(teacher.dtype)).float(), -1)
            ce += float(F.nll_loss(s_logp, targets[s: s + chunk], reduction="sum"))
            kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
        n += hs.shape[0]
    return {"ce": ce / n, "ppl": math.exp(ce / n), "kl": kl / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--out", default="bench/results/distill_270m")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher_g = gemmakit.load("default", dtype="float32")
    teacher = teacher_g.module
    text = DATA.read_text()
    cut = int(len(text) * 0.9)
    tok = teacher_g.tokenizer
    train_ids = tok.encode(text[: min(cut, 200_000)], add_bos=False)
    eval_ids = tok.encode(text[cut: cut + 40_000], add_bos=False)
    needed = args.steps * args.batch
    train_ex = windows(train_ids, args.seq, tok.bos_id)[:needed]
    eval_ex = windows(eval_ids, args.seq, tok.bos_id)[: args.eval_windows]
    print(f"teacher {teacher_g}; {len(train_ex)} train windows, {len(eval_ex)} held-out windows of {args.seq} "
          f"tokens; setup {time.perf_counter() - t0:.0f} s", flush=True)

    topk = out / "teacher_top64.safetensors"
    t1 = time.perf_counter()
    if not topk.exists():
        save_teacher_topk(teacher, train_ex, topk, args.top_k, batch_size=args.batch, progress=False)
    print(f"teacher top-{args.top_k}: {time.perf_counter() - t1:.0f} s", flush=True)
    kd_ex = attach_teacher_topk(train_ex, topk)

    results = {}
    start = make_student(teacher)
    results["init"] = held_out(start, teacher, eval_ex)
    print("student at init:", json.dumps(results["init"]), flush=True)
    for name in ("ce", "kd"):
        student = make_student(teacher)
        task = CausalLMLoss(student) if name == "ce" else OfflineKDLoss(student)
        cfg = TrainConfig(out=str(out / name), lr=args.lr, batch_size=args.batch, max_steps=args.steps,
                          warmup_steps=5, schedule="cosine", seed=0, progress=False)
        t2 = time.perf_counter()
        history = train(task, kd_ex, cfg, blocks=list(student.model.layers))
        results[name] = held_out(student, teacher, eval_ex)
        results[name]["train_loss_first_last"] = [history[0]["loss"], history[-1]["loss"]]
        results[name]["seconds"] = round(time.perf_counter() - t2)
        print(name, json.dumps(results[name]), flush=True)
    results["config"] = vars(args) | {"student_layers": PICKS}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"KL(teacher||student): CE {results['ce']['kl']:.4f} vs KD {results['kd']['kl']:.4f}; held-out ppl: "
          f"CE {results['ce']['ppl']:.2f} vs KD {results['kd']['ppl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
