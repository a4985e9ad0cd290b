"""Knowledge distillation: losses as pure functions, offline top-k teacher targets, on-policy GKD.

Losses (per token, summed by the callers, which divide by the global token count):

* `topk_tail_ce` — offline KD: cross-entropy against the teacher's stored top-k probabilities plus one "tail"
  bucket holding the rest of the teacher's mass, −Σ_{j∈K} p_T(j) log q(j) − (1 − Σ_K p_T) log(1 − Σ_K q),
  so the student is also told how much mass to keep *off* the top-k (TRL's `loss_add_tail`). With k = V it
  is the Gemma 2 report's objective −Σ_x P_T(x) log P_S(x).
* `generalized_jsd` — GKD's JSD(β) = β KL(T‖M) + (1 − β) KL(S‖M), M = β T + (1 − β) S (TRL's formula);
  β = 0 is taken as the forward KL(T‖S) and β = 1 as the reverse KL(S‖T), the limits of JSD/β and
  JSD/(1 − β).

Vocabulary-sized tensors exist only for `chunk_tokens` positions at a time (`chunked_pair_loss`, with
activation checkpointing under autograd), so a 262k vocabulary costs chunk × V floats, not T × V.

Offline teacher targets are stored once as safetensors: `ids` [N, k] int32 and `logprobs` [N, k] float32 for
the N target positions of all examples in order, `offsets` [n + 1] locating each example's rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gemmakit.errors import FormatError, InputError
from gemmakit.train.data import Example, collate, encode_rows
from gemmakit.train.distributed import World, barrier, init
from gemmakit.train.loop import TrainConfig, train
from gemmakit.train.lora import LoraConfig, apply_lora


# --- pure losses over one chunk of positions ----------------------------------------------------------------------
def topk_tail_ce(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 temperature: float = 1.0, tail: bool = True) -> torch.Tensor:
    """Per-position CE [N] of the student (logits [N, V]) against the teacher's top-k (ids/log-probs [N, k])."""
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = topk_logprobs.float().exp()
    s_top = s_logp.gather(-1, topk_ids.long())
    loss = -(p_t * s_top).sum(-1)
    if tail:
        t_tail = (1 - p_t.sum(-1)).clamp(min=0)
        s_tail_logp = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))  # log(1 − Σ_K q)
        loss = loss - t_tail * s_tail_logp
    return loss


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position generalised JSD(β) [N] between teacher and student distributions (logits [N, V])."""
    if not 0.0 <= beta <= 1.0:
        raise InputError(f"beta must lie in [0, 1], got {beta}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_t = (t.exp() * (t - m)).sum(-1)
    kl_s = (s.exp() * (s - m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def teacher_topk(teacher: nn.Module, hidden: torch.Tensor, k: int, chunk_tokens: int = 1024,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely next tokens and their log-probabilities for each row of `hidden` [N, d]."""
    ids, logps = [], []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_tokens):
            logp = F.log_softmax(teacher.unembed(hidden[start: start + chunk_tokens]).float() / temperature, -1)
            values, index = logp.topk(k, dim=-1)
            ids.append(index.to(torch.int32))
            logps.append(values)
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(logps)


def chunked_pair_loss(student: nn.Module, s_hidden: torch.Tensor,
                      fn: Callable[..., torch.Tensor], *per_row: torch.Tensor,
                      teacher: nn.Module | None = None, t_hidden: torch.Tensor | None = None,
                      chunk_tokens: int = 1024) -> torch.Tensor:
    """Σ over rows of fn(student logits chunk, [teacher logits chunk,] *per_row chunks), chunk by chunk.

    Student logits are recomputed in backward (checkpointing), teacher logits never need gradients.
    """
    def piece(h: torch.Tensor, th: torch.Tensor | None, *rows: torch.Tensor) -> torch.Tensor:
        args = [student.unembed(h)]
        if teacher is not None:
            with torch.no_grad():
                args.append(teacher.unembed(th))
        return fn(*args, *rows).sum()

    total = s_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, s_hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        th = t_hidden[start:end] if t_hidden is not None else None
        rows = [r[start:end] for r in per_row]
        if torch.is_grad_enabled():
            total = total + checkpoint(piece, s_hidden[start:end], th, *rows, use_reentrant=False)
        else:
            total = total + piece(s_hidden[start:end], th, *rows)
    return total


