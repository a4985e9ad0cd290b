"""Reader for SentencePiece's `tokenizer.model` (a serialised ModelProto) -> `Vocabulary`.

Parsed with a small bounded protobuf reader so that neither `protobuf` nor `sentencepiece` is needed at
run time. Only BPE models with the identity normaliser are accepted: that is what Gemma ships, and
anything else (Unigram, NFKC char maps) would not be reproduced exactly.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gemmakit.errors import TokenizerError
from gemmakit.tokenizer.pieces import NORMAL, Vocabulary
from gemmakit.tokenizer.tokenizer_json import read_json


def read_sentencepiece(path: str | os.PathLike[str]) -> Vocabulary:
    """The tokenizer a `tokenizer.model` describes; `add_bos` from a `tokenizer_config.json` beside it."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(f"{source}: cannot read SentencePiece model: {e}") from e
    proto = _parse_model_proto(data, source)
    trainer = proto["trainer"]
    norm = proto["normalizer"]
    if trainer["model_type"] != 2:
        names = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
        raise TokenizerError(
            f"{source}: SentencePiece model type is {names.get(trainer['model_type'], trainer['model_type'])}; "
            "only BPE (Gemma's) is supported"
        )
    if norm["charsmap"] and norm["name"] != "identity":
        raise TokenizerError(
            f"{source}: normaliser {norm['name']!r} with a precompiled char map is not supported; "
            "Gemma tokenizers use the identity normaliser"
        )
    if not norm["escape_whitespaces"] or trainer["treat_whitespace_as_suffix"]:
        raise TokenizerError(f"{source}: escape_whitespaces=false or treat_whitespace_as_suffix=true is not supported")
    pieces = [p for p, _, _ in proto["pieces"]]
    scores = [s for _, s, _ in proto["pieces"]]
    types = [t for _, _, t in proto["pieces"]]
    add_bos = True
    config = Path(path).with_name("tokenizer_config.json")
    if config.is_file():
        add_bos = bool(read_json(config).get("add_bos_token", True))
    return Vocabulary(
        pieces,
        types,
        scores=scores,
        bos_id=trainer["bos_id"],
        eos_id=trainer["eos_id"],
        unk_id=trainer["unk_id"],
        pad_id=trainer["pad_id"],
        add_bos=add_bos,
        add_dummy_prefix=norm["add_dummy_prefix"],
        remove_extra_whitespaces=norm["remove_extra_whitespaces"],
        byte_fallback=trainer["byte_fallback"],
        source=source,
    )


def _read_varint(buf: bytes, pos: int, end: int, source: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise TokenizerError(f"{source}: truncated or malformed protobuf varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int, source: str) -> Iterable[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) of one protobuf message; bounded by [start, end)."""
    pos = start
    while pos < end:
        tag, pos = _read_varint(buf, pos, end, source)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end, source)
        elif wire == 1:
            if pos + 8 > end:
                raise TokenizerError(f"{source}: truncated protobuf at byte {pos}")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end, source)
            if pos + length > end:
                raise TokenizerError(f"{source}: protobuf field {field} runs past the end of the file")
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise TokenizerError(f"{source}: truncated protobuf at byte {pos}")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise TokenizerError(
                f"{source}: unsupported protobuf wire type {wire} at byte {pos}; not a SentencePiece model"
            )
        yield field, wire, value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_piece(buf: bytes, start: int, end: int, source: str, index: int) -> tuple[str, float, int]:
    """One ModelProto.SentencePiece {1: piece, 2: score, 3: type}.

    A fast path for the layout every writer produces (one-byte tags and lengths), falling back to
    the general field reader otherwise; this keeps a 262k-piece model at well under a second.
    """
    piece: str | None = None
    score, ptype = 0.0, NORMAL
    pos = start
    try:
        if buf[pos] == 0x0A and buf[pos + 1] < 0x80:
            length = buf[pos + 1]
            pos += 2
            if pos + length > end:
                raise TokenizerError(f"{source}: piece {index} runs past its message")
            piece = buf[pos : pos + length].decode("utf-8")
            pos += length
            if pos < end and buf[pos] == 0x15 and pos + 5 <= end:
                score = _F32.unpack_from(buf, pos + 1)[0]
                pos += 5
            if pos < end and buf[pos] == 0x18 and pos + 2 <= end and buf[pos + 1] < 0x80:
                ptype = buf[pos + 1]
                pos += 2
            if pos == end:
                return piece, score, ptype
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{source}: piece {index} is not valid UTF-8") from e
    except IndexError:
        pass  # unusual layout: the general reader below reports what is wrong
    piece, score, ptype = None, 0.0, NORMAL
    for f2, w2, v2 in _fields(buf, start, end, source):
        if f2 == 1 and w2 == 2:
            try:
                piece = buf[v2[0] : v2[1]].decode("utf-8")
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{source}: piece {index} is not valid UTF-8") from e
        elif f2 == 2 and w2 == 5:
            score = _F32.unpack(v2)[0]
        elif f2 == 3 and w2 == 0:
            ptype = int(v2)
    if piece is None:
        raise TokenizerError(f"{source}: piece {index} has no text")
    return piece, score, ptype


_F32 = struct.Struct("<f")


def _parse_model_proto(buf: bytes, source: str) -> dict[str, Any]:
    """The parts of sentencepiece's ModelProto we need, with proto2 defaults for absent fields."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[str, Any] = {
        "model_type": 1, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
        "byte_fallback": False, "treat_whitespace_as_suffix": False,
    }  # fmt: skip
    normalizer: dict[str, Any] = {
        "name": "", "charsmap": b"", "add_dummy_prefix": True,
        "remove_extra_whitespaces": True, "escape_whitespaces": True,
    }  # fmt: skip
    trainer_ints = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    trainer_bools = {35: "byte_fallback", 24: "treat_whitespace_as_suffix"}
    norm_bools = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for field, wire, value in _fields(buf, 0, len(buf), source):
        if field == 1 and wire == 2:
            pieces.append(_parse_piece(buf, value[0], value[1], source, len(pieces)))
        elif field == 2 and wire == 2:
            for f2, w2, v2 in _fields(buf, value[0], value[1], source):
                if w2 == 0 and f2 in trainer_ints:
                    trainer[trainer_ints[f2]] = _signed(v2)
                elif w2 == 0 and f2 in trainer_bools:
                    trainer[trainer_bools[f2]] = bool(v2)
        elif field == 3 and wire == 2:
            for f2, w2, v2 in _fields(buf, value[0], value[1], source):
                if f2 == 1 and w2 == 2:
                    normalizer["name"] = buf[v2[0] : v2[1]].decode("utf-8", "replace")
                elif f2 == 2 and w2 == 2:
                    normalizer["charsmap"] = buf[v2[0] : v2[1]]
                elif w2 == 0 and f2 in norm_bools:
                    normalizer[norm_bools[f2]] = bool(v2)
    if not pieces:
        raise TokenizerError(f"{source}: no pieces found; this is not a SentencePiece model file")
    return {"pieces": pieces, "trainer": trainer, "normalizer": normalizer}
