"""API keys and request-size limits, as plain ASGI middleware so they run before any parsing.

Keys come from `--api-key` (repeatable), `--api-key-file` (one per line, `#` comments) and the `GEMMAKIT_API_KEYS`
environment variable (comma-separated); a client sends one as `Authorization: Bearer KEY` or `X-Api-Key: KEY`.
`/health` and the chat page's static files stay public (the page asks for a key and sends it with its API calls).
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable
from pathlib import Path

from gemmakit.errors import InputError
from gemmakit.serve.errors import APIError, too_large, unauthorized

ENV_KEYS = "GEMMAKIT_API_KEYS"
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico", "/ui/info"})
PUBLIC_PREFIXES = ("/static/",)


def read_keys(keys: Iterable[str] = (), key_file: str | Path | None = None, env: bool = True) -> list[str]:
    """Every configured key, in order, without duplicates or blanks."""
    out = [k.strip() for k in keys]
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise InputError(f"--api-key-file {path}: no such file")
        out += [line.strip() for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    if env:
        out += os.environ.get(ENV_KEYS, "").split(",")
    return list(dict.fromkeys(k for k in out if k))


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class ApiKeyAuth:
    """401 in OpenAI's shape unless the request carries one of the keys (no keys configured: everything open)."""

    def __init__(self, app, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def allowed(self, scope) -> bool:
        path = scope.get("path", "")
        if not self.keys or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        given = _header(scope, b"x-api-key")
        auth = _header(scope, b"authorization")
        if given is None and auth is not None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given:
            return False
        candidate = given.encode()
        return any(hmac.compare_digest(candidate, k) for k in self.keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            await send_error(send, unauthorized())
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes, whether it declares its length or arrives in chunks.

    The body is read here (it is at most `limit` bytes) and replayed to the app, whose later `receive()` calls go
    on to the client, so disconnects are still seen.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_error(send, too_large(self.limit))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, too_large(self.limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
