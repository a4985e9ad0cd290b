"""`create_app(gemma, options)`: the FastAPI application of `gemmakit serve`.

`gemma` is a loaded `Gemma`, or a zero-argument callable that loads one: the app then starts answering at once
(`/health` 503, API calls 503 `model_loading`) and becomes ready when the loader returns, so a user sees progress
and a load balancer sees "not yet". Middleware, outermost first: request counting, API keys, body limit.
Every error leaves as OpenAI's error object; an unexpected exception is logged and answered with a generic 500 that
carries no request text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemmakit.serve.auth import ApiKeyAuth, BodyLimit
from gemmakit.serve.errors import APIError, error_body
from gemmakit.serve.options import ServeOptions
from gemmakit.serve.state import ServeState

log = logging.getLogger("gemmakit.serve")
KNOWN_PATHS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                         "/v1/moderations", "/tokenize", "/detokenize", "/", "/ui/info"})


class CountRequests:
    """Counts every response by endpoint and status for /metrics (outermost, so 401/413 are counted too)."""

    def __init__(self, app, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            if not path.startswith("/static/"):
                self.state.metrics.count_request(path if path in KNOWN_PATHS else "other", status)


def create_app(gemma: Any | Callable[[], Any], options: ServeOptions | None = None,
               moderation_model: Any | Callable[[], Any] | None = None) -> FastAPI:
    options = (options or ServeOptions()).check()
    state = ServeState(options)

    def attach(model: Any, moderation: Any) -> None:
        from gemmakit.serve.routes_web import mount_explorer

        state.attach(model, moderation)
        mount_explorer(app, model)

    def load_in_background() -> None:
        try:
            model = gemma() if callable(gemma) else gemma
            moderation = moderation_model() if callable(moderation_model) else moderation_model
            attach(model, moderation)
        except Exception as e:  # noqa: BLE001 - reported by /health and the log; the process keeps answering
            log.exception("loading failed")
            state.error = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if callable(gemma) or callable(moderation_model):
            threading.Thread(target=load_in_background, name="gemmakit-load", daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="gemmakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.state.started = time.time()

    from gemmakit.serve import routes_misc, routes_openai, routes_web

    app.include_router(routes_openai.router)
    app.include_router(routes_misc.router)
    routes_web.mount(app)
    if not callable(gemma) and not callable(moderation_model):
        attach(gemma, moderation_model)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), kind, None, code), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"Invalid request: {e.errors()[:1]}", code="invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        if isinstance(e, asyncio.CancelledError):  # pragma: no cover
            raise e
        log.exception("unexpected error")
        return JSONResponse(error_body("The server had an internal error while processing the request.",
                                       "server_error", None, "internal_error"), status_code=500)

    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=options.api_keys)
    app.add_middleware(CountRequests, state=state)
    return app
