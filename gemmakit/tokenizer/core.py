"""The SentencePiece-BPE core: one `Tokenizer` for every source, encoding and decoding exactly as SentencePiece.

The three sources describe the same algorithm, so one class serves all of them (the readers in this
package only turn a file into a `Vocabulary`):

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

import heapq
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmakit.errors import TokenizerError
from gemmakit.tokenizer.gguf import read_gguf_metadata
from gemmakit.tokenizer.model_proto import read_sentencepiece
from gemmakit.tokenizer.pieces import (
    ALWAYS_CONTROL,
    BYTE,
    BYTE_PIECE,
    CONTROL,
    END_OF_TURN,
    NORMAL,
    SPACE,
    START_OF_TURN,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocabulary,
    as_list,
)
from gemmakit.tokenizer.stream import UTF8_ERRORS, StreamDecoder
from gemmakit.tokenizer.tokenizer_json import read_tokenizer_json

_CACHE_LIMIT = 1 << 16


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
        for piece in ALWAYS_CONTROL:
            i = self._piece_to_id.get(piece)
            if i is not None and self._types[i] == USER_DEFINED:
                self._types[i] = CONTROL

        # Byte-fallback pieces.
        self._byte_value: dict[int, int] = {}
        byte_ids: list[int | None] = [None] * 256
        for i, piece in enumerate(self._pieces):
            if len(piece) != 6 or not piece.startswith("<0x"):
                continue
            m = BYTE_PIECE.match(piece)
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
            self._scores = [float(x) for x in as_list(scores)]
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
    def from_vocabulary(cls, vocab: Vocabulary) -> Tokenizer:
        """Build from what one of this package's source readers returned."""
        return cls(
            vocab.pieces,
            vocab.types,
            scores=vocab.scores,
            merges=vocab.merges,
            bos_id=vocab.bos_id,
            eos_id=vocab.eos_id,
            unk_id=vocab.unk_id,
            pad_id=vocab.pad_id,
            add_bos=vocab.add_bos,
            add_dummy_prefix=vocab.add_dummy_prefix,
            remove_extra_whitespaces=vocab.remove_extra_whitespaces,
            raw_match=vocab.raw_match,
            byte_fallback=vocab.byte_fallback,
            raw_space_pieces=vocab.raw_space_pieces,
            source=vocab.source,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "<gguf>") -> Tokenizer:
        """Build from GGUF key/value metadata (llama.cpp's `tokenizer.ggml.*` keys; see `gguf.py`)."""
        return cls.from_vocabulary(read_gguf_metadata(metadata, source))

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a SentencePiece `tokenizer.model` (BPE, identity normaliser; see `model_proto.py`)."""
        return cls.from_vocabulary(read_sentencepiece(path))

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face `tokenizer.json` (Gemma's BPE pipeline; see `tokenizer_json.py`)."""
        return cls.from_vocabulary(read_tokenizer_json(path))

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
                out.append(b"".join(run).decode("utf-8", errors=UTF8_ERRORS))
                run = []
            else:
                run.append(data)
        out.append(b"".join(run).decode("utf-8", errors=UTF8_ERRORS))
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
