"""Piece types, the marker pieces, and `Vocabulary`: what every source reader hands the BPE core.

The readers (`gguf.py`, `model_proto.py`, `tokenizer_json.py`) each turn one file format into a
`Vocabulary`; only `core.Tokenizer` interprets it, so the three sources cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Piece types, numbered as in SentencePiece's ModelProto and in GGUF `tokenizer.ggml.token_type`.
NORMAL = 1
UNKNOWN = 2
CONTROL = 3
USER_DEFINED = 4
UNUSED = 5
BYTE = 6

SPACE = "\u2581"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# Turn markers are treated as control pieces even where a file types them user-defined (some
# SentencePiece files do): otherwise a user could forge a chat turn by typing one.
ALWAYS_CONTROL = frozenset({START_OF_TURN, END_OF_TURN})

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")


@dataclass(frozen=True)
class Vocabulary:
    """One source's tokenizer, as the file states it: the arguments of `Tokenizer.__init__` (see there).

    Exactly one of `scores` (SentencePiece's merge order) or `merges` (`tokenizers`' merge order) is set.
    """

    pieces: Sequence[str]
    types: Sequence[int]
    scores: Sequence[float] | None = None
    merges: Sequence[tuple[str, str]] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_dummy_prefix: bool = False
    remove_extra_whitespaces: bool = False
    raw_match: Iterable[int] = ()
    byte_fallback: bool = True
    raw_space_pieces: bool = False
    source: str = "<memory>"


def as_list(v: Any) -> list[Any]:
    """A list from a list, tuple or numpy array (GGUF arrays come as either)."""
    return v.tolist() if hasattr(v, "tolist") else list(v)
