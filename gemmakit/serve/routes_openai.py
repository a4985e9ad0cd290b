"""`/v1/chat/completions`, `/v1/completions` and `/v1/models`: OpenAI's generation API over the scheduler."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from gemmakit.errors import GemmaKitError
from gemmakit.serve import openai_schema as schema
from gemmakit.serve.constrained import constraint_for
from gemmakit.serve.errors import bad_request, model_not_found
from gemmakit.serve.generation import ChoiceSpec, Run
from gemmakit.serve.processors import make_processor
from gemmakit.serve.streaming import DONE, HEADERS, ChunkMaker

router = APIRouter()


def _state(request: Request) -> Any:
    return request.app.state.serve.ready_state()


def _check_model(state: Any, requested: str | None) -> None:
    if requested is not None and requested != state.options.model_name:
        raise model_not_found(requested, state.options.model_name)


def _sampling(params: schema.GenParams, offset: int) -> dict[str, Any]:
    seed = None if params.seed is None else (params.seed + offset) % (1 << 63)  # choice i of n: seed + i
    return dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, seed=seed)


async def _submit(state: Any, prompts: list[list[int]], max_tokens: list[int], params: schema.GenParams) -> list[
        ChoiceSpec]:
    """n handles per prompt; if any submission fails, the ones already running are cancelled."""
    choices: list[ChoiceSpec] = []
    processor = make_processor(params.logit_bias, params.presence_penalty, params.frequency_penalty)
    wants_constraint = params.response_format.type != "text"
    try:
        for p, (ids, budget) in enumerate(zip(prompts, max_tokens, strict=True)):
            for j in range(params.n):
                constraint = None
                if wants_constraint:
                    constraint = await asyncio.to_thread(constraint_for, state.gemma.tokenizer,
                                                         params.response_format)
                handle = state.backend.submit(ids, budget, _sampling(params, j), params.logprobs, processor,
                                              constraint, params.ignore_eos)
                choices.append(ChoiceSpec(len(choices), handle, p, time.perf_counter()))
    except BaseException:
        for c in choices:
            c.handle.cancel()
        raise
    return choices


def _usage(run: Run | None, prompt_tokens: int, cached: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def _cached(choices: list[ChoiceSpec]) -> int:
    per_prompt: dict[int, int] = {}
    for c in choices:
        per_prompt[c.prompt_index] = max(per_prompt.get(c.prompt_index, 0), int(c.handle.cached_tokens or 0))
    return sum(per_prompt.values())


async def _watch_disconnect(request: Request, run: Run) -> None:
    """Non-streaming requests: a client that goes away cancels its slots (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": [{k: v for k, v in e.items() if k != "id"} for e in entries], "refusal": None}


def _text_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class _Exchange:
    """Everything one request answers with, shared by chat and completions."""

    def __init__(self, kind: str, state: Any, params: schema.GenParams, prompt_tokens: int,
                 echoes: list[str] | None = None) -> None:
        self.kind, self.state, self.params, self.prompt_tokens = kind, state, params, prompt_tokens
        self.echoes = echoes
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = state.options.model_name

    def _logprobs(self, entries: list[dict[str, Any]], offset: int) -> Any:
        if self.params.logprobs is None:
            return None
        return _chat_logprobs(entries) if self.kind == "chat" else _text_logprobs(entries, offset)

    def _finish_usage(self, run: Run, choices: list[ChoiceSpec]) -> dict[str, Any]:
        cached = _cached(choices)
        self.state.metrics.usage(self.prompt_tokens, run.completion_tokens, cached)
        return _usage(run, self.prompt_tokens, cached, run.completion_tokens)

    async def whole(self, request: Request, run: Run, choices: list[ChoiceSpec]) -> JSONResponse:
        count = len(choices)
        texts = [self.echoes[c.prompt_index] if self.echoes else "" for c in choices]
        entries: list[list[dict[str, Any]]] = [[] for _ in range(count)]
        finish: list[str | None] = [None] * count
        guard: list[Any] = [None] * count
        watcher = asyncio.create_task(_watch_disconnect(request, run))
        try:
            async for d in run.deltas():
                texts[d.index] += d.text
                entries[d.index] += d.tokens
                if d.finish_reason:
                    finish[d.index], guard[d.index] = d.finish_reason, d.guard
        finally:
            watcher.cancel()
        out = []
        for i in range(count):
            if self.kind == "chat":
                choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": texts[i],
                                                                 "refusal": None}}
            else:
                choice = {"index": i, "text": texts[i]}
            choice["logprobs"] = self._logprobs(entries[i], 0)
            choice["finish_reason"] = finish[i]
            if guard[i] is not None:
                choice["guard"] = guard[i]
            out.append(choice)
        body = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None, "choices": out,
                "usage": self._finish_usage(run, choices)}
        return JSONResponse(body)

    def stream(self, run: Run, choices: list[ChoiceSpec]) -> StreamingResponse:
        maker = ChunkMaker(self.kind, self.id, self.created, self.model, self.params.include_usage)

        async def body() -> AsyncIterator[bytes]:
            offsets = [0] * len(choices)
            try:
                for c in choices:
                    if self.kind == "chat":
                        yield maker.role(c.index)
                    elif self.echoes:
                        echo = self.echoes[c.prompt_index]
                        offsets[c.index] = len(echo)
                        yield maker.content(c.index, echo)
                async for d in run.deltas():
                    if d.text or d.tokens:
                        yield maker.content(d.index, d.text, self._logprobs(d.tokens, offsets[d.index]))
                        offsets[d.index] += len(d.text)
                    if d.finish_reason:
                        extra = {"guard": d.guard} if d.guard is not None else {}
                        yield maker.finish(d.index, d.finish_reason, **extra)
                usage = self._finish_usage(run, choices)
                if self.params.include_usage:
                    yield maker.usage(usage)
                yield DONE
            finally:
                run.cancel()

        # the background task also runs when the client left before the first chunk (the generator never started)
        return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS,
                                 background=BackgroundTask(run.cancel))

    def refusal(self, result: Any) -> Any:
        """The prompt was blocked by the guard: the block message, `content_filter`, and the verdict."""
        self.state.metrics.guard_blocks.labels(stage="prompt").inc()
        verdict = [result.to_dict()]
        text = result.message or ""
        usage = _usage(None, self.prompt_tokens, 0, 0)
        if self.params.stream:
            maker = ChunkMaker(self.kind, self.id, self.created, self.model, self.params.include_usage)

            async def body() -> AsyncIterator[bytes]:
                for i in range(self.params.n):
                    if self.kind == "chat":
                        yield maker.role(i)
                    yield maker.content(i, text)
                    yield maker.finish(i, "content_filter", guard=verdict)
                if self.params.include_usage:
                    yield maker.usage(usage)
                yield DONE

            return StreamingResponse(body(), media_type="text/event-stream", headers=HEADERS)
        choices = []
        for i in range(self.params.n):
            choice: dict[str, Any] = ({"index": i, "message": {"role": "assistant", "content": text, "refusal": None}}
                                      if self.kind == "chat" else {"index": i, "text": text})
            choices.append({**choice, "logprobs": None, "finish_reason": "content_filter", "guard": verdict})
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                             "created": self.created, "model": self.model, "system_fingerprint": None,
                             "choices": choices, "usage": usage})

    async def respond(self, request: Request, prompts: list[list[int]], budgets: list[int],
                      guard_prompt: str | None) -> Any:
        state = self.state
        screened = None
        if state.guard is not None and guard_prompt is not None:
            screened = await state.guard.screen_prompt(guard_prompt)
            if screened is not None and screened.blocked:
                return self.refusal(screened)
        choices = await _submit(state, prompts, budgets, self.params)
        run = Run(choices, state.gemma.tokenizer, state.token_text, self.params.stop, self.params.logprobs,
                  state.metrics, state.guard, guard_prompt, screened)
        if self.params.stream:
            return self.stream(run, choices)
        return await self.whole(request, run, choices)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    state = _state(request)
    body = schema.parse_json(await request.body())
    tokenizer = state.gemma.tokenizer
    params = schema.gen_params(body, tokenizer.vocab_size, chat=True)
    _check_model(state, params.model)
    messages = schema.messages(body)
    try:
        from gemmakit.chat import render_chat

        ids = render_chat(messages, tokenizer)
    except GemmaKitError as e:
        raise bad_request(str(e), "messages", "invalid_value") from None
    budget = state.backend.check_length(len(ids), params.max_tokens, "messages")
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    exchange = _Exchange("chat", state, params, len(ids))
    return await exchange.respond(request, [ids], [budget], last_user)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    state = _state(request)
    body = schema.parse_json(await request.body())
    tokenizer = state.gemma.tokenizer
    params = schema.gen_params(body, tokenizer.vocab_size, chat=False)
    _check_model(state, params.model)
    echo = schema.completion_extras(body, params.n)
    raw = schema.prompts(body, tokenizer.vocab_size)
    prompts = [state.gemma.encode(p) if isinstance(p, str) else p for p in raw]
    if any(not ids for ids in prompts):
        raise bad_request("'prompt' must not be empty", "prompt", "invalid_value")
    if params.max_tokens is None:
        params.max_tokens = state.options.completion_max_tokens
    budgets = [state.backend.check_length(len(ids), params.max_tokens, "prompt") for ids in prompts]
    echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in raw] if echo else None
    exchange = _Exchange("text", state, params, sum(map(len, prompts)), echoes)
    guard_prompt = raw[0] if isinstance(raw[0], str) and len(raw) == 1 else None
    if state.guard is not None and guard_prompt is None:
        guard_prompt = "\n".join(p if isinstance(p, str) else tokenizer.decode(p) for p in raw)
    return await exchange.respond(request, prompts, budgets, guard_prompt)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = request.app.state.serve
    options = state.options
    data = [{"id": options.model_name, "object": "model", "created": state.created, "owned_by": "gemmakit",
             "max_model_len": state.backend.context if state.backend else options.context}]
    return {"object": "list", "data": data}
