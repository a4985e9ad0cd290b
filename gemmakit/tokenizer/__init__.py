"""SentencePiece-exact Gemma tokenisation from a GGUF vocabulary, a `tokenizer.model` or a `tokenizer.json`.

Why our own encoder: a GGUF file carries only pieces, scores and types, and a model should run from that
file alone. One module per concern:

- `core.py`: `Tokenizer`, the SentencePiece-BPE algorithm (normalise, atomic tokens, merges, byte
  fallback) and batch decoding; its `from_*` constructors call a reader.
- `gguf.py`, `model_proto.py` (a bounded protobuf reader for `tokenizer.model`), `tokenizer_json.py`:
  one reader per source, each returning a `Vocabulary` (`pieces.py`, with the piece types).
- `stream.py`: `StreamDecoder` for streaming generation, and the per-byte U+FFFD rule both decoders share.
"""

from gemmakit.tokenizer.core import Tokenizer
from gemmakit.tokenizer.pieces import (
    BYTE,
    CONTROL,
    END_OF_TURN,
    NORMAL,
    SPACE,
    START_OF_TURN,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Vocabulary,
)
from gemmakit.tokenizer.stream import StreamDecoder

__all__ = [
    "BYTE",
    "CONTROL",
    "END_OF_TURN",
    "NORMAL",
    "SPACE",
    "START_OF_TURN",
    "UNKNOWN",
    "UNUSED",
    "USER_DEFINED",
    "StreamDecoder",
    "Tokenizer",
    "Vocabulary",
]
