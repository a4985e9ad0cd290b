"""One API request's choices running in the scheduler, turned into text deltas.

Per choice: token ids -> UTF-8-safe text (`Tokenizer.decode_stream`) -> stop strings held back and cut
(`StopMatcher`) -> optionally the guard (`StreamScreen`) -> deltas. The choices of a request (`n`, or several
prompts) run as concurrent slots; their deltas are merged into one async stream. Cancelling the stream (a client
that went away) cancels every handle, which frees the slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gemmakit.serve.guard import ServeGuard, StreamScreen
from gemmakit.serve.stops import StopMatcher

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", None: "stop"}


@dataclass
class Delta:
    index: int
    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)  # logprob entries released with this text
    finish_reason: str | None = None
    guard: list[dict[str, Any]] | None = None


@dataclass
class ChoiceSpec:
    """What one choice needs: its handle, which prompt it answers, and its stop strings."""

    index: int
    handle: Any
    prompt_index: int
    submitted: float


class TokenText:
    """Token id -> its text and UTF-8 bytes for logprob entries (cached: the vocabulary is fixed)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            piece, kind = self.tokenizer.piece(token), self.tokenizer.piece_type(token)
            data = bytes([int(piece[3:5], 16)]) if kind == 6 else piece.replace("\u2581", " ").encode("utf-8")
            hit = self._cache[token] = (data.decode("utf-8", errors="replace"), list(data))
        return hit

    def entry(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None, k: int) -> dict:
        text, data = self(token)
        alternatives = []
        for alt, lp in (top or [])[:k]:
            alt_text, alt_bytes = self(alt)
            alternatives.append({"token": alt_text, "logprob": lp, "bytes": alt_bytes})
        return {"token": text, "logprob": logprob if logprob is not None else 0.0, "bytes": data,
                "top_logprobs": alternatives, "id": token}


class Run:
    """The choices of one request; iterate `deltas()` once. Usage counts are complete when it ends."""

    def __init__(self, choices: list[ChoiceSpec], tokenizer: Any, token_text: TokenText, stops: list[str],
                 logprobs: int | None, metrics: Any, guard: ServeGuard | None, guard_prompt: str | None,
                 prompt_verdict: Any = None) -> None:
        self.choices, self.tokenizer, self.token_text = choices, tokenizer, token_text
        self.stops, self.logprobs, self.metrics = stops, logprobs, metrics
        self.guard, self.guard_prompt, self.prompt_verdict = guard, guard_prompt, prompt_verdict
        self.completion_tokens = 0

    def cancel(self) -> None:
        for c in self.choices:
            c.handle.cancel()

    async def deltas(self) -> AsyncIterator[Delta]:
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        tasks = [asyncio.create_task(self._choice(c, queue)) for c in self.choices]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    async def _choice(self, spec: ChoiceSpec, queue: asyncio.Queue) -> None:
        try:
            await self._run_choice(spec, queue)
        except asyncio.CancelledError:
            spec.handle.cancel()
            raise
        except BaseException as e:  # surfaced to the consumer, never lost in a task
            spec.handle.cancel()
            queue.put_nowait(e)
        finally:
            queue.put_nowait(None)

    async def _run_choice(self, spec: ChoiceSpec, queue: asyncio.Queue) -> None:
        decoder = self.tokenizer.decode_stream()
        stops = StopMatcher(self.stops)
        screen: StreamScreen | None = self.guard.stream(self.guard_prompt or "") if self.guard else None
        pending: list[dict[str, Any]] = []
        last: float | None = None
        finish: str | None = None

        async def emit(text: str) -> str | None:
            nonlocal pending
            if screen is not None:
                text, blocked = await screen.feed(text)
                if blocked is not None:
                    queue.put_nowait(Delta(spec.index, blocked.message or "", [], None))
                    return "content_filter"
            if text or (pending and not stops.holding):
                queue.put_nowait(Delta(spec.index, text, pending))
                pending = []
            return None

        async for event in spec.handle.events():
            now = time.perf_counter()
            if self.metrics is not None:
                if last is None:
                    self.metrics.ttft.observe(now - spec.submitted)
                else:
                    self.metrics.itl.observe(now - last)
            last = now
            self.completion_tokens += 1
            if self.logprobs is not None:
                pending.append(self.token_text.entry(event.token, event.logprob, event.top_logprobs, self.logprobs))
            text = stops.feed(decoder.feed(event.token))
            if stops.stopped:
                spec.handle.cancel()
                finish = "stop"
                pending = _within(pending, len(text))
            blocked = await emit(text)
            if blocked:
                spec.handle.cancel()
                finish = blocked
            if finish:
                break
        if finish is None:
            text = stops.feed(decoder.flush())
            text += stops.flush()
            finish = "stop" if stops.stopped else FINISH.get(spec.handle.finish_reason, "stop")
            blocked = await emit(text)
            if blocked:
                finish = blocked
        if screen is not None and finish != "content_filter":
            tail, result = await screen.finish()
            if result is not None:
                queue.put_nowait(Delta(spec.index, result.message or "", [], None))
                finish = "content_filter"
            elif tail:
                queue.put_nowait(Delta(spec.index, tail, []))
        if finish == "content_filter" and self.metrics is not None:
            self.metrics.guard_blocks.labels(stage="response").inc()
        verdicts = None
        if screen is not None:  # the prompt's screening (passed), then every screening of this answer
            verdicts = [r.to_dict() for r in ([self.prompt_verdict] if self.prompt_verdict else []) + screen.results]
        queue.put_nowait(Delta(spec.index, "", [], finish, verdicts))


def _within(entries: list[dict[str, Any]], length: int) -> list[dict[str, Any]]:
    """The logprob entries of the tokens that begin within the first `length` characters (the text kept before a
    stop string): the stop string's own tokens are not reported, as their text is not."""
    kept, at = [], 0
    for e in entries:
        if at >= length:
            break
        kept.append(e)
        at += len(e["token"])
    return kept
