"""Server-sent events exactly as OpenAI frames them: `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` last.

Chat chunks (`chat.completion.chunk`): the first carries `delta: {"role": "assistant", "content": ""}`, then
content deltas, then one chunk per choice with an empty delta and its `finish_reason`, then (with
`stream_options.include_usage`) a chunk with `choices: []` and the usage; every chunk has `usage: null` before
that, when usage was asked for. Completion chunks (`text_completion`) carry `text` instead of a delta. All chunks of
one response share one `id` and `created`.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class ChunkMaker:
    """Builds one response's chunks (chat or text completion) with its shared id, created time and model."""

    def __init__(self, kind: str, id: str, created: int, model: str, include_usage: bool) -> None:  # noqa: A002
        self.kind, self.id, self.created, self.model = kind, id, created, model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                               "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    def role(self, index: int) -> bytes:
        return event(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]))

    def content(self, index: int, text: str, logprobs: Any = None) -> bytes:
        if self.kind == "chat":
            choice = {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}
        return event(self._chunk([choice]))

    def finish(self, index: int, reason: str, **extra: Any) -> bytes:
        if self.kind == "chat":
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
        return event(self._chunk([choice], **extra))

    def usage(self, usage: dict[str, Any]) -> bytes:
        chunk = self._chunk([])
        chunk["usage"] = usage
        return event(chunk)
