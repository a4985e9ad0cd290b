"""The web chat page at `/` (static files shipped in the package, no build step), its `/ui/info`, and the
live explorer at `/explore` when `gemmakit.explain.web` is installed."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
router = APIRouter()
log = logging.getLogger("gemmakit.serve")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/ui/info", include_in_schema=False)
async def info(request: Request) -> JSONResponse:
    """What the page shows besides the chat: the model, the base-checkpoint notice, the guard, whether a key is
    needed, and whether the explorer is mounted."""
    state = request.app.state.serve
    notice = None
    if state.ready:
        notice = base_model_notice(state.gemma)
    return JSONResponse({
        "model": state.options.model_name, "ready": state.ready, "notice": notice,
        "guard": list(state.options.guard or []), "guard_action": state.options.guard_action,
        "auth": bool(state.options.api_keys), "explore": bool(getattr(request.app.state, "explore", False)),
        "context": state.backend.context if state.backend else state.options.context,
    })


def base_model_notice(gemma: Any) -> str | None:
    """`gemmakit.chat.base_model_notice(gemma)` when that helper exists (it tells a pretrained checkpoint apart)."""
    try:
        from gemmakit import chat
    except ImportError:  # pragma: no cover
        return None
    helper = getattr(chat, "base_model_notice", None)
    if helper is None:
        return None
    try:
        return helper(gemma)
    except Exception:  # noqa: BLE001 - a notice must never break the page
        log.exception("base_model_notice failed")
        return None


MISSING_EXPLORER = """<!doctype html><meta charset="utf-8"><title>gemmakit explorer</title>
<body style="font-family:system-ui;max-width:40em;margin:3em auto"><h1>Explorer not available</h1>
<p>This gemmakit has no live explorer: the module <code>gemmakit.explain.web</code> is not installed
({reason}). The chat page is at <a href="/">/</a>.</p></body>"""


def mount(app: FastAPI) -> None:
    """Static files and the page's routes."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    app.state.explore = False


def mount_explorer(app: FastAPI, gemma: Any) -> None:
    """/explore: the explorer's router for the loaded model, or a page that says why it is missing."""
    reason = "not requested"
    if app.state.serve.options.explore:
        try:
            web = importlib.import_module("gemmakit.explain.web")
            explorer = web.router(gemma)
        except ImportError as e:
            reason = f"import failed: {e.name or e}"
        except Exception as e:  # noqa: BLE001 - the explorer is optional; the server must still start
            reason = f"it failed to start: {type(e).__name__}: {e}"
            log.exception("gemmakit.explain.web.router failed")
        else:
            paths = [getattr(r, "path", "") for r in explorer.routes]
            prefix = "" if paths and all(p.startswith("/explore") for p in paths) else "/explore"
            app.include_router(explorer, prefix=prefix)
            app.state.explore = True
            return

    @app.get("/explore", include_in_schema=False)
    async def explorer_missing() -> HTMLResponse:
        return HTMLResponse(MISSING_EXPLORER.format(reason=reason), status_code=404)
