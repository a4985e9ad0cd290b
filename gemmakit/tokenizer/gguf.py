"""Reader for a GGUF file's tokenizer: llama.cpp's `tokenizer.ggml.*` metadata keys -> `Vocabulary`.

Array values may be lists or 1-D numpy arrays (as `gguf`'s reader and ours return them); strings may be
bytes. `add_space_prefix` defaults to False when the key is absent, because every Gemma GGUF is written
without a dummy prefix. llama.cpp writes Gemma's whitespace-run pieces with real spaces, hence
`raw_space_pieces`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gemmakit.errors import TokenizerError
from gemmakit.tokenizer.pieces import NORMAL, Vocabulary, as_list


def read_gguf_metadata(metadata: Mapping[str, Any], source: str = "<gguf>") -> Vocabulary:
    """The tokenizer a GGUF's key/value metadata describes; `source` names the file in errors."""
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
    scores = as_list(metadata["tokenizer.ggml.scores"])
    if "tokenizer.ggml.token_type" in metadata:
        types = [int(t) for t in as_list(metadata["tokenizer.ggml.token_type"])]
    else:
        types = [NORMAL] * len(tokens)

    def opt_int(key: str) -> int | None:
        v = metadata.get(key)
        return None if v is None else int(_as_scalar(v))

    def opt_bool(key: str, default: bool) -> bool:
        v = metadata.get(key)
        return default if v is None else bool(_as_scalar(v))

    return Vocabulary(
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
