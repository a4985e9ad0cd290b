"""Shared fixtures for the scope tests (no tests here): tiny random models wrapped as `Gemma` with a toy
tokenizer, so capture, stores, metrics, steering and dashboards run end to end in well under a second each."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from gemmakit.api import Gemma
from gemmakit.loader import build_model
from gemmakit.weights import hf
from support.tiny_models import VOCAB, save_hf_model

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


class ToyTokenizer:
    """Bytes of the text shifted past the specials; ids 0..3 are pad, eos, bos, and a turn marker."""

    pad_id, eos_id, bos_id, unk_id = 0, 1, 2, 3
    stop_ids = frozenset({1})
    vocab_size = VOCAB

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [4 + (b % (VOCAB - 4)) for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return "".join(chr(i - 4) if 36 <= i < 131 else f"<{i}>" for i in ids if not (skip_special and i < 4))

    def is_special(self, i: int) -> bool:
        return i < 4


_CACHE: dict[str, Gemma] = {}


def tiny_gemma(family: str, tmp: Path) -> Gemma:
    """A tiny random model of one family (gemma, gemma2, gemma3) as a `Gemma` with the toy tokenizer."""
    if family not in _CACHE:
        directory = tmp / family
        save_hf_model(family, directory)
        module = build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory)
        _CACHE[family] = Gemma(module, ToyTokenizer(), directory)  # type: ignore[arg-type]
    return _CACHE[family]


def one_thread():
    """Generator for a module-scoped fixture: tiny tensors run far faster on one thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
