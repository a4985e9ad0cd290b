"""One training loop for SFT and distillation: accumulation, clipping, schedule, eval, atomic resumable checkpoints.

A *task* is an `nn.Module` that knows how to collate examples and returns `(summed loss, target count)` from
`forward(batch)`; the loop divides by the global count of the whole optimizer step (all micro-batches, all
ranks), which is the normalisation that makes accumulation and data parallelism exact (transformers #34191).
A task may also define `begin_step(step, world)`, called before each optimizer step's micro-batches are collated,
so that randomness in collation (GKD's on-policy draws) can be a function of the seed and step alone: the same on
every rank, and reproduced by a resumed run without any RNG state.

Checkpoints use `torch.distributed.checkpoint` in every case (one process included): trainable parameters,
optimizer and scheduler state, each rank's RNG state, the data position and the loss history. They are written
into `checkpoint.tmp/` and renamed to `checkpoint/` only when complete, so a run killed mid-save resumes from
the previous checkpoint instead of a torn one, and the resumed run reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemmakit.errors import InputError
from gemmakit.train.data import Batches, Example
from gemmakit.train.distributed import World, all_reduce_sum, barrier, full_tensor, shard

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every trainer. `batch_size` is the *global* micro-batch (examples per
    forward, summed over ranks); one optimizer step sees `batch_size * grad_accum` examples."""

    out: str
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 100
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule={self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine or linear decay to 0 at `max_steps` (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else max(0.0, 1 - progress)


def make_optimizer(task: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and other 1-D parameters."""
    decay = [p for p in task.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in task.parameters() if p.requires_grad and p.dim() < 2]
    if not decay and not no_decay:
        raise InputError("nothing to train: no parameter requires gradients (apply LoRA or pass --full)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


class Checkpointer:
    """DCP save/load of trainable state plus a small JSON/pt of loop state; atomic by directory rename."""

    def __init__(self, out: Path, world: World) -> None:
        self.final, self.tmp, self.world = out / "checkpoint", out / "checkpoint.tmp", world

    def exists(self) -> bool:
        return (self.final / "trainer_state.json").exists()

    def save(self, task: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        if self.world.main and self.tmp.exists():
            shutil.rmtree(self.tmp)
        barrier(self.world)
        model_sd, optim_sd = get_state_dict(task, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(self.tmp))
        torch.save({"rng": torch.get_rng_state(), "scheduler": scheduler.state_dict()},
                   self.tmp / f"rank{self.world.rank}.pt")
        barrier(self.world)
        if self.world.main:
            (self.tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
            old = self.final.with_name("checkpoint.old")
            if self.final.exists():
                self.final.replace(old)
            self.tmp.replace(self.final)
            if old.exists():
                shutil.rmtree(old)
        barrier(self.world)

    def load(self, task: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(task, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(self.final))
        set_state_dict(task, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        extra = torch.load(self.final / f"rank{self.world.rank}.pt", weights_only=True)
        torch.set_rng_state(extra["rng"])
        scheduler.load_state_dict(extra["scheduler"])
        return json.loads((self.final / "trainer_state.json").read_text())


@torch.no_grad()
def evaluate(task: nn.Module, examples: Sequence[Example], batch_size: int, world: World) -> float:
    """Mean loss per target token over all examples (all ranks)."""
    was_training = task.training
    task.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for chunk in Batches(examples, batch_size, 0, 0).all(world.rank, world.size):
        if chunk:
            loss, count = task(task.collate(chunk))
            total += torch.tensor([float(loss), float(count)], dtype=torch.float64)
    total = all_reduce_sum(total.to(_reduce_device(world)), world).cpu()
    task.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def train(task: nn.Module, train_examples: Sequence[Example], cfg: TrainConfig, world: World | None = None,
          eval_examples: Sequence[Example] | None = None, blocks: Sequence[nn.Module] = (),
          on_step: Callable[[dict[str, Any]], None] | None = None,
          eval_task: nn.Module | None = None) -> list[dict[str, Any]]:
    """Run (or resume) training; returns the per-step records (loss, lr, grad_norm, tokens, eval_loss).

    `eval_task` (default: the training task) measures the eval loss, e.g. plain CE while training on KD.
    """
    world = world or World()
    if cfg.batch_size % world.size:
        raise InputError(f"batch_size={cfg.batch_size} (the global micro-batch) must be a multiple of the "
                         f"{world.size} processes, so every rank gets the same number of examples")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + world.rank)
    task = shard(task, list(blocks), world)
    task.train()
    optimizer = make_optimizer(task, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    batches = Batches(train_examples, cfg.batch_size, cfg.seed, 0)
    checkpointer = Checkpointer(out, world)
    history: list[dict[str, Any]] = []
    start = 0
    if cfg.resume:
        if not checkpointer.exists():
            raise InputError(f"{checkpointer.final}: no checkpoint to resume from (run without --resume first)")
        state = checkpointer.load(task, optimizer, scheduler)
        start, history = int(state["step"]), list(state["history"])
        batches.seek(state["data"])
        for group in optimizer.param_groups:  # the schedule follows this run's max_steps, which may be longer
            group["lr"] = group["initial_lr"] * lr_factor(start, cfg)
    params = [p for p in task.parameters() if p.requires_grad]
    log = (out / "log.jsonl").open("a") if world.main else None
    bar = _bar(start, cfg.max_steps, cfg.progress and world.main)
    begin_step = getattr(task, "begin_step", None)
    for step in range(start, cfg.max_steps):
        if begin_step is not None:
            begin_step(step, world)
        micro = [task.collate(batches.next(world.rank, world.size)) for _ in range(cfg.grad_accum)]
        counts = torch.tensor(sum(float(task.count(b)) for b in micro), dtype=torch.float64)
        total = all_reduce_sum(counts.to(_reduce_device(world)), world).cpu().clamp(min=1)
        summed = 0.0
        for batch in micro:
            loss, _ = task(batch)
            (loss * (world.size / total.item())).backward()
            summed += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        summed_all = all_reduce_sum(torch.tensor(summed, dtype=torch.float64, device=_reduce_device(world)), world)
        record = {"step": step + 1, "loss": float(summed_all.cpu() / total), "lr": lr,
                  "grad_norm": float(full_tensor(norm)), "tokens": int(total)}
        last = step + 1 == cfg.max_steps
        if eval_examples and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            record["eval_loss"] = evaluate(eval_task or task, eval_examples, cfg.batch_size, world)
        history.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            checkpointer.save(task, optimizer, scheduler, {"step": step + 1, "history": history,
                                                           "data": batches.position, "config": asdict(cfg)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", **({"eval": f"{record['eval_loss']:.4f}"}
                                                           if "eval_loss" in record else {}))
        if on_step is not None:
            on_step(record)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    return history


def trainable_state(task: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """Full (unsharded) values of the trainable parameters, on CPU; empty on ranks other than 0 when sharded."""
    if not world.distributed:
        return {n: p.detach() for n, p in task.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(task, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=True))


def _reduce_device(world: World) -> torch.device:
    """nccl reduces CUDA tensors only; gloo (and one process) CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if world.distributed and torch.cuda.is_available() \
        else torch.device("cpu")


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _bar(start: int, total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
