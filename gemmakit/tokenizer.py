"""SentencePiece-exact Gemma tokenisation from a GGUF vocabulary, a `tokenizer.model` or a `tokenizer.json`.

Why our own encoder: a GGUF file carries only pieces, scores and types, and a model should run from
that file alone. The three sources describe the same algorithm, so one class serves all of them:

1. Normalise: every `' '` becomes `'▁'` (U+2581). Gemma adds no dummy prefix and does not collapse spaces.
2. Split off atomic tokens, leftmost-longest: user-defined pieces (`"\\n\\n"`, runs of spaces and tabs,
   HTML tags) always, control pieces (`<start_of_turn>`, `<bos>`, ...) only when `parse_special` is on.
   This is what SentencePiece does for user-defined symbols and what llama.cpp and Hugging Face do
   for control tokens; with `parse_special=False` a user typing `<start_of_turn>` gets ordinary pieces.
3. BPE on the rest: start from characters and repeatedly merge the adjacent pair whose concatenation is
   the best piece (SentencePiece: highest score, ties to the leftmost pair; `tokenizer.json`: lowest merge
   rank, as the `tokenizers` library does). Control pieces are never produced by a merge.
4. Byte fallback: a symbol left that is not a piece becomes its UTF-8 bytes as `<0xXX>` pieces.

Speed: text is cut into chunks at `'▁'` (a merge can never cross such a cut unless some piece holds a
`'▁'` after its first character; those few left contexts are kept together), each chunk is merged with a
heap, and chunk results are cached, so ordinary prose costs a dictionary look-up per word.

Decoding turns `'▁'` back into spaces and fuses byte pieces into UTF-8; each byte that is not part of a
complete, valid UTF-8 sequence becomes one U+FFFD, as SentencePiece does. No leading space is stripped.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmakit.errors import TokenizerError

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
_ALWAYS_CONTROL = frozenset({START_OF_TURN, END_OF_TURN})

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")
_CACHE_LIMIT = 1 << 16


def _per_byte_replace(exc: UnicodeError) -> tuple[str, int]:
    """Replace exactly one bad byte by U+FFFD and resume at the next byte (SentencePiece's rule).

    Python's built-in "replace" swallows a whole truncated sequence as one U+FFFD; SentencePiece and
    the `tokenizers` library emit one per byte, and a stream decoder must agree with the batch one.
    """
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd", exc.start + 1


_ERRORS = "gemmakit-per-byte-replace"
codecs.register_error(_ERRORS, _per_byte_replace)


def _trie_regex(strings: Iterable[str]) -> re.Pattern[str] | None:
    """A regex whose match at a position is the longest of `strings` starting there.

    Python's alternation takes the first branch that matches, so a flat `a|ab` is not longest-match
    and scanning thousands of branches per character is slow; a trie has at most one live branch.
    """
    trie: dict[str, Any] = {}
    for s in strings:
        if not s:
            continue
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # the prefix itself is a token: longer continuations first, then stop here
            body = "(?:" + body + ")?"
        return body

    if not trie:
        return None
    return re.compile(build(trie))


class StreamDecoder:
    """Incremental decoder for streaming generation: `feed(id)` returns only complete text.

    Bytes of a multi-byte character split over several `<0xXX>` pieces are held until the character
    is complete; the concatenation of all `feed` results plus `flush()` equals `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=_ERRORS)
        self._at_start = tokenizer._add_dummy_prefix

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            if self._tok._remove_extra_ws:  # as `decode`: every leading space goes, however many pieces hold it
                text = text.lstrip(" ")
                self._at_start = not text
            else:
                self._at_start = False
                if text[0] == " ":  # the dummy prefix, as `decode` drops it
                    text = text[1:]
        return text

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        data = self._tok._id_bytes(token_id, self._skip_special)
        if data is None:  # a skipped control piece ends any byte sequence, as in `decode`
            return self._emit(self._flush_bytes())
        return self._emit(self._decoder.decode(data, final=False))

    def _flush_bytes(self) -> str:
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out

    def flush(self) -> str:
        """End of stream: bytes still held (an incomplete character) become U+FFFD each."""
        return self._emit(self._flush_bytes())


class Tokenizer:
    """Gemma's SentencePiece-BPE tokenizer; build it with one of the `from_*` class methods."""

    StreamDecoder = StreamDecoder

    def __init__(
        self,
        pieces: Sequence[str],
        types: Sequence[int],
        *,
        scores: Sequence[float] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = True,
        add_dummy_prefix: bool = False,
        remove_extra_whitespaces: bool = False,
        raw_match: Iterable[int] = (),
        byte_fallback: bool = True,
        raw_space_pieces: bool = False,
        source: str = "<memory>",
    ) -> None:
        """Low-level constructor; prefer the `from_*` methods.

        Exactly one of `scores` (SentencePiece rule: best score wins, ties leftmost) or `merges`
        (`tokenizers` rule: lowest rank wins) decides merge order. `raw_match` lists ids of atomic
        tokens matched in the text before normalisation (Hugging Face added tokens with
        `normalized: false`); all other atomic tokens are matched after `' '` -> `'▁'`.
        `raw_space_pieces`: control/user-defined pieces spell spaces as `' '` (llama.cpp writes Gemma's
        whitespace-run pieces that way into GGUF), so `"  "` matches two spaces of input. Without it,
        a piece holding `' '` never matches, exactly as in SentencePiece.
        """
        self.source = source
        n = len(pieces)
        if n == 0:
            raise TokenizerError(f"{source}: the vocabulary is empty")
        if len(types) != n:
            raise TokenizerError(f"{source}: {n} pieces but {len(types)} piece types; the file is inconsistent")
        if (scores is None) == (merges is None):
            raise TokenizerError(f"{source}: need exactly one of scores or merges to order BPE merges")
        self._pieces: list[str] = list(pieces)
        self._types: list[int] = list(map(int, types))
        self.vocab_size: int = n
        self.add_bos: bool = bool(add_bos)
        self._add_dummy_prefix = bool(add_dummy_prefix)
        self._remove_extra_ws = bool(remove_extra_whitespaces)

        self._piece_to_id: dict[str, int] = dict(zip(self._pieces, range(n), strict=True))
        if len(self._piece_to_id) != n:  # duplicates: the first occurrence wins, as in SentencePiece
            self._piece_to_id = {p: i for i, p in reversed(list(enumerate(self._pieces)))}
        for piece in _ALWAYS_CONTROL:
            i = self._piece_to_id.get(piece)
            if i is not None and self._types[i] == USER_DEFINED:
                self._types[i] = CONTROL

        # Byte-fallback pieces.
        self._byte_value: dict[int, int] = {}
        byte_ids: list[int | None] = [None] * 256
        for i, piece in enumerate(self._pieces):
            if len(piece) != 6 or not piece.startswith("<0x"):
                continue
            m = _BYTE_PIECE.match(piece)
            if m and self._types[i] in (BYTE, NORMAL):
                value = int(m.group(1), 16)
                self._types[i] = BYTE
                self._byte_value[i] = value
                if byte_ids[value] is None:
                    byte_ids[value] = i
        self._byte_ids = byte_ids
        self._byte_fallback_on = bool(byte_fallback)

        def lookup(name: str, given: int | None, default_piece: str, required: bool) -> int:
            if given is not None and given >= 0:
                if given >= n:
                    raise TokenizerError(f"{source}: {name} id {given} is outside the vocabulary of {n} pieces")
                return int(given)
            found = self._piece_to_id.get(default_piece)
            if found is None:
                if required:
                    raise TokenizerError(
                        f"{source}: no {name} id given and no {default_piece!r} piece in the vocabulary"
                    )
                return -1
            return found

        self.bos_id: int = lookup("bos", bos_id, "<bos>", True)
        self.eos_id: int = lookup("eos", eos_id, "<eos>", True)
        self.unk_id: int = lookup("unk", unk_id, "<unk>", False)
        self.pad_id: int = lookup("pad", pad_id, "<pad>", False)
        self.start_of_turn_id: int | None = self._piece_to_id.get(START_OF_TURN)
        self.end_of_turn_id: int | None = self._piece_to_id.get(END_OF_TURN)
        self.stop_ids: frozenset[int] = frozenset(
            i for i in (self.eos_id, self.end_of_turn_id) if i is not None and i >= 0
        )

        # Pieces a merge may produce and a final symbol may map to: SentencePiece's `pieces_`
        # (normal, user-defined, unused); never control, unknown or byte pieces.
        mergeable = (NORMAL, USER_DEFINED, UNUSED)
        types_ = self._types
        self._bpe_ids: dict[str, int] = {p: i for p, i in self._piece_to_id.items() if types_[i] in mergeable}
        self._rank: dict[str, float] | None = None
        self._merge_rank: dict[tuple[str, str], int] | None = None
        self._scores: list[float] | None = None
        if scores is not None:
            if len(scores) != n:
                raise TokenizerError(f"{source}: {n} pieces but {len(scores)} scores; the file is inconsistent")
            # Heap keys are minimised, so store the negated score.
            self._scores = [float(x) for x in _as_list(scores)]
            neg = [-x for x in self._scores]
            self._rank = {p: neg[i] for p, i in self._bpe_ids.items()}
        else:
            assert merges is not None
            self._merge_rank = {}
            for rank, (a, b) in enumerate(merges):
                if a + b in self._bpe_ids:
                    self._merge_rank.setdefault((a, b), rank)

        # Atomic tokens: user-defined always, control only with parse_special.
        raw_ids = set(raw_match)
        atomic_all: dict[str, int] = {}
        atomic_user: dict[str, int] = {}
        raw_all: dict[str, int] = {}
        raw_user: dict[str, int] = {}
        for i, t in enumerate(self._types):
            if t != CONTROL and t != USER_DEFINED:
                continue
            piece = self._pieces[i]
            if not piece:
                continue
            if i in raw_ids:
                form, full, user = piece, raw_all, raw_user
            else:
                form = piece.replace(" ", SPACE) if raw_space_pieces else piece
                full, user = atomic_all, atomic_user
            full.setdefault(form, i)
            if t == USER_DEFINED:
                user.setdefault(form, i)
        self._atomic = {True: atomic_all, False: atomic_user}
        self._raw_atomic = {True: raw_all, False: raw_user}
        self._atomic_re: dict[bool, re.Pattern[str] | None] = {}
        self._raw_atomic_re: dict[bool, re.Pattern[str] | None] = {}

        # Cut points for chunked BPE: before each '▁' unless the character before it can start a
        # piece that continues across the '▁' (e.g. Gemma's '>▁</').
        unsafe = set()
        for piece in self._bpe_ids:
            k = piece.find(SPACE, 1)
            while k > 0:
                unsafe.add(piece[k - 1])
                k = piece.find(SPACE, k + 1)
        if unsafe:
            cls = "".join(re.escape(c) for c in sorted(unsafe))
            self._cut = re.compile(f"(?<![{cls}])(?={SPACE})")
        else:
            self._cut = re.compile(f"(?={SPACE})")
        self._cache: dict[str, tuple[int, ...]] = {}
        self._decoded: dict[int, bytes] = {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "<gguf>") -> Tokenizer:
        """Build from GGUF key/value metadata (llama.cpp's `tokenizer.ggml.*` keys).

        Array values may be lists or 1-D numpy arrays. `add_space_prefix` defaults to False when the
        key is absent, because every Gemma GGUF is written without a dummy prefix.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model is not None and _as_str(model) != "llama":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model is {_as_str(model)!r}; only 'llama' (SentencePiece), "
                "which every Gemma GGUF uses, is supported"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
            if key not in metadata:
                raise TokenizerError(f"{source}: metadata key {key!r} is missing; cannot build the tokenizer")
        tokens = [_as_str(t) for t in metadata["tokenizer.ggml.tokens"]]
        scores = _as_list(metadata["tokenizer.ggml.scores"])
        if "tokenizer.ggml.token_type" in metadata:
            types = [int(t) for t in _as_list(metadata["tokenizer.ggml.token_type"])]
        else:
            types = [NORMAL] * len(tokens)

        def opt_int(key: str) -> int | None:
            v = metadata.get(key)
            return None if v is None else int(_as_scalar(v))

        def opt_bool(key: str, default: bool) -> bool:
            v = metadata.get(key)
            return default if v is None else bool(_as_scalar(v))

        return cls(
            tokens,
            types,
            scores=scores,
            bos_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
            pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            add_bos=opt_bool("tokenizer.ggml.add_bos_token", True),
            add_dummy_prefix=opt_bool("tokenizer.ggml.add_space_prefix", False),
            raw_space_pieces=True,
            source=source,
        )

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a SentencePiece `tokenizer.model` (a serialised ModelProto).

        Parsed with a small bounded protobuf reader so that neither `protobuf` nor `sentencepiece`
        is needed at run time. Only BPE models with the identity normaliser are accepted: that is
        what Gemma ships, and anything else (Unigram, NFKC char maps) would not be reproduced exactly.
        """
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
            raise TokenizerError(
                f"{source}: escape_whitespaces=false or treat_whitespace_as_suffix=true is not supported"
            )
        pieces = [p for p, _, _ in proto["pieces"]]
        scores = [s for _, s, _ in proto["pieces"]]
        types = [t for _, _, t in proto["pieces"]]
        add_bos = True
        config = Path(path).with_name("tokenizer_config.json")
        if config.is_file():
            add_bos = bool(_read_json(config).get("add_bos_token", True))
        return cls(
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

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face `tokenizer.json` (BPE with byte fallback, Gemma's shape).

        Merge order follows the file's `merges` list, as the `tokenizers` library does. Added tokens
        marked `special` behave as control pieces, the others as user-defined (always atomic). A
        `tokenizer_config.json` beside the file, when present, names bos/eos/pad/unk and add_bos.
        """
        source = str(path)
        doc = _read_json(Path(path))
        model = doc.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{source}: model type is {model.get('type')!r}; only BPE (Gemma's) is supported")
        _check_gemma_json_shape(doc, source)
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
        config = _read_json(config_path) if config_path.is_file() else {}
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
        return cls(
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

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model directory: `tokenizer.model` if present, else `tokenizer.json`."""
        d = Path(path)
        if (d / "tokenizer.model").is_file():
            return cls.from_sentencepiece(d / "tokenizer.model")
        if (d / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(d / "tokenizer.json")
        raise TokenizerError(f"{d}: no tokenizer.model or tokenizer.json found in this directory")

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, SentencePiece-exact.

        `parse_special=True` turns control pieces written literally in the text (`<start_of_turn>`)
        into their ids; pass False for untrusted text so it cannot forge a turn or a BOS.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if add_bos else []
        parse_special = bool(parse_special)
        if self._add_dummy_prefix or self._remove_extra_ws:
            # SentencePiece-only options (no raw-matched added tokens exist in that case).
            segments: list[str | int] = [self._sp_normalize(text)]
        else:
            segments = self._split(text, self._matcher(parse_special, raw=True), self._raw_atomic[parse_special])
        norm_re = self._matcher(parse_special, raw=False)
        for seg in segments:
            if isinstance(seg, int):
                ids.append(seg)
                continue
            for part in self._split(seg.replace(" ", SPACE), norm_re, self._atomic[parse_special]):
                if isinstance(part, int):
                    ids.append(part)
                else:
                    self._encode_plain(part, ids)
        return ids

    def _sp_normalize(self, text: str) -> str:
        """SentencePiece's normaliser for `remove_extra_whitespaces` / `add_dummy_prefix` (not Gemma's).

        Leading spaces dropped, runs of spaces collapsed, then the dummy '▁' prepended and trailing
        '▁' (escaped spaces, and literal '▁' too, as SentencePiece does) dropped.
        """
        if self._remove_extra_ws:
            text = re.sub("  +", " ", text.lstrip(" "))
        if not text:
            return ""
        norm = text.replace(" ", SPACE)
        if self._add_dummy_prefix:
            norm = SPACE + norm
        if self._remove_extra_ws:
            norm = norm.rstrip(SPACE)
        return norm

    def _matcher(self, parse_special: bool, raw: bool) -> re.Pattern[str] | None:
        """Compiled leftmost-longest matcher for the atomic tokens, built on first use."""
        store = self._raw_atomic_re if raw else self._atomic_re
        if parse_special not in store:
            table = (self._raw_atomic if raw else self._atomic)[parse_special]
            store[parse_special] = _trie_regex(table)
        return store[parse_special]

    @staticmethod
    def _split(text: str, pattern: re.Pattern[str] | None, table: dict[str, int]) -> list[str | int]:
        if pattern is None:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() == m.end():
                continue
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(table[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _encode_plain(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for chunk in self._cut.split(text):
            if not chunk:
                continue
            ids = cache.get(chunk)
            if ids is None:
                ids = self._bpe(chunk)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[chunk] = ids
            out.extend(ids)

    def _bpe(self, chunk: str) -> tuple[int, ...]:
        """Merge one chunk with a heap of candidate pairs; stale entries are skipped on pop."""
        syms = list(chunk)
        n = len(syms)
        if n > 1:
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            heap: list[tuple[float, int, int, int]] = []
            if self._rank is not None:
                rank = self._rank

                def key(a: str, b: str) -> float | None:
                    return rank.get(a + b)
            else:
                assert self._merge_rank is not None
                merge_rank = self._merge_rank

                def key(a: str, b: str) -> float | None:
                    return merge_rank.get((a, b))

            for i in range(n - 1):
                r = key(syms[i], syms[i + 1])
                if r is not None:
                    heap.append((r, i, i + 1, len(syms[i + 1])))
            heapq.heapify(heap)
            while heap:
                _, i, j, right_len = heapq.heappop(heap)
                # Stale if i was absorbed, i's right neighbour changed, or j grew since the push.
                if not syms[i] or nxt[i] != j or len(syms[j]) != right_len:
                    continue
                syms[i] = syms[i] + syms[j]
                syms[j] = ""
                k = nxt[j]
                nxt[i] = k
                if k != -1:
                    prv[k] = i
                p = prv[i]
                if p != -1:
                    r = key(syms[p], syms[i])
                    if r is not None:
                        heapq.heappush(heap, (r, p, i, len(syms[i])))
                if k != -1:
                    r = key(syms[i], syms[k])
                    if r is not None:
                        heapq.heappush(heap, (r, i, k, len(syms[k])))
            syms = [s for s in syms if s]
        ids: list[int] = []
        bpe_ids = self._bpe_ids
        for s in syms:
            i = bpe_ids.get(s)
            if i is not None and self._types[i] != UNUSED:
                ids.append(i)
            elif i is not None:
                ids.extend(self._resegment(s))
            else:
                self._byte_fallback(s, ids)
        return tuple(ids)

    def _resegment(self, piece: str) -> list[int]:
        """SentencePiece splits an UNUSED piece back into the best pair of pieces that form it."""
        best: tuple[float, int] | None = None
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in self._bpe_ids and b in self._bpe_ids:
                r = self._rank.get(a + b) if self._rank is not None else None
                cand = (r if r is not None else 0.0, k)
                if best is None or cand < best:
                    best = cand
        if best is None:
            out: list[int] = []
            self._byte_fallback(piece, out)
            return out
        k = best[1]
        out = []
        for part in (piece[:k], piece[k:]):
            i = self._bpe_ids[part]
            out.extend(self._resegment(part) if self._types[i] == UNUSED else [i])
        return out

    def _byte_fallback(self, s: str, out: list[int]) -> None:
        for ch in s:
            i = self._bpe_ids.get(ch)
            if i is not None and self._types[i] != UNUSED:
                out.append(i)
                continue
            for b in ch.encode("utf-8"):
                bid = self._byte_ids[b] if self._byte_fallback_on else None
                if bid is None:
                    if self.unk_id < 0:
                        raise TokenizerError(
                            f"{self.source}: character {ch!r} is not in the vocabulary and there is "
                            "neither a byte-fallback piece nor an unknown piece"
                        )
                    if not (out and out[-1] == self.unk_id):  # SentencePiece fuses runs of unknowns
                        out.append(self.unk_id)
                    break
                out.append(bid)

    # ------------------------------------------------------------------ decoding

    def _id_bytes(self, token_id: int, skip_special: bool) -> bytes | None:
        """UTF-8 bytes one id contributes to decoded text (a raw byte for `<0xXX>` pieces).

        None for a skipped control piece: like SentencePiece, it still separates byte runs, so
        `<0xC3><eos><0xA9>` is two invalid bytes, not "é".
        """
        data = self._decoded.get(token_id)
        if data is None:
            tid = int(token_id)
            if not 0 <= tid < self.vocab_size:
                raise TokenizerError(
                    f"{self.source}: token id {token_id} is outside the vocabulary of {self.vocab_size}"
                )
            if tid in self._byte_value:
                data = bytes([self._byte_value[tid]])
            else:
                data = self._pieces[tid].replace(SPACE, " ").encode("utf-8")
            self._decoded[tid] = data
        if skip_special and self._types[token_id] in (CONTROL, UNKNOWN):
            return None
        return data

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`: '▁' -> ' ', byte pieces fused, each invalid byte -> U+FFFD.

        `skip_special=True` drops control pieces (`<bos>`, `<end_of_turn>`, ...).
        """
        out: list[str] = []
        run: list[bytes] = []
        for i in ids:
            data = self._id_bytes(i, skip_special)
            if data is None:
                out.append(b"".join(run).decode("utf-8", errors=_ERRORS))
                run = []
            else:
                run.append(data)
        out.append(b"".join(run).decode("utf-8", errors=_ERRORS))
        text = "".join(out)
        if self._add_dummy_prefix and text.startswith(" "):
            # SentencePiece drops the dummy prefix it added, and with remove_extra_whitespaces every leading
            # space of the sentence (never the case for Gemma, which has neither option)
            text = text.lstrip(" ") if self._remove_extra_ws else text[1:]
        return text

    def decode_stream(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental decoder for streaming generation."""
        return StreamDecoder(self, skip_special)

    # ------------------------------------------------------------------ vocabulary

    def _check_id(self, id: int) -> int:  # noqa: A002
        i = int(id)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"{self.source}: token id {id} is outside the vocabulary of {self.vocab_size}")
        return i

    def piece(self, id: int) -> str:  # noqa: A002 - the public name other modules use
        """The stored piece for `id` (with '▁' for spaces, `<0xXX>` for bytes)."""
        return self._pieces[self._check_id(id)]

    def token_id(self, piece: str) -> int | None:
        """The id of an exact piece, or None."""
        return self._piece_to_id.get(piece)

    def piece_type(self, id: int) -> int:
        """Piece type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
        return self._types[self._check_id(id)]

    def piece_scores(self) -> list[float]:
        """A SentencePiece score per piece (for writing a GGUF or a tokenizer.model).

        The file's own scores when it had them; for a `tokenizer.json`, minus the rank of the first
        merge that makes the piece (0.0 for pieces no merge makes), which orders merges the same way.
        """
        if self._scores is not None:
            return list(self._scores)
        assert self._merge_rank is not None
        made: dict[str, int] = {}
        for (a, b), rank in self._merge_rank.items():
            if rank < made.get(a + b, rank + 1):
                made[a + b] = rank
        return [-float(made[p]) if p in made else 0.0 for p in self._pieces]

    def is_special(self, id: int) -> bool:
        """True for control pieces: the ones `decode(skip_special=True)` drops."""
        return self._types[self._check_id(id)] in (CONTROL, UNKNOWN)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, source={self.source!r})"


# ---------------------------------------------------------------------- helpers


def _as_list(v: Any) -> list[Any]:
    return v.tolist() if hasattr(v, "tolist") else list(v)


def _as_scalar(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        if len(v) != 1:
            raise TokenizerError(f"expected a scalar metadata value, got a list of {len(v)}")
        v = v[0]
    return v


def _as_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"GGUF token is not valid UTF-8: {bytes(v)!r}") from e
    if hasattr(v, "tobytes"):
        return _as_str(v.tobytes())
    raise TokenizerError(f"expected a string in GGUF tokenizer metadata, got {type(v).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(doc, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return doc


def _check_gemma_json_shape(doc: dict[str, Any], source: str) -> None:
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


# ---------------------------------------------------------------------- SentencePiece ModelProto


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


__all__ = [
    "BYTE",
    "CONTROL",
    "NORMAL",
    "UNKNOWN",
    "UNUSED",
    "USER_DEFINED",
    "StreamDecoder",
    "Tokenizer",
]