# --- offline targets on disk --------------------------------------------------------------------------------------
def _targets(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at the positions that predict a target token, and those targets."""
    hidden = model.hidden_states(ids)
    sel = mask[:, 1:]
    return hidden[:, :-1][sel], ids[:, 1:][sel]


def save_teacher_topk(teacher: nn.Module, examples: Sequence[Example], path: str | Path, k: int = 64,
                      batch_size: int = 4, chunk_tokens: int = 1024, pad_id: int = 0,
                      progress: bool = True) -> Path:
    """Run the teacher once over `examples` and store its top-k log-probs at every target position."""
    from safetensors.torch import save_file

    if k < 1 or k > teacher.config.vocab_size:
        raise InputError(f"top-k must lie in [1, {teacher.config.vocab_size}], got {k}")
    all_ids, all_logp, offsets = [], [], [0]
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="teacher top-k", unit="batch")
    for start in starts:
        chunk = examples[start: start + batch_size]
        ids, mask = collate(chunk, pad_id)
        with torch.no_grad():
            hidden = teacher.hidden_states(ids.to(teacher.device))
        for row, ex in enumerate(chunk):
            sel = torch.tensor(ex.mask[1:], dtype=torch.bool)
            h = hidden[row, : len(ex.ids) - 1][sel.to(hidden.device)]
            top_ids, top_logp = teacher_topk(teacher, h, k, chunk_tokens)
            all_ids.append(top_ids.cpu())
            all_logp.append(top_logp.float().cpu())
            offsets.append(offsets[-1] + int(sel.sum()))
    path = Path(path)
    tensors = {"ids": torch.cat(all_ids).contiguous(), "logprobs": torch.cat(all_logp).contiguous(),
               "offsets": torch.tensor(offsets, dtype=torch.int64)}
    meta = {"format": "gemmakit-topk", "k": str(k), "examples": str(len(examples)),
            "vocab_size": str(teacher.config.vocab_size)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def attach_teacher_topk(examples: Sequence[Example], path: str | Path) -> list[Example]:
    """Examples with `extra["topk_ids"/"topk_logprobs"]` from a file written by `save_teacher_topk`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids, logp, offsets = f.get_tensor("ids"), f.get_tensor("logprobs"), f.get_tensor("offsets")
    except Exception as e:  # safetensors raises several types for a bad file
        raise FormatError(f"{path}: not a teacher top-k file ({e})") from e
    if meta.get("format") != "gemmakit-topk" or len(offsets) != len(examples) + 1:
        raise FormatError(f"{path}: holds {len(offsets) - 1} examples of format {meta.get('format')!r}; expected "
                          f"{len(examples)} examples written by save_teacher_topk for this data and max_length")
    out = []
    for i, ex in enumerate(examples):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if b - a != sum(ex.mask[1:]):
            raise FormatError(f"{path}: example {i} has {b - a} stored positions but {sum(ex.mask[1:])} targets; "
                              "the data or max_length changed since the file was written")
        out.append(Example(ex.ids, ex.mask, {**ex.extra, "topk_ids": ids[a:b], "topk_logprobs": logp[a:b]}))
    return out


def _sharded_modules(module: nn.Module) -> list[Any]:
    """The FSDP2-sharded submodules of `module` (the decoder blocks under `torchrun`; none in one process)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


# --- training tasks -----------------------------------------------------------------------------------------------
@dataclass
class DistillConfig(TrainConfig):
    """`alpha` mixes hard-label CE: loss = (1 − alpha)·CE + alpha·KD (1 = pure distillation, Gemma 2's choice)."""

    mode: str = "offline"  # "offline" (stored top-k) or "gkd" (on-policy, teacher run live)
    top_k: int = 64
    alpha: float = 1.0
    temperature: float = 1.0
    beta: float = 0.5
    lmbda: float = 0.5
    max_new_tokens: int = 64
    gen_temperature: float = 0.9
    max_length: int = 1024
    chunk_tokens: int = 1024
    lora: LoraConfig | None = None


class OfflineKDLoss(nn.Module):
    """Student vs. stored teacher top-k (+ tail), optionally mixed with hard-label CE."""

    def __init__(self, student: nn.Module, alpha: float = 1.0, temperature: float = 1.0, pad_id: int = 0,
                 chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.model, self.alpha, self.temperature = student, alpha, temperature
        self.pad_id, self.chunk_tokens = pad_id, chunk_tokens

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        ids, mask = collate(examples, self.pad_id)
        return {"ids": ids, "mask": mask, "topk_ids": torch.cat([e.extra["topk_ids"] for e in examples]),
                "topk_logprobs": torch.cat([e.extra["topk_logprobs"] for e in examples])}

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["mask"][:, 1:].sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        hidden, targets = _targets(self.model, batch["ids"].to(device), batch["mask"].to(device))
        top_ids, top_logp = batch["topk_ids"].to(device), batch["topk_logprobs"].to(device)
        alpha, temp = self.alpha, self.temperature

        def fn(logits: torch.Tensor, t: torch.Tensor, ti: torch.Tensor, tl: torch.Tensor) -> torch.Tensor:
            loss = alpha * topk_tail_ce(logits, ti, tl, temp)
            if alpha < 1:
                loss = loss + (1 - alpha) * F.cross_entropy(logits.float(), t, reduction="none")
            return loss

        total = chunked_pair_loss(self.model, hidden, fn, targets, top_ids, top_logp, chunk_tokens=self.chunk_tokens)
        return total, targets.new_tensor(targets.numel())


class GKDLoss(nn.Module):
    """On-policy distillation (GKD): with probability λ the student writes the completion for the prompt
    (sampled, no gradient through sampling), else the dataset's completion is used; the loss is JSD(β) between
    teacher and student at every completion position.

    Every draw is a function of (seed, step, micro-batch, the example's index in the global micro-batch), the step
    coming from the loop's `begin_step`, never of a per-rank RNG: so all ranks take the same λ decision (under FSDP
    they must run the same collectives), N processes sample the completions one process would, and a resumed run
    draws what the uninterrupted one did.
    """

    fsdp_forward_methods = ("sample",)  # see `shard`: sampling must gather the root's (embedding) parameters

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer: Any, beta: float = 0.5, lmbda: float = 0.5,
                 max_new_tokens: int = 64, gen_temperature: float = 0.9, temperature: float = 1.0,
                 chunk_tokens: int = 1024, seed: int = 0) -> None:
        super().__init__()
        if teacher.config.vocab_size != student.config.vocab_size:
            raise InputError(f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary "
                             f"{student.config.vocab_size}; distillation needs one tokenizer")
        if not 0.0 <= lmbda <= 1.0:
            raise InputError(f"lmbda must lie in [0, 1], got {lmbda}")
        self.model = student
        self._teacher = [teacher]  # a list: keeps the teacher out of parameters(), state_dict() and FSDP
        self.tokenizer, self.beta, self.lmbda = tokenizer, beta, lmbda
        self.max_new_tokens, self.gen_temperature, self.temperature = max_new_tokens, gen_temperature, temperature
        self.chunk_tokens, self.seed = chunk_tokens, seed
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
        self._step, self._micro, self._world = 0, 0, World()

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def begin_step(self, step: int, world: World) -> None:
        """Called by the training loop before it collates step `step`'s micro-batches (the key of every draw)."""
        self._step, self._micro, self._world = step, 0, world

    def _draw(self, *key: object) -> random.Random:
        """A generator for one named draw of the current micro-batch (string seeds hash with SHA-512)."""
        return random.Random("/".join(map(str, ("gkd", self.seed, self._step, self._micro, *key))))

    def collate(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            if self._draw("lambda").random() < self.lmbda:
                examples = self.on_policy(examples)
            self._micro += 1
        ids, mask = collate(examples, self.pad_id)
        return ids, mask

    def on_policy(self, examples: Sequence[Example]) -> list[Example]:
        """Replace each completion by one the student samples from the prompt (everything before the first
        target token); the stop token, when produced, is part of the completion. Rank r holds rows r, r + N, …
        of the global micro-batch (`Batches.next`), and each row's sampling seed comes from that global index."""
        prompts = [ex.ids[: ex.mask.index(1)] if 1 in ex.mask else ex.ids for ex in examples]
        world = self._world
        seeds = [self._draw("row", world.rank + i * world.size).getrandbits(63) for i in range(len(prompts))]
        with torch.no_grad():
            outputs = self.sample(prompts, seeds)
        return [Example(p + o, [0] * len(p) + [1] * len(o)) for p, o in zip(prompts, outputs, strict=True)]

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """The student's completion of each prompt, up to and including its first stop token.

        Under FSDP this runs inside the root's forward hooks (`fsdp_forward_methods`), and the blocks are gathered
        once and kept whole until the generation ends, as TRL gathers ZeRO-3 weights for generation: no collective
        runs per decode step, so ranks may stop after different numbers of tokens and no gathered parameter is
        created under `inference_mode`. The cost is holding the whole student on each device meanwhile.
        """
        from gemmakit.decoding import Sampling, generate_tokens

        blocks = _sharded_modules(self.model)
        for block in blocks:
            block.set_reshard_after_forward(False, recurse=False)
            block.unshard()
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stops = self.tokenizer.stop_ids
        was_training = self.model.training
        self.model.eval()
        greedy = self.gen_temperature <= 0
        sampling = Sampling() if greedy else Sampling(temperature=self.gen_temperature)
        try:
            for step in generate_tokens(self.model, prompts, self.max_new_tokens, sampling, stops,
                                        row_seeds=None if greedy else seeds):
                for row, token in enumerate(step.tolist()):
                    if not done[row]:
                        outputs[row].append(token)
                        done[row] = token in stops
        finally:
            self.model.train(was_training)
            for block in blocks:
                block.reshard()
                block.set_reshard_after_forward(True, recurse=False)  # `shard`'s setting for blocks
        return outputs

    @staticmethod
    def count(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return batch[1][:, 1:].sum()

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.model.device
        ids, mask = batch[0].to(device), batch[1].to(device)
        hidden, targets = _targets(self.model, ids, mask)
        with torch.no_grad():
            t_hidden, _ = _targets(self.teacher, ids, mask)
        beta, temp = self.beta, self.temperature

        def fn(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
            return generalized_jsd(s_logits, t_logits, beta, temp)

        total = chunked_pair_loss(self.model, hidden, fn, teacher=self.teacher, t_hidden=t_hidden,
                                  chunk_tokens=self.chunk_tokens)
        return total, targets.new_tensor(targets.numel())


def train_distill(student: nn.Module, tokenizer: Any, train_rows: Sequence[dict], cfg: DistillConfig,
                  teacher: nn.Module | None = None, topk_path: str | Path | None = None,
                  eval_rows: Sequence[dict] | None = None, world: World | None = None,
                  on_step: Any = None) -> list[dict[str, Any]]:
    """Distil into `student` (all weights, or LoRA adapters when `cfg.lora`); writes `cfg.out` like SFT does.

    Offline mode reads the teacher's top-k from `topk_path`, writing it first (teacher required) when the file
    does not exist. Eval loss is the student's plain next-token CE on `eval_rows` (perplexity = exp of it).
    """
    from gemmakit.train.sft import CausalLMLoss, save_result

    world = world or init()
    if cfg.mode not in ("offline", "gkd"):
        raise InputError(f"distillation mode {cfg.mode!r}; expected 'offline' or 'gkd'")
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise InputError(f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary "
                         f"{student.config.vocab_size}; distillation needs one tokenizer")
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    examples = encode_rows(train_rows, tokenizer, cfg.max_length, "train")
    eval_examples = encode_rows(eval_rows, tokenizer, cfg.max_length, "eval") if eval_rows else None
    torch.manual_seed(cfg.seed)
    if cfg.lora is not None:
        apply_lora(student, cfg.lora)
    else:
        student.requires_grad_(True)
    if cfg.mode == "offline":
        path = Path(topk_path) if topk_path is not None else Path(cfg.out) / "teacher_topk.safetensors"
        if not path.exists():
            if teacher is None:
                raise InputError(f"{path}: no stored teacher top-k; give a teacher model to compute it")
            if world.main:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_teacher_topk(teacher, examples, path, cfg.top_k, cfg.batch_size, cfg.chunk_tokens, pad,
                                  cfg.progress)
            barrier(world)
        examples = attach_teacher_topk(examples, path)
        task: nn.Module = OfflineKDLoss(student, cfg.alpha, cfg.temperature, pad, cfg.chunk_tokens)
    else:
        if teacher is None:
            raise InputError("on-policy distillation (mode 'gkd') needs a teacher model")
        task = GKDLoss(student, teacher, tokenizer, cfg.beta, cfg.lmbda, cfg.max_new_tokens, cfg.gen_temperature,
                       cfg.temperature, cfg.chunk_tokens, cfg.seed)
    eval_task = CausalLMLoss(student, pad, cfg.chunk_tokens) if not world.distributed else None
    history = train(task, examples, cfg, world, eval_examples, blocks=list(student.model.layers), on_step=on_step,
                    eval_task=eval_task)
    save_result(task, cfg, world)
    return history
