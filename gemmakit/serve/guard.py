"""`--guard POLICIES`: the existing `gemmakit.safety.Guard` applied to served chat.

`Guard` screens `model.chat_stream`; here the text comes from the scheduler instead, so this glue reuses the Guard's
own decisions (`screen_prompt`, `screen_response`, its action, message and `chunk_chars`) and reproduces its stream
rule: with action "block", streamed text is held until the chunk containing it has been screened, so nothing the
guard would block reaches the client; with "annotate", text flows at once and the verdicts ride along.
A blocked request ends with `finish_reason: "content_filter"` and the verdicts (`guard` in the response).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gemmakit.safety import Guard, GuardResult


def verdict(result: GuardResult) -> dict[str, Any]:
    return result.to_dict()


class ServeGuard:
    def __init__(self, guard: Guard, lock: threading.Lock | None = None) -> None:
        self.guard = guard
        self.lock = lock or threading.Lock()
        self.policies = [r for r in getattr(guard.classifier, "policies", [])]

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)

    async def screen_prompt(self, prompt: str) -> GuardResult | None:
        if not self.guard.check_prompt:
            return None
        return await asyncio.to_thread(self._locked, self.guard.screen_prompt, prompt)

    def stream(self, prompt: str) -> StreamScreen:
        return StreamScreen(self, prompt)


class StreamScreen:
    """Screens one answer as it grows: `feed` returns the text that may go out now and a blocking result, if any."""

    def __init__(self, owner: ServeGuard, prompt: str) -> None:
        self.owner, self.guard, self.prompt = owner, owner.guard, prompt
        self.hold = self.guard.action == "block" and self.guard.check_response
        self.answer, self.pending, self.screened_at = "", "", 0
        self.results: list[GuardResult] = []

    async def _screen(self, stage: str) -> GuardResult:
        result = await asyncio.to_thread(self.owner._locked, self.guard.screen_response, self.prompt, self.answer,
                                         stage)
        self.results.append(result)
        return result

    async def feed(self, text: str) -> tuple[str, GuardResult | None]:
        self.answer += text
        out = ""
        if self.hold:
            self.pending += text
        else:
            out = text
        chunk = self.guard.chunk_chars
        if self.guard.check_response and chunk and len(self.answer) - self.screened_at >= chunk:
            self.screened_at = len(self.answer)
            result = await self._screen("chunk")
            if result.blocked:
                return out, result
            if self.hold:
                out, self.pending = self.pending, ""
        return out, None

    async def finish(self) -> tuple[str, GuardResult | None]:
        if self.guard.check_response and (self.screened_at < len(self.answer) or not self.answer):
            result = await self._screen("response")
            if result.blocked:
                return "", result
        out, self.pending = self.pending, ""
        return out, None
