"""Streaming decode: text of generated ids as they come, identical to `Tokenizer.decode` of them all.

SentencePiece and the `tokenizers` library turn each byte that is not part of a complete, valid UTF-8
sequence into one U+FFFD; the error handler registered here does the same for the batch decoder and the
incremental one, so a stream and a whole decode agree byte for byte.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gemmakit.tokenizer.core import Tokenizer


def _per_byte_replace(exc: UnicodeError) -> tuple[str, int]:
    """Replace exactly one bad byte by U+FFFD and resume at the next byte (SentencePiece's rule).

    Python's built-in "replace" swallows a whole truncated sequence as one U+FFFD; SentencePiece and
    the `tokenizers` library emit one per byte, and a stream decoder must agree with the batch one.
    """
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd", exc.start + 1


UTF8_ERRORS = "gemmakit-per-byte-replace"
codecs.register_error(UTF8_ERRORS, _per_byte_replace)


class StreamDecoder:
    """Incremental decoder for streaming generation: `feed(id)` returns only complete text.

    Bytes of a multi-byte character split over several `<0xXX>` pieces are held until the character
    is complete; the concatenation of all `feed` results plus `flush()` equals `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=UTF8_ERRORS)
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
