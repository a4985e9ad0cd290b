"""`response_format` json_object / json_schema: grammar-constrained decoding through llguidance.

llguidance (Microsoft's grammar engine behind Guidance; on PyPI) needs the vocabulary as the bytes each token
stands for: gemmakit's tokenizer gives them through its public API (`piece`, `piece_type`): a byte piece `<0xNN>` is
that byte, a control piece (`<bos>`, `<end_of_turn>`, ...) is marked special with llguidance's 0xFF prefix, every
other piece is its text with '▁' as a space. The vocabulary table is built once per tokenizer (~1 s for Gemma 3's
262k pieces) and shared by every request.

`JsonConstraint` implements the scheduler's constraint protocol. The scheduler samples first and asks
`allows(token)`, which is one cheap parser step (`validate_tokens`); only when the model's own choice breaks the
grammar does it pay for `mask()`, the full-vocabulary bitmask (tens of ms on a 262k vocabulary, measured in
docs/serve.md), and sample again.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from gemmakit.serve.errors import bad_request

BYTE, CONTROL, UNKNOWN = 6, 3, 2
_TOKENIZERS: dict[int, Any] = {}
_LOCK = threading.Lock()


def token_bytes(tokenizer: Any) -> list[bytes]:
    """What each id of a gemmakit tokenizer stands for, in llguidance's convention (0xFF + name for specials)."""
    out = []
    for i in range(tokenizer.vocab_size):
        piece, kind = tokenizer.piece(i), tokenizer.piece_type(i)
        if kind == BYTE:
            out.append(bytes([int(piece[3:5], 16)]))
        elif kind in (CONTROL, UNKNOWN):
            out.append(b"\xff" + piece.encode("utf-8"))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _Wrapped:
    """The duck-typed tokenizer llguidance's `TokenizerWrapper` reads: ids, their bytes and an encoder."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = token_bytes(tokenizer)
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text, add_bos=False, parse_special=False)


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's tokenizer for a gemmakit tokenizer, built once and cached (stop ids act as EOS)."""
    import llguidance

    with _LOCK:
        key = id(tokenizer)
        if key not in _TOKENIZERS:
            wrapper = llguidance.TokenizerWrapper(_Wrapped(tokenizer))
            eos = sorted(getattr(tokenizer, "stop_ids", None) or {tokenizer.eos_id})
            _TOKENIZERS[key] = (tokenizer, llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size,
                                                                  eos_token=eos))
        return _TOKENIZERS[key][1]


def json_grammar(schema: dict[str, Any]) -> str:
    """llguidance's grammar for a JSON schema; a schema it cannot compile is the client's error (400)."""
    import llguidance

    try:
        # compact separators: free whitespace lets a small model pad forever between tokens of a bounded schema
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), overrides={"whitespace_flexible": False, "item_separator": ", ",
                                           "key_separator": ": "})
    except (ValueError, TypeError) as e:
        raise bad_request(f"'response_format' schema is not usable: {e}", "response_format", "invalid_schema") from None
    return grammar


class JsonConstraint:
    """The scheduler's constraint for one request: `allows`, `mask`, `advance`, `done` over an LLMatcher."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any]) -> None:
        import llguidance

        self.vocab_size = tokenizer.vocab_size
        self._ll = ll_tokenizer(tokenizer)
        grammar = json_grammar(schema)
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll)
        if error and not error.startswith("WARNING"):
            raise bad_request(f"'response_format' schema is not usable: {error}", "response_format",
                              "invalid_schema")
        self.matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise bad_request(f"'response_format' schema is not usable: {self.matcher.get_error()}",
                              "response_format", "invalid_schema")
        self.masks = 0  # how many times the full mask was needed (for the cost report and the tests)
        self.checks = 0

    def allows(self, token: int) -> bool:
        self.checks += 1
        return self.matcher.validate_tokens([int(token)]) == 1

    def mask(self) -> torch.Tensor:
        """Allowed tokens as bool [vocab] (the bitmask is little-endian bits in 32-bit words)."""
        self.masks += 1
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        return torch.from_numpy(allowed)

    def advance(self, token: int) -> None:
        self.matcher.consume_token(int(token))

    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


def constraint_for(tokenizer: Any, response_format: Any) -> JsonConstraint | None:
    """The constraint a request's `response_format` asks for, or None for plain text."""
    if response_format.type == "text":
        return None
    return JsonConstraint(tokenizer, response_format.schema or {})
