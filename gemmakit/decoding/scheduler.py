"""Continuous batching: requests join the running batch between two steps and leave on stop, length or cancel.

Each request gets a row of a `SlotCache` (its own positions, no left padding). One scheduler step:
1. frees the rows of cancelled requests and admits queued requests into free rows, restoring the longest
   prefix of their prompt from the prefix cache;
2. prefills one chunk of one newcomer's prompt (chunks end at multiples of `prefill_chunk`, so a prompt is cut
   the same way whatever was cached, and streams already running stall for one chunk at most);
3. advances every decoding row by one token in one decoder call, then chooses each row's token with the row's
   own sampling, generator, logits processor and constraint.
A row's computation never depends on the other rows (the decoders compute each row alone; sampling draws from
the request's own generator), so a request yields exactly the tokens it yields alone. `tests/decoding` checks it.

The scheduler runs in the caller's thread (`run_until_done`, what `Gemma.generate` uses) or in a background
thread (`start`, what the server uses); requests stream through `RequestHandle`, as an iterator or, for asyncio,
`handle.events()`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gemmakit.cache import SlotCache
from gemmakit.decoding.choice import choose_decoder
from gemmakit.decoding.prefix_cache import PrefixCache
from gemmakit.decoding.protocol import EagerDecoder, StepDecoder
from gemmakit.decoding.sampling import GREEDY, Sampling, choose
from gemmakit.errors import GemmaKitError, InputError
from gemmakit.model import Transformer


class QueueFull(GemmaKitError):
    """More requests are waiting than the scheduler accepts (`max_queue`): try again later."""


class Constraint(Protocol):
    """Grammar-constrained decoding: which tokens may come next (see `Request.constraint`)."""

    def allows(self, token: int) -> bool: ...
    def mask(self) -> torch.Tensor: ...
    def advance(self, token: int) -> None: ...
    def done(self) -> bool: ...


@dataclass
class Request:
    """One generation: prompt ids (BOS included), how to choose tokens, when to stop.

    `logits_processor(generated_ids, logits [V] fp32) -> logits` edits the row's logits before the choice
    (logit bias, penalties). `constraint`: the token is chosen freely first and re-chosen under `mask()` only
    when `allows` says no, so the full-vocabulary mask is paid only then. `logprobs` > 0 also returns the top
    `logprobs` alternatives of each token. Rows with any of these compute full logits.
    """

    prompt: Sequence[int]
    sampling: Sampling = GREEDY
    max_new_tokens: int = 128
    stop_ids: frozenset[int] = frozenset()
    logprobs: int = 0
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    constraint: Constraint | None = None
    want_logprob: bool = False  # the chosen token's log-probability without alternatives

    @property
    def needs_logits(self) -> bool:
        return (not self.sampling.greedy or self.logprobs > 0 or self.want_logprob
                or self.logits_processor is not None or self.constraint is not None)


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


_END = object()


class RequestHandle:
    """A request's live view: its tokens as they come (iterate, or `async for` over `events()`), and afterwards
    `finish_reason` ("stop", "length" or "cancelled"), `prompt_tokens`, `cached_tokens`, `completion_tokens`."""

    def __init__(self, request_id: int, request: Request, scheduler: Scheduler) -> None:
        self.id = request_id
        self.request = request
        self._scheduler = scheduler
        self.prompt_tokens = len(request.prompt)
        self.cached_tokens = 0
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self.cancelled = False
        self._events: list[Any] = []
        self._cond = threading.Condition()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this request; its row is freed before the next decode step (thread-safe, idempotent)."""
        self.cancelled = True
        self._scheduler._wake()

    # --- producer side (the scheduler) ----------------------------------------------------------------------------
    def _emit(self, item: Any) -> None:
        with self._cond:
            self._events.append(item)
            self._cond.notify_all()
            if self._async is not None:
                loop, queue = self._async
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _token(self, event: TokenEvent) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.tokens.append(event.token)
        self._emit(event)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.error = error
            self._emit(_END)

    # --- consumer side --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        """Blocking iterator over the token events (stop tokens are never yielded)."""
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events):
                    self._cond.wait()
                item = self._events[index]
            index += 1
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The token events for asyncio code (one consumer per handle)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            for item in self._events:
                queue.put_nowait(item)
            self._async = (asyncio.get_running_loop(), queue)
        while True:
            item = await queue.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self) -> list[int]:
        """Wait for the end and return the generated ids."""
        for _ in self:
            pass
        return self.tokens


@dataclass
class _Active:
    """A request holding a row: the prompt still to prefill, or the token to feed next."""

    handle: RequestHandle
    row: int
    generator: torch.Generator | None
    fed: int = 0  # prompt tokens already in the row's cache
    last: int | None = None  # the token chosen last, fed at the next decode step
    generated: list[int] = field(default_factory=list)

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def decoding(self) -> bool:
        return self.last is not None


