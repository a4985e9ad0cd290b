"""`gemmakit <verb>`: thin argument parsing over the library; every verb's logic lives in a library module."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

from gemmakit.errors import GemmaKitError

# Modules that add verbs: each has `register(verbs: argparse._SubParsersAction) -> None`.
VERB_MODULES: list[str] = ["gemmakit.train.cli", "gemmakit.quant_cli", "gemmakit.safety.cli", "gemmakit.scope.cli",
                            "gemmakit.explain.cli", "gemmakit.serve.cli"]

MODEL_HELP = "an HF model directory, a .gguf file, a gemma_pytorch .ckpt, or 'default' (the embedded Gemma 3 270M)"


AUTO_DTYPE_HELP = ("auto (default): gemmakit.load()'s own choice on CPUs with bf16: a GGUF's layers as the file "
                   "stores them (Q4_K, Q6_K, ...) with an int8 head, an HF directory converted once to int8 "
                   "(perplexity within 1%% of float32); float32 otherwise. A dtype means that dtype unquantised "
                   "(float32 is the exact reference path)")


def add_model_argument(parser: argparse.ArgumentParser, fast: bool = False, float_reason: str | None = None) -> None:
    """MODEL and --dtype: every verb loads the way `gemmakit.load(MODEL)` does unless it says why not.

    By default --dtype is "auto", the library's own choice (the quantised fast path on a CPU with bf16),
    and `load_model` prints which path ran. A verb that needs float weights (training, export, activations
    stored as training data) passes `float_reason`: it defaults to float32 and its --help gives the reason.
    `fast` (generation verbs) also offers --compile.
    """
    parser.add_argument("model", help=MODEL_HELP)
    choices = ["float32", "bfloat16", "float16"]
    if float_reason is None:
        parser.add_argument("--dtype", default="auto", choices=["auto", *choices], help=AUTO_DTYPE_HELP)
    else:
        parser.add_argument("--dtype", default="float32", choices=choices,
                            help="weight and activation dtype (default float32, not the library's int8 default "
                                 f"for GGUF files: {float_reason})")
    parser.set_defaults(float_reason=float_reason)
    if fast:
        parser.add_argument("--compile", action="store_true",
                            help="decode through a torch.compile'd step (faster per token; compiling takes a "
                                 "minute or two the first time, ~15 s later; a model whose layers stay GGUF "
                                 "blocks runs the native step instead, which torch.compile cannot trace)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens,
                       help=f"stop after this many new tokens (default {max_new_tokens})")
    group.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    group.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens when sampling")
    group.add_argument("--top-p", type=float, default=None, help="keep the smallest set with this total probability")
    group.add_argument("--min-p", type=float, default=None,
                       help="drop tokens less likely than min_p times the most likely one")
    group.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def sampling_options(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)


def describe_load(model, dtype_arg: str, float_reason: str | None = None) -> str:
    """Which path a loaded model runs, read from its weights (so it is true whatever chose it), and why."""
    import torch

    from gemmakit.decoding.native import layer_formats

    tensors = list(model.module.state_dict().values())
    quantised = any(t.dtype in (torch.int8, torch.uint8) for t in tensors)
    activations = str(model.module.dtype).removeprefix("torch.")
    formats = layer_formats(model.module)  # "int8", or a GGUF's own block types ("Q4_K/Q6_K/..."), or ""
    layers = f" (layers {formats})" if formats else ""
    path = (f"quantised weights{layers}, {activations} activations" if quantised
            else f"{activations} weights and activations, unquantised")
    if dtype_arg == "auto":
        why = "gemmakit.load()'s default" + ("; --dtype float32 is the exact reference path" if quantised else "")
    elif float_reason is not None:
        why = f"--dtype {dtype_arg}, not the library's default: {float_reason}"
    else:
        why = f"--dtype {dtype_arg}"
    return f"{path} ({why})"


def load_model(args: argparse.Namespace):
    """`gemmakit.load` with the verb's --dtype; says on stderr what was loaded, in how long, and which path runs."""
    from gemmakit.api import load

    start = time.perf_counter()
    dtype = None if args.dtype == "auto" else args.dtype
    if dtype is None and getattr(args, "adapter", None):
        dtype = "float32"  # a LoRA adapter (an agile classifier) wraps float layers, not quantised ones
    model = load(args.model, dtype=dtype, compile=getattr(args, "compile", False))
    print(f"[loaded {model.source} in {time.perf_counter() - start:.1f} s: "
          f"{describe_load(model, args.dtype, getattr(args, 'float_reason', None))}; decoding: "
          f"{model.decoder_choice.name}, {model.decoder_choice.reason}]", file=sys.stderr)
    return model


def cmd_info(args: argparse.Namespace) -> int:
    """MODEL described from its headers alone (no tensor data is read: `weights.summary`), and the path
    `gemmakit.load` would take with the given --dtype."""
    from gemmakit.weights.summary import load_plan, summarize

    summary = summarize(args.model)
    for line in summary.lines():
        print(line)
    dtype = getattr(args, "dtype", "auto")
    print(f"load():        {load_plan(summary.source, None if dtype == 'auto' else dtype)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_model(args)
    start, count = time.perf_counter(), 0
    if args.no_stream:
        print(args.prompt + model.generate(args.prompt, args.max_new_tokens, **sampling_options(args)))
    else:
        print(args.prompt, end="", flush=True)
        for piece in model.stream(args.prompt, args.max_new_tokens, **sampling_options(args)):
            count += 1
            print(piece, end="", flush=True)
        print()
        elapsed = time.perf_counter() - start
        print(f"[{count} pieces in {elapsed:.1f} s]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gemmakit.chat import base_model_notice

    model = load_model(args)
    notice = base_model_notice(model)
    if notice:  # once, before the first turn: a base model's odd replies are not a bug of the template
        print(f"[{notice}]", file=sys.stderr)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chat with the model. Empty line or Ctrl-D ends; /reset starts over.", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        if not text.strip():
            return 0
        if text.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = []
        try:
            for piece in model.chat_stream(messages, args.max_new_tokens, **sampling_options(args)):
                reply.append(piece)
                print(piece, end="", flush=True)
        except GemmaKitError as e:  # e.g. the conversation outgrew the context: say so and let the user go on
            messages.pop()
            print(f"\n[error: {e}]", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemmakit",
        description="Run Gemma 1/2/3 text models: inspect, generate and chat. MODEL is " + MODEL_HELP + ".",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    info = verbs.add_parser("info", help="show a model's architecture, sizes and tensor types")
    add_model_argument(info)
    info.set_defaults(run=cmd_info)

    gen = verbs.add_parser("generate", help="continue a prompt (streams by default)")
    add_model_argument(gen, fast=True)
    gen.add_argument("prompt", help="text to continue; a BOS token is added")
    gen.add_argument("--no-stream", action="store_true", help="print the whole continuation at the end")
    add_sampling_arguments(gen, 64)
    gen.set_defaults(run=cmd_generate)

    chat = verbs.add_parser("chat", help="interactive chat with the model's own template, streaming")
    add_model_argument(chat, fast=True)
    chat.add_argument("--system", default=None, help="system prompt (Gemma 3 folds it into the first turn)")
    add_sampling_arguments(chat, 256)
    chat.set_defaults(run=cmd_chat)

    for name in VERB_MODULES:  # each area registers its own verbs, keeping this file thin
        importlib.import_module(name).register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GemmaKitError as e:
        print(f"gemmakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
