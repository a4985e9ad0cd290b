"""Stop strings over streamed text: a stop string may begin in one token and end several tokens later.

Text that could still turn out to be the start of a stop string is held back; once the stop string completes,
it and everything after it are dropped, so the client never sees any part of it (OpenAI's behaviour). When the
stream ends without a stop, the held text is released.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces; each call returns the text that is safe to emit now."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        """Text safe to emit; after a stop string completes, `stopped` is True and later calls return ""."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self._held + piece
        cut, found = len(text), None
        for stop in self.stops:
            at = text.find(stop)
            if at != -1 and at < cut:
                cut, found = at, stop
        if found is not None:
            self.stopped, self.matched, self._held = True, found, ""
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """End of the stream without a stop: release what was held."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
