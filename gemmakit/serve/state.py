"""What a running server holds: the model, its scheduler, the safety classifiers and the metrics.

A server starts answering before the model is loaded (`/health` says 503 until `attach` has run), so the CLI can
show loading progress while clients already get a clear "loading" answer.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from gemmakit.serve.backend import Backend
from gemmakit.serve.errors import not_ready
from gemmakit.serve.generation import TokenText
from gemmakit.serve.metrics import Metrics
from gemmakit.serve.options import ServeOptions

log = logging.getLogger("gemmakit.serve")


class ServeState:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.gemma: Any = None
        self.backend: Backend | None = None
        self.moderator: Any = None
        self.moderation_missing: str | None = None
        self.guard: Any = None
        self.token_text: TokenText | None = None
        self.created = int(time.time())
        self.ready = False
        self.error: str | None = None
        self.metrics = Metrics(lambda: self.backend.stats() if self.backend is not None else None)

    def ready_state(self) -> ServeState:
        if not self.ready:
            raise not_ready()
        return self

    def attach(self, gemma: Any, moderation_model: Any | None = None) -> None:
        """Make the server ready: the scheduler, the moderation classifier and the guard for `gemma`."""
        from gemmakit.serve.safety_setup import build_guard, build_moderator

        lock = threading.Lock()  # classifier forwards run one at a time (they share the CPU with decoding)
        self.gemma = gemma
        self.token_text = TokenText(gemma.tokenizer)
        moderator = build_moderator(gemma, self.options, moderation_model, lock)
        self.moderator, self.moderation_missing = (None, moderator) if isinstance(moderator, str) else (moderator, None)
        self.guard = build_guard(self.moderator, self.options, lock) if self.moderator is not None else None
        self.backend = Backend(gemma, self.options)
        # The model, tokenizer and libraries are objects that live as long as the server (~175,000 with the 270M,
        # which a full collection walked in 93 ms, a pause in every stream): moved out of the collector's reach,
        # its full collections walk only what requests create.
        gc.freeze()
        self.ready = True
        log.info("ready: %s (%d slots, context %d)", self.options.model_name, self.options.slots,
                 self.backend.context)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