class Scheduler:
    """Runs many requests over one model with per-request rows of a shared KV cache (see the module docstring).

    model: a loaded `gemmakit.Gemma` (its chosen decoder runs the steps) or a bare `Transformer` (eager).
    slots: rows decoded together; more requests wait in a queue of at most `max_queue`.
    context: positions per row (prompt plus output); default the model's context, at most 4096.
    prefix_cache_bytes: the prefix cache's budget (0: off). prefill_chunk: prompt tokens a step prefills.
    """

    def __init__(self, model: Any, slots: int = 8, context: int | None = None, prefix_cache_bytes: int = 256 << 20,
                 prefill_chunk: int = 64, max_queue: int = 256, decoder: StepDecoder | None = None) -> None:
        if isinstance(model, Transformer):
            module = model
            decoder = decoder or choose_decoder(module).decoder
        else:
            module = model.module
            decoder = decoder or model.decoder
        if slots < 1 or prefill_chunk < 1:
            raise InputError(f"slots and prefill_chunk must be >= 1, got {slots} and {prefill_chunk}")
        self.module, self.decoder, self.eager = module, decoder, EagerDecoder(module)
        self.config, self.device = module.config, module.device  # (the device property walks the embedding)
        self.context = min(context or 4096, self.config.max_position)
        self.slots_count, self.chunk, self.max_queue = slots, prefill_chunk, max_queue
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._slots: SlotCache | None = None  # allocated at the first request
        self._free: list[int] = list(range(slots))
        self._active: list[_Active] = []
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closing = False
        self.steps = 0

    # --- requests -------------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (thread-safe); its tokens stream through the returned handle."""
        prompt = list(request.prompt)
        if not prompt:
            raise InputError("the prompt needs at least one token")
        if len(prompt) > self.context:
            raise InputError(f"the prompt has {len(prompt)} tokens but a slot's context is {self.context}; "
                             "shorten the prompt")
        vocab = self.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InputError(f"token ids must lie in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        if request.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        with self._lock:
            if self._closing:
                raise GemmaKitError("the scheduler is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (max_queue={self.max_queue})")
            handle = RequestHandle(next(self._ids), request, self)
            self._queue.append(handle)
            self._work.notify_all()
        return handle

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(busy_slots=len(self._active), queue_length=len(self._queue), slots=self.slots_count,
                        prefix_hits=self.prefix_cache.hits, prefix_cached_tokens=self.prefix_cache.reused_tokens,
                        prefix_cache_bytes=self.prefix_cache.nbytes, steps=self.steps)

    @property
    def idle(self) -> bool:
        return not self._active and not self._queue

    def warm_up(self) -> None:
        """Run one short greedy request to the end in this thread, so that the first real request does not pay
        for what happens once (the slot pool's allocation, the decoder's binding to it, first calls into the
        libraries). Leaves no trace: its row is emptied, the step count restarts at 0 and nothing enters the
        prefix cache (a prompt shorter than a chunk is never saved)."""
        handle = self.submit(Request([self.config.bos_id] * min(2, self.chunk), max_new_tokens=2))
        self.run_until_done([handle])
        self.steps = 0

    # --- running --------------------------------------------------------------------------------------------------
    def run_until_done(self, handles: Sequence[RequestHandle] | None = None) -> None:
        """Step in this thread until the given handles (default: all work) are finished."""
        while not (all(h.done for h in handles) if handles is not None else self.idle):
            self.step()

    def start(self) -> Scheduler:
        """Run the steps in a background thread (daemon) until `close()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gemmakit-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread; unfinished requests end as "cancelled"."""
        with self._lock:
            self._closing = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for active in self._active:
            active.handle._finish("cancelled")
        for handle in self._queue:
            handle._finish("cancelled")
        self._active, self._queue = [], collections.deque()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._lock:
            self._work.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._active and not self._queue:
                    self._work.wait()
                if self._closing:
                    return
            try:
                self.step()
            except Exception as err:  # a failed step ends the requests in it, never the thread
                for active in list(self._active):
                    self._release(active, "error", err)

    # --- one step -------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit, prefill one chunk, decode one token for every decoding row."""
        with torch.inference_mode():
            self._admit()
            self._prefill_one()
            self._decode()
            self.steps += 1

    def _admit(self) -> None:
        for active in [a for a in self._active if a.handle.cancelled]:
            self._release(active, "cancelled")
        with self._lock:
            while self._queue and self._free:
                handle = self._queue.popleft()
                if handle.cancelled:
                    handle._finish("cancelled")
                    continue
                self._start(handle, self._free.pop(0))
            for handle in [h for h in self._queue if h.cancelled]:
                self._queue.remove(handle)
                handle._finish("cancelled")

    def _start(self, handle: RequestHandle, row: int) -> None:
        if self._slots is None:
            self._slots = SlotCache(self.config, self.slots_count, self.context, self.module.dtype,
                                    self.device)
        self._slots.reset(row)
        seed = handle.request.sampling.seed
        generator = None
        if not handle.request.sampling.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        active = _Active(handle, row, generator)
        if handle.request.max_new_tokens == 0:
            self._free.append(row)
            handle._finish("length")
            return
        snap = self.prefix_cache.lookup(handle.request.prompt)
        if snap is not None:
            active.fed = handle.cached_tokens = self.prefix_cache.restore(snap, self._slots, row)
        self._active.append(active)

    def _release(self, active: _Active, reason: str, error: BaseException | None = None) -> None:
        if active in self._active:
            self._active.remove(active)
            with self._lock:
                self._free.append(active.row)
        active.handle._finish(reason, error)

    def _decoder(self) -> StepDecoder:
        return self.decoder if self.decoder.usable(self._slots) else self.eager

    def _prefill_one(self) -> None:
        """One chunk of the first newcomer still prefilling; its first token when the prompt is done."""
        active = next((a for a in self._active if not a.decoding), None)
        if active is None:
            return
        prompt = active.request.prompt
        end = min(len(prompt), (active.fed // self.chunk + 1) * self.chunk)
        ids = torch.tensor([list(prompt[active.fed:end])], dtype=torch.long, device=self.device)
        decoder = self._decoder()
        h = decoder.prefill(ids, self._slots.view(active.row))
        active.fed = end
        if end == (len(prompt) - 1) // self.chunk * self.chunk and end > 0:  # the last chunk boundary inside it
            self.prefix_cache.save(self._slots, active.row, prompt[:end])
        if end == len(prompt):
            self._choose([active], h, decoder)

    def _decode(self) -> None:
        rows = []
        for active in [a for a in self._active if a.decoding]:
            if self._slots.length(active.row) >= self.context:
                self._release(active, "length")  # no room to feed its last token
            else:
                rows.append(active)
        if not rows:
            return
        ids = torch.tensor([a.last for a in rows], dtype=torch.long, device=self.device)
        decoder = self._decoder()
        slot_rows = [a.row for a in rows]
        if decoder.rows_independent and not any(a.request.needs_logits for a in rows):
            self._emit_events(rows, [TokenEvent(t) for t in decoder.greedy_rows(ids, self._slots, slot_rows).tolist()])
            return
        self._choose(rows, decoder.advance_rows(ids, self._slots, slot_rows), decoder)

    def _choose(self, rows: list[_Active], h: torch.Tensor, decoder: StepDecoder) -> None:
        """Each row's next token from residuals h [n, d]: plain greedy rows through the decoder's greedy head
        (the same for every batch), the others through full logits and their own rules."""
        plain = [i for i, a in enumerate(rows) if not a.request.needs_logits]
        tokens: dict[int, TokenEvent] = {}
        if plain:
            for i, token in zip(plain, self._per_row(decoder.greedy, decoder, h[plain]).tolist(), strict=True):
                tokens[i] = TokenEvent(token)
        others = [i for i in range(len(rows)) if i not in tokens]
        if others:
            logits = self._per_row(decoder.logits, decoder, h[others])
            for j, i in enumerate(others):
                tokens[i] = self._choose_one(rows[i], logits[j], decoder)
        self._emit_events(rows, [tokens[i] for i in range(len(rows))])

    @staticmethod
    def _per_row(head: Callable[[torch.Tensor], torch.Tensor], decoder: StepDecoder, h: torch.Tensor) -> torch.Tensor:
        """head(h) computed so that no row's result depends on the others (see `rows_independent`)."""
        if decoder.rows_independent or h.shape[0] == 1:
            return head(h)
        return torch.cat([head(h[i:i + 1]) for i in range(h.shape[0])])

    def _choose_one(self, active: _Active, logits: torch.Tensor, decoder: StepDecoder) -> TokenEvent:
        request = active.request
        if request.logits_processor is not None:
            logits = request.logits_processor(list(active.generated), logits.clone())
        token = self._pick(request.sampling, logits, active.generator, decoder)
        constraint = request.constraint
        if constraint is not None and not constraint.allows(token):
            allowed = constraint.mask().to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
            token = self._pick(request.sampling, logits, active.generator, decoder)
        if constraint is not None:
            constraint.advance(token)
        if not (request.logprobs or request.want_logprob):
            return TokenEvent(token)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = None
        if request.logprobs > 0:
            values, indices = logp.topk(request.logprobs)
            top = list(zip(indices.tolist(), values.tolist(), strict=True))
        return TokenEvent(token, float(logp[token]), top)

    @staticmethod
    def _pick(sampling: Sampling, logits: torch.Tensor, generator: torch.Generator | None,
              decoder: StepDecoder) -> int:
        if sampling.greedy:
            return int(decoder.argmax(logits.view(1, -1).contiguous())[0])
        return int(choose(logits.view(1, -1), sampling, [generator], decoder.argmax)[0])

    def _emit_events(self, rows: list[_Active], events: list[TokenEvent]) -> None:
        for active, event in zip(rows, events, strict=True):
            request = active.request
            if event.token in request.stop_ids:
                self._release(active, "stop")
                continue
            active.generated.append(event.token)
            active.last = event.token
            active.handle._token(event)
            if request.constraint is not None and request.constraint.done():
                self._release(active, "stop")
            elif len(active.generated) >= request.max_new_tokens:
                self._release(active, "length")
