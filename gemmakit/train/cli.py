"""`gemmakit train sft|distill`, `gemmakit merge`, `gemmakit export`: argument parsing only.

Every verb runs unchanged under `torchrun --nproc_per_node N -m gemmakit.cli train ...` (FSDP2 over N ranks).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gemmakit.cli import add_model_argument, load_model

TRAINING_NEEDS_FLOAT = ("training needs float weights: gradients flow through every linear layer (LoRA adapters wrap "
                        "float ones), which int8 weights do not support")
EXPORT_NEEDS_FLOAT = ("export writes float weights (or re-quantises them for GGUF), so it reads them unrounded; the "
                      "int8 path would round them first")


def _add_train_arguments(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("data", help="JSONL: one {'messages': [...]}, {'prompt', 'completion'} or {'text'} per line")
    p.add_argument("--out", required=True, help="run directory: log.jsonl, checkpoint/, adapter/ or model/")
    p.add_argument("--eval", default=None, help="JSONL for the eval loss (same shapes as DATA)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch, over all ranks (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = no clipping)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate examples to this many tokens")
    p.add_argument("--eval-every", type=int, default=0, help="eval every N steps (always at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with identical losses")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's own GPU)")


def _add_lora_arguments(p: argparse.ArgumentParser, default_on: bool) -> None:
    g = p.add_argument_group("LoRA")
    if default_on:
        g.add_argument("--full", action="store_true", help="train every weight instead of LoRA adapters")
    else:
        g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated linear layer names (default: all attention and MLP projections)")


def _lora(args: argparse.Namespace, default_on: bool):
    from gemmakit.train.lora import LoraConfig

    wanted = not args.full if default_on else args.lora
    if not wanted:
        return None
    return LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()])


def _common(args: argparse.Namespace) -> dict:
    return dict(out=args.out, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                max_steps=args.max_steps, warmup_steps=args.warmup_steps, schedule=args.schedule,
                weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                save_every=args.save_every, seed=args.seed, resume=args.resume, progress=not args.no_progress,
                max_length=args.max_length)


def _finish(history: list[dict]) -> None:
    """Leave the process group (under torchrun; every rank is past its last collective), print the last step."""
    from gemmakit.train.distributed import shutdown

    shutdown()
    if history:
        last = history[-1]
        extra = f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        print(f"[step {last['step']}: loss {last['loss']:.4f}{extra}]", file=sys.stderr)


def _device(args: argparse.Namespace) -> str:
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return args.device


def _load_for_training(args: argparse.Namespace):
    model = load_model(args)
    if args.device != "cpu":
        model.module.to(_device(args))
    return model


def cmd_sft(args: argparse.Namespace) -> int:
    from gemmakit.train.data import read_jsonl
    from gemmakit.train.sft import SFTConfig, train_sft

    model = _load_for_training(args)
    cfg = SFTConfig(**_common(args), lora=_lora(args, default_on=True))
    history = train_sft(model.module, model.tokenizer, read_jsonl(args.data), cfg,
                        read_jsonl(args.eval) if args.eval else None, base_model_name=args.model)
    _finish(history)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from gemmakit.api import load
    from gemmakit.train.data import read_jsonl
    from gemmakit.train.distill import DistillConfig, train_distill

    student = _load_for_training(args)
    needs_teacher = args.mode == "gkd" or not (args.topk_file and Path(args.topk_file).exists())
    teacher = load(args.teacher, dtype=args.dtype, device=_device(args)).module if needs_teacher and args.teacher \
        else None
    cfg = DistillConfig(**_common(args), mode=args.mode, top_k=args.top_k, alpha=args.alpha,
                        temperature=args.temperature, beta=args.beta, lmbda=args.lmbda,
                        max_new_tokens=args.max_new_tokens, gen_temperature=args.gen_temperature,
                        lora=_lora(args, default_on=False))
    history = train_distill(student.module, student.tokenizer, read_jsonl(args.data), cfg, teacher,
                            args.topk_file, read_jsonl(args.eval) if args.eval else None)
    _finish(history)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from gemmakit.merge import read_recipe, run_recipe

    out = run_recipe(read_recipe(args.recipe), args.out, shard_size=int(args.shard_size * 2**20),
                     progress=not args.no_progress)
    print(f"[merged into {out}]", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gemmakit.export import save_gguf, save_hf
    from gemmakit.loader import DTYPES
    from gemmakit.train.lora import load_adapter, merge_lora

    model = load_model(args)
    if args.adapter:
        load_adapter(model.module, args.adapter)
        merge_lora(model.module)
    if args.format == "hf":
        source = model.source if model.source is not None and Path(model.source).is_dir() else None
        out = save_hf(model.module, args.out, DTYPES[args.dtype], tokenizer_dir=source)
    else:
        out = save_gguf(model.module, args.out, model.tokenizer, args.type)
    print(f"[exported {out}]", file=sys.stderr)
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    train = verbs.add_parser("train", help="fine-tune (SFT, LoRA by default) or distil a model")
    kinds = train.add_subparsers(dest="train_verb", required=True, metavar="KIND")

    sft = kinds.add_parser("sft", help="supervised fine-tuning, loss on answer tokens only")
    add_model_argument(sft, float_reason=TRAINING_NEEDS_FLOAT)
    _add_train_arguments(sft, lr=2e-4)
    _add_lora_arguments(sft, default_on=True)
    sft.set_defaults(run=cmd_sft)

    distill = kinds.add_parser("distill", help="distil a teacher into MODEL (offline top-k or on-policy GKD)")
    add_model_argument(distill, float_reason=TRAINING_NEEDS_FLOAT)
    _add_train_arguments(distill, lr=1e-4)
    distill.add_argument("--teacher", default=None, help="teacher model (needed unless --topk-file exists)")
    distill.add_argument("--mode", default="offline", choices=["offline", "gkd"])
    distill.add_argument("--top-k", type=int, default=64, help="teacher log-probs stored per token (offline)")
    distill.add_argument("--topk-file", default=None, help="stored teacher top-k (written when missing)")
    distill.add_argument("--alpha", type=float, default=1.0, help="weight of KD vs hard-label CE (1 = pure KD)")
    distill.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KD loss")
    distill.add_argument("--beta", type=float, default=0.5, help="GKD JSD beta: 0 forward KL, 1 reverse KL")
    distill.add_argument("--lmbda", type=float, default=0.5,
                         help="GKD: probability the student writes the answer (per micro-batch, same on all ranks)")
    distill.add_argument("--max-new-tokens", type=int, default=64, help="GKD: length of student completions")
    distill.add_argument("--gen-temperature", type=float, default=0.9, help="GKD: sampling temperature (0 = greedy)")
    _add_lora_arguments(distill, default_on=False)
    distill.set_defaults(run=cmd_distill)

    merge = verbs.add_parser("merge", help="merge models with a mergekit-style YAML recipe, tensor by tensor")
    merge.add_argument("recipe", help="YAML: merge_method, models (with parameters), base_model, parameters, dtype")
    merge.add_argument("out", help="output HF directory")
    merge.add_argument("--shard-size", type=float, default=1024, help="output shard size in MiB (default 1024)")
    merge.add_argument("--no-progress", action="store_true")
    merge.set_defaults(run=cmd_merge)

    export = verbs.add_parser("export", help="save a model as an HF directory or a GGUF file")
    add_model_argument(export, float_reason=EXPORT_NEEDS_FLOAT)
    export.add_argument("out", help="output directory (hf) or .gguf file (gguf)")
    export.add_argument("--format", default="hf", choices=["hf", "gguf"])
    export.add_argument("--type", default="F16", choices=["F32", "F16", "BF16", "Q8_0"], help="GGUF weight type")
    export.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to merge in first")
    export.set_defaults(run=cmd_export)
