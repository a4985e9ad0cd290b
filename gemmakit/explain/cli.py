"""`gemmakit explain` (salience and SAE feature attribution of a target span) and `gemmakit explore` (the live
page on its own server)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gemmakit.explain.salience import DEFAULT_STEPS, METHODS
from gemmakit.explain.segments import GRANULARITIES


def _add_sae_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", default=None,
                        help="an SAE (Gemma Scope 1 params.npz, Gemma Scope 2 or SAELens folder)")
    parser.add_argument("--site", default=None,
                        help="the SAE's site, e.g. layers.6.resid_post (default: the one the SAE records)")
    parser.add_argument("--store", default=None,
                        help="an activation store of the same site (gemmakit sae store): density and "
                             "top-activating contexts for the features")


def register(verbs: argparse._SubParsersAction) -> None:
    from gemmakit.cli import add_model_argument

    p = verbs.add_parser(
        "explain", help="which prompt tokens a target span leaned on (LIT-style salience; SAE features)",
        description="Salience of the prompt's tokens (or words, sentences, ...) for the log-probability of a span "
                    "of a target: a given continuation (--target) or the model's own greedy one (--generate N). "
                    "Quantised models compute gradients on a float32 copy reloaded from the same file. With "
                    "--sae, also the SAE latents (position, feature) that carry the span, by gradient x "
                    "activation, and the SAE error's share.")
    add_model_argument(p, fast=True)
    p.add_argument("--prompt", required=True, help="the prompt (a <bos> is added)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", help="the continuation to explain (tokenised without <bos>)")
    target.add_argument("--generate", type=int, metavar="N", help="explain the model's own N-token greedy reply")
    p.add_argument("--span", default=None, metavar="A:B",
                   help="target tokens to explain, Python slice rules (default: the whole target)")
    p.add_argument("--method", default="grad_l2", choices=METHODS, help="salience method (default grad_l2)")
    p.add_argument("--granularity", default="token", metavar="G",
                   help=f"one of {', '.join(GRANULARITIES)}, or a regular expression whose matches are the "
                        "segments (scores are summed over each segment's tokens)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"integrated gradients: Gauss-Legendre nodes (default {DEFAULT_STEPS})")
    p.add_argument("--batch", type=int, default=8, help="integrated gradients: path points per forward")
    _add_sae_arguments(p)
    p.add_argument("--top", type=int, default=10, help="with --sae: how many features to list")
    p.add_argument("--json", action="store_true",
                   help='print {"tokens": [...], "scores": [...], ...} over the prompt\'s tokens or segments')
    p.add_argument("--html", metavar="OUT", default=None, help="also write a self-contained HTML page")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="colour the terminal view (auto: only on a terminal, and not when NO_COLOR is set)")
    p.set_defaults(run=cmd_explain)

    e = verbs.add_parser(
        "explore", help="serve the live explorer page (salience, SAE features, steering) on its own",
        description="Serve the explorer at http://HOST:PORT/explore: type a prompt, generate or paste a target, "
                    "select a span with the mouse, switch method and granularity; with --sae a second tab shows "
                    "per-token features, feature cards and a steering box. `gemmakit serve` mounts the same page.")
    add_model_argument(e, fast=True)
    _add_sae_arguments(e)
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    e.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    e.set_defaults(run=cmd_explore)


def _load_sae(args: argparse.Namespace):
    if not args.sae:
        return None
    from gemmakit.scope import load_sae

    return load_sae(args.sae)


def cmd_explain(args: argparse.Namespace) -> int:
    from gemmakit.cli import load_model
    from gemmakit.explain import render
    from gemmakit.explain.features import attribute
    from gemmakit.explain.salience import make_problem, salience
    from gemmakit.explain.segments import pattern_for

    if args.granularity != "token":
        pattern_for(args.granularity)  # a bad regex fails before the model loads
    model = load_model(args)
    sae = _load_sae(args)
    problem = make_problem(model, args.prompt, args.target, args.generate, args.span)
    result = salience(model, args.prompt, method=args.method, steps=args.steps, batch=args.batch,
                      progress=not args.json, problem=problem)
    feats = None
    if sae is not None:
        feats = attribute(model, sae, args.prompt, site=args.site, top=args.top, store=args.store, problem=problem)
    if args.html:
        from pathlib import Path

        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render.page(result, args.granularity, feats), encoding="utf-8")
        print(f"[wrote {out}]", file=sys.stderr)
    if args.json:
        print(json.dumps(render.result_json(result, args.granularity, feats)))
        return 0
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    print(render.terminal(result, args.granularity, colour))
    if feats is not None:
        print(render.features_terminal(feats))
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from gemmakit.cli import load_model
    from gemmakit.explain.web import serve

    model = load_model(args)
    serve(model, args.host, args.port, sae=_load_sae(args), site=args.site, store=args.store)
    return 0
