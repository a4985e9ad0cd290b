"""Shared pieces for the safety tests: a word-level stand-in tokenizer and tiny random models that use it."""

from __future__ import annotations

import re
import zlib

import torch

from gemmakit.loader import build_model
from gemmakit.weights import hf
from support.tiny_models import VOCAB, save_hf_model

YES, NO = VOCAB - 2, VOCAB - 1


class WordTokenizer:
    """Words and punctuation hashed into the tiny vocabulary; `<...>` control pieces kept whole.

    Deterministic and prefix-stable, which is all the scoring tests need from a tokenizer.
    """

    bos_id = 2

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        pieces = re.findall(r"<\w+>|\w+|[^\w\s]", text)
        ids = [10 + zlib.crc32(p.encode()) % (VOCAB - 20) for p in pieces]
        return ([self.bos_id] if add_bos else []) + ids

    def token_id(self, piece: str) -> int | None:
        return {"Yes": YES, "No": NO}.get(piece)


def tiny_model(family: str, directory):
    """Our Transformer on a tiny transformers-saved model, with room for ShieldGemma-length prompts."""
    save_hf_model(family, directory)
    config = hf.read_config(directory).replace(max_position=2048)
    return build_model(config, hf.read_state_dict(directory), torch.float32, directory)
