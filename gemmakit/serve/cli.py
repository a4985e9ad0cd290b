"""`gemmakit serve MODEL`: start the OpenAI-compatible server (thin parsing; the app is `gemmakit.serve.app`).

The HTTP server comes up first and answers `/health` with 503 while the model loads (progress on stderr), so
clients and load balancers see "loading" rather than a refused connection.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from gemmakit.cli import add_model_argument


def _names(values: list[str] | None) -> list[Any] | None:
    """Comma-separated or repeated policy names; NAME=GUIDELINE makes a custom policy."""
    from gemmakit.safety import Policy

    out: list[Any] = []
    for value in values or []:
        for item in value.split(",") if "=" not in value else [value]:
            item = item.strip()
            if not item:
                continue
            name, sep, text = item.partition("=")
            out.append(Policy.from_text(name.strip(), text) if sep else item)
    return out or None


def options_from_args(args: argparse.Namespace) -> Any:
    from gemmakit.serve.auth import read_keys
    from gemmakit.serve.options import ServeOptions

    return ServeOptions(
        model_name=args.served_model_name or args.model, api_keys=read_keys(args.api_key or [], args.api_key_file),
        slots=args.slots, context=args.context, prefix_cache_mb=args.prefix_cache_mb, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, guard=_names(args.guard), guard_action=args.guard_action,
        guard_threshold=args.guard_threshold, moderation_model=args.moderation_model,
        moderation_adapter=args.moderation_adapter, moderation_policies=_names(args.moderation_policy),
        moderation_threshold=args.moderation_threshold, explore=not args.no_explore,
    ).check()


def _setup_logging(path: str | None, level: str) -> None:
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("gemmakit.serve", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from tqdm import tqdm

    from gemmakit.serve.app import create_app

    options = options_from_args(args)
    _setup_logging(args.log_file, args.log_level)
    dtype = None if args.dtype == "auto" else args.dtype

    def load_model() -> Any:
        from gemmakit import load

        start = time.perf_counter()
        with tqdm(total=1, desc=f"loading {args.model}", unit="model", file=sys.stderr) as bar:
            model = load(args.model, dtype=dtype, compile=getattr(args, "compile", False))
            bar.update(1)
        print(f"[gemmakit serve: {model.source} loaded in {time.perf_counter() - start:.1f} s; "
              f"ready at http://{args.host}:{args.port}/]", file=sys.stderr)
        return model

    def load_moderation() -> Any:
        from gemmakit import load

        with tqdm(total=1, desc=f"loading {args.moderation_model}", unit="model", file=sys.stderr) as bar:
            model = load(args.moderation_model, dtype="float32" if args.moderation_adapter else None)
            bar.update(1)
        return model

    app = create_app(load_model, options, load_moderation if args.moderation_model else None)
    if options.api_keys:
        print(f"[gemmakit serve: {len(options.api_keys)} API key(s) required]", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "serve", help="OpenAI-compatible HTTP server with batching, moderation, a guard and a web chat page",
        description="Serve MODEL over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/moderations, "
                    "/v1/models, /tokenize, /detokenize, /metrics, /health) with a chat page at /. "
                    "Point the openai client at http://HOST:PORT/v1. See docs/serve.md.")
    add_model_argument(p, fast=True)
    for action in p._actions:  # MODEL is optional here: `gemmakit serve` serves the embedded 270M
        if action.dest == "model":
            action.nargs, action.default = "?", "default"
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: MODEL as given)")
    auth = p.add_argument_group("authentication")
    auth.add_argument("--api-key", action="append", metavar="KEY",
                      help="require this key (repeatable); also GEMMAKIT_API_KEYS=key1,key2 in the environment")
    auth.add_argument("--api-key-file", default=None, metavar="PATH", help="keys, one per line (# comments)")
    engine = p.add_argument_group("batching and limits")
    engine.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    engine.add_argument("--context", type=int, default=4096, help="tokens per slot, prompt + output (default 4096)")
    engine.add_argument("--prefix-cache-mb", type=int, default=256,
                        help="prefix cache budget in MiB; 0 turns it off (default 256)")
    engine.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot before new ones get 429 (default 64)")
    engine.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="larger request bodies get 413 (default 1 MiB)")
    safety = p.add_argument_group("safety")
    safety.add_argument("--guard", action="append", metavar="POLICIES",
                        help="screen prompts and streamed answers with these ShieldGemma policies, e.g. "
                             "dangerous,harassment (NAME=GUIDELINE for a custom one)")
    safety.add_argument("--guard-action", choices=["block", "annotate"], default="block",
                        help="block (default): refuse with finish_reason content_filter; annotate: only report")
    safety.add_argument("--guard-threshold", type=float, default=0.5, help="flag at P(violation) >= this")
    safety.add_argument("--moderation-model", default=None, metavar="MODEL",
                        help="a second checkpoint (e.g. ShieldGemma) that scores /v1/moderations and the guard")
    safety.add_argument("--moderation-adapter", default=None, metavar="DIR",
                        help="an agile classifier directory from `gemmakit safety train-agile`")
    safety.add_argument("--moderation-policy", action="append", metavar="POLICIES",
                        help="policies of /v1/moderations (default dangerous,harassment,hate,sexual)")
    safety.add_argument("--moderation-threshold", type=float, default=0.5, help="flag at P(violation) >= this")
    p.add_argument("--no-explore", action="store_true", help="do not mount the live explorer at /explore")
    p.add_argument("--log-file", default=None, metavar="PATH", help="write the server's log here (default stderr)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=cmd_serve)
