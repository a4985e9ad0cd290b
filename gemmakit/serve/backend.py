"""The server's side of the engine: one continuous-batching `Scheduler` per served model, and the translation of
its errors into HTTP ones (a prompt that does not fit: 400 `context_length_exceeded`; a full queue: 429)."""

from __future__ import annotations

from typing import Any

from gemmakit.decoding import QueueFull, Request, Sampling, Scheduler
from gemmakit.errors import InputError
from gemmakit.serve.errors import bad_request, queue_full
from gemmakit.serve.options import ServeOptions


class Backend:
    def __init__(self, gemma: Any, options: ServeOptions) -> None:
        self.gemma = gemma
        self.tokenizer = gemma.tokenizer
        self.context = min(options.context, gemma.config.max_position)
        self.max_queue = options.max_queue
        self.scheduler = Scheduler(gemma, slots=options.slots, context=self.context,
                                   prefix_cache_bytes=options.prefix_cache_mb << 20,
                                   prefill_chunk=options.prefill_chunk, max_queue=options.max_queue)
        self._warm_up()
        self.scheduler.start()

    def _warm_up(self) -> None:
        """Pay before the first request for what is built on first use: the tokenizer's matchers (~0.27 s on the
        embedded vocabulary) and the scheduler's slot pool and decoder binding (see `Scheduler.warm_up`). The first
        request's time to first token on the 270M went from ~350 to ~110 ms (in-process ASGI)."""
        for parse_special in (True, False):
            self.tokenizer.encode("warm up", parse_special=parse_special)
        self.scheduler.warm_up()

    def check_length(self, prompt_tokens: int, max_tokens: int | None, what: str) -> int:
        """The max_tokens to use; 400 `context_length_exceeded` when prompt + output cannot fit one slot."""
        room = self.context - prompt_tokens
        wanted = room if max_tokens is None else max_tokens
        if room < 1 or wanted > room:
            asked = prompt_tokens + (max_tokens or 1)
            raise bad_request(
                f"This model's maximum context length is {self.context} tokens. However, you requested {asked} "
                f"tokens ({prompt_tokens} in the {what}, {max_tokens or 1} in the completion). Please reduce the "
                f"length of the {what} or of the completion.", what, "context_length_exceeded")
        return wanted

    def submit(self, prompt: list[int], max_tokens: int, sampling: dict[str, Any], logprobs: int | None,
               processor: Any = None, constraint: Any = None, ignore_eos: bool = False) -> Any:
        """Queue one choice. `logprobs`: None for none, 0 for the sampled token's own, k for k alternatives too."""
        request = Request(prompt=prompt, sampling=Sampling(**sampling), max_new_tokens=max_tokens,
                          stop_ids=frozenset() if ignore_eos else self.tokenizer.stop_ids, logprobs=logprobs or 0,
                          want_logprob=logprobs is not None, logits_processor=processor, constraint=constraint)
        try:
            return self.scheduler.submit(request)
        except QueueFull:
            raise queue_full(self.max_queue) from None
        except InputError as e:
            raise bad_request(str(e), "messages", "invalid_value") from None

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def close(self) -> None:
        self.scheduler.close()
