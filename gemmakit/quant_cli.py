"""`gemmakit quantize MODEL OUT`: convert a model once to a quantised safetensors file that loads in a blink."""

from __future__ import annotations

import argparse

from gemmakit.quant import SCHEMES


def cmd_quantize(args: argparse.Namespace) -> int:
    from gemmakit.loader import convert

    out = convert(args.model, args.quant, args.out, progress=not args.quiet)
    print(out)
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("quantize", help="convert a model to int8/int4 weights (safetensors) for fast CPU inference",
                         description="Convert MODEL to quantised safetensors at OUT; load it later with "
                                     "gemmakit.load(OUT) or any verb's MODEL argument.")
    p.add_argument("model", help="an HF model directory, a .gguf file, a gemma_pytorch .ckpt, or 'default'")
    p.add_argument("out", help="the file to write (.safetensors)")
    p.add_argument("--quant", default="int8", choices=sorted(SCHEMES),
                   help="scheme (default int8: perplexity within 1%% of fp32; int4 is smaller but less faithful)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_quantize)
