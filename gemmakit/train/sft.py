"""Supervised fine-tuning: cross-entropy on the answer tokens only, LoRA by default, resumable.

The loss never materialises [B, T, V] logits: it takes the hidden states of the target positions only and
projects them onto the vocabulary in chunks under activation checkpointing (TRL's `chunked_nll` idea), so
with Gemma's 262k vocabulary memory grows with `chunk_tokens × V`, not with the sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gemmakit.train.data import Example, collate, encode_rows
from gemmakit.train.distributed import World, init
from gemmakit.train.loop import TrainConfig, train, trainable_state
from gemmakit.train.lora import LoraConfig, apply_lora


def chunked_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """Σ −log p(target | h) over rows of `hidden` [N, d], computing logits `chunk_tokens` rows at a time.

    Under autograd each chunk is checkpointed, so only one chunk's logits are alive in backward as well.
    """
    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.unembed(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start: start + chunk_tokens], targets[start: start + chunk_tokens]
        total = total + (checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t))
    return total


class CausalLMLoss(nn.Module):
    """The SFT task: (Σ token NLL over masked positions, their count) for a batch of examples."""

    def __init__(self, model: nn.Module, pad_id: int = 0, chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.model, self.pad_id, self.chunk_tokens = model, pad_id, chunk_tokens

    def collate(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = collate(examples, self.pad_id)
        return ids.to(self.model.device), mask.to(self.model.device)

    @staticmethod
    def count(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return batch[1][:, 1:].sum()

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = batch
        hidden = self.model.hidden_states(ids)
        sel = mask[:, 1:]
        return chunked_nll(self.model, hidden[:, :-1][sel], ids[:, 1:][sel], self.chunk_tokens), sel.sum()


@dataclass
class SFTConfig(TrainConfig):
    """`lora=None` trains every weight (full fine-tune); otherwise only the adapters."""

    lora: LoraConfig | None = field(default_factory=LoraConfig)
    max_length: int = 1024
    chunk_tokens: int = 1024


def train_sft(model: nn.Module, tokenizer: Any, train_rows: Sequence[dict], cfg: SFTConfig,
              eval_rows: Sequence[dict] | None = None, world: World | None = None,
              on_step: Any = None, base_model_name: str | None = None) -> list[dict[str, Any]]:
    """Fine-tune `model` in place on chat/prompt-completion rows; writes `cfg.out`/{log.jsonl, checkpoint/,
    adapter/ (PEFT format) or model/ (HF directory)}. Returns the per-step records."""
    world = world or init()
    train_examples = encode_rows(train_rows, tokenizer, cfg.max_length, "train")
    eval_examples = encode_rows(eval_rows, tokenizer, cfg.max_length, "eval") if eval_rows else None
    torch.manual_seed(cfg.seed)  # LoRA's initial A, so two runs with one seed start from the same adapter
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    task = CausalLMLoss(model, pad, cfg.chunk_tokens)
    history = train(task, train_examples, cfg, world, eval_examples, blocks=list(model.model.layers),
                    on_step=on_step)
    save_result(task, cfg, world, base_model_name)
    return history


def save_result(task: nn.Module, cfg: SFTConfig, world: World, base_model_name: str | None = None) -> Path:
    """The trained adapter (PEFT format) or the whole model (HF directory) under `cfg.out`."""
    from safetensors.torch import save_file

    from gemmakit.train.lora import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE

    state = trainable_state(task, world)
    out = Path(cfg.out)
    if not world.main:
        return out
    state = {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items()}
    if cfg.lora is not None:
        import json

        target = out / "adapter"
        target.mkdir(parents=True, exist_ok=True)
        save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(target / WEIGHTS_FILE), {"format": "pt"})
        (target / CONFIG_FILE).write_text(json.dumps(cfg.lora.to_peft(base_model_name), indent=2) + "\n")
        return target
    from gemmakit.export import save_hf

    model = task.model
    if world.distributed:  # the module holds shards; rebuild a plain one from the gathered full state
        from gemmakit.loader import build_model

        model = build_model(model.config, state, torch.float32, "trained")
    return save_hf(model, out / "model")
