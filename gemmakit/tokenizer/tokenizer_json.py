"""Reader for a Hugging Face `tokenizer.json` (BPE with byte fallback, Gemma's shape) -> `Vocabulary`.

Merge order follows the file's `merges` list, as the `tokenizers` library does. Added tokens marked
`special` behave as control pieces, the others as user-defined (always atomic); those with
`normalized: false` are matched in the raw text. A `tokenizer_config.json` beside the file, when present,
names bos/eos/pad/unk and add_bos. Pipelines other than Gemma's are refused rather than approximated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gemmakit.errors import TokenizerError
from gemmakit.tokenizer.pieces import CONTROL, NORMAL, SPACE, USER_DEFINED, Vocabulary


def read_tokenizer_json(path: str | os.PathLike[str]) -> Vocabulary:
    """The tokenizer a `tokenizer.json` (and the `tokenizer_config.json` beside it) describes."""
    source = str(path)
    doc = read_json(Path(path))
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{source}: model type is {model.get('type')!r}; only BPE (Gemma's) is supported")
    check_gemma_json_shape(doc, source)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{source}: model.vocab is missing or empty")
    n = max(int(v) for v in vocab.values()) + 1
    added = doc.get("added_tokens") or []
    n = max([n] + [int(a["id"]) + 1 for a in added])
    pieces: list[str | None] = [None] * n
    for piece, i in vocab.items():
        pieces[int(i)] = piece
    types = [NORMAL] * n
    raw: list[int] = []
    for a in added:
        i = int(a["id"])
        pieces[i] = a["content"]
        types[i] = CONTROL if a.get("special") else USER_DEFINED
        if not a.get("normalized", True):
            raw.append(i)
    missing = [i for i, p in enumerate(pieces) if p is None]
    if missing:
        raise TokenizerError(f"{source}: vocabulary ids are not contiguous; id {missing[0]} has no piece")
    merges: list[tuple[str, str]] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep:
                raise TokenizerError(f"{source}: malformed merge {m!r}")
            merges.append((a, b))
        else:
            merges.append((m[0], m[1]))
    unk = model.get("unk_token")
    config_path = Path(path).with_name("tokenizer_config.json")
    config = read_json(config_path) if config_path.is_file() else {}
    final_pieces: list[str] = [p for p in pieces if p is not None]
    index: dict[str, int] = {}
    for i, p in enumerate(final_pieces):
        index.setdefault(p, i)

    def special(name: str, fallback: str | None) -> int | None:
        value = config.get(name, fallback)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        if value not in index:
            raise TokenizerError(f"{source}: {name} {value!r} is not in the vocabulary")
        return index[value]

    add_bos = config.get("add_bos_token")
    bos_default = "<bos>"
    post = doc.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        first = (post.get("single") or [{}])[0]
        if "SpecialToken" in first:
            bos_default = first["SpecialToken"]["id"]
            add_bos = True if add_bos is None else add_bos
        elif add_bos is None:
            add_bos = False
    return Vocabulary(
        final_pieces,
        types,
        merges=merges,
        bos_id=special("bos_token", bos_default),
        eos_id=special("eos_token", "<eos>" if "<eos>" in index else None),
        unk_id=special("unk_token", unk),
        pad_id=special("pad_token", "<pad>" if "<pad>" in index else None),
        add_bos=True if add_bos is None else bool(add_bos),
        raw_match=raw,
        byte_fallback=bool(model.get("byte_fallback", False)),
        source=source,
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a TokenizerError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(doc, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return doc


def check_gemma_json_shape(doc: dict[str, Any], source: str) -> None:
    """Refuse tokenizer.json pipelines we would not reproduce exactly (we only do Gemma's)."""
    model = doc["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{source}: BPE subword prefixes/suffixes are not supported (not a Gemma tokenizer)")
    if model.get("dropout"):
        raise TokenizerError(f"{source}: BPE dropout is not supported")

    def is_space_replace(n: dict[str, Any] | None) -> bool:
        return (
            bool(n)
            and n.get("type") == "Replace"
            and (n.get("pattern") or {}).get("String") == " "
            and n.get("content") == SPACE
        )

    norm = doc.get("normalizer")
    if norm and norm.get("type") == "Sequence" and len(norm.get("normalizers") or []) == 1:
        norm = norm["normalizers"][0]
    if not is_space_replace(norm):
        raise TokenizerError(
            f"{source}: normalizer {json.dumps(norm)[:200]} is not Gemma's Replace(' ' -> '▁'); not supported"
        )
    pre = doc.get("pre_tokenizer")
    # Split on ' ' after the normaliser has removed every ' ' is a no-op (Gemma's own files have it).
    if pre and not (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "):
        raise TokenizerError(f"{source}: pre_tokenizer {json.dumps(pre)[:200]} is not supported")
