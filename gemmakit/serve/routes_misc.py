"""`/health`, `/metrics`, `/v1/moderations`, `/tokenize` and `/detokenize`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gemmakit.serve import openai_schema as schema
from gemmakit.serve.errors import bad_request, model_not_found
from gemmakit.serve.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.serve
    if state.error is not None:
        return JSONResponse({"status": "error", "error": state.error}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.options.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.serve.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/v1/moderations")
async def moderations(request: Request) -> dict[str, Any]:
    state = request.app.state.serve.ready_state()
    body = schema.parse_json(await request.body())
    if state.moderator is None:
        raise bad_request(state.moderation_missing or "moderation is off", None, "moderation_unavailable")
    model = schema.string(body, "model")
    if not state.moderator.accepts_model(model):
        raise model_not_found(model or "", state.moderator.name)
    texts = schema.moderation_inputs(body)
    result = await asyncio.to_thread(state.moderator.moderate, texts, body.get("policies"))
    state.metrics.moderated.inc(len(texts))
    return result


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """llama-server's `content` or vLLM's `prompt` / `messages`; `add_special` (`add_special_tokens`) adds BOS."""
    state = request.app.state.serve.ready_state()
    body = schema.parse_json(await request.body())
    tokenizer = state.gemma.tokenizer
    add = schema.boolean(body, "add_special", schema.boolean(body, "add_special_tokens", True))
    if "messages" in body:
        from gemmakit.chat import render_chat
        from gemmakit.errors import GemmaKitError

        try:
            ids = render_chat(schema.messages(body), tokenizer)
        except GemmaKitError as e:
            raise bad_request(str(e), "messages", "invalid_value") from None
    else:
        name = "content" if "content" in body else "prompt"
        text = schema.string(body, name)
        if text is None:
            raise bad_request("give 'prompt' (or 'content') as a string, or 'messages'", name, "invalid_value")
        ids = state.gemma.encode(text, add_bos=add)
    context = state.backend.context
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    state = request.app.state.serve.ready_state()
    body = schema.parse_json(await request.body())
    ids = schema.token_ids(body, "tokens", state.gemma.tokenizer.vocab_size)
    text = state.gemma.tokenizer.decode(ids)
    return {"prompt": text, "content": text}
