"""`gemmakit sae ...`: store activations, train, evaluate, inspect, convert, steer, and write a dashboard."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemmakit.cli import add_model_argument, load_model


def _read_text(path: str) -> str:
    from gemmakit.errors import InputError

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the text corpus ({e})") from e


def _store(args: argparse.Namespace):
    """Open the store, building (or resuming) it first when a model and corpus are given."""
    from gemmakit.scope.store import ActivationStore, build_store

    if args.model is not None:
        if not args.text:
            from gemmakit.errors import InputError

            raise InputError("building a store needs --text CORPUS")
        model = load_model(args)
        build_store(model, _read_text(args.text), args.store, [args.site], context=args.context,
                    batch_size=args.model_batch, max_tokens=args.max_tokens, dtype=args.store_dtype)
    return ActivationStore(args.store, args.site)


def cmd_store(args: argparse.Namespace) -> int:
    store = _store(args)
    print(f"{store.folder}: {len(store)} rows of d={store.d} at {store.site}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gemmakit.scope.sae import SAEInfo
    from gemmakit.scope.train import TrainConfig, train_saes

    store = _store(args)
    config = TrainConfig(architecture=args.arch, width=args.width, targets=args.l0, batch_size=args.batch_size,
                         steps=args.steps, lr=args.lr, sparsity=args.sparsity, sparsity_coeff=args.sparsity_coeff,
                         sparsity_warmup_steps=args.sparsity_warmup, bandwidth=args.bandwidth, seed=args.seed,
                         log_every=args.log_every, checkpoint_every=args.checkpoint_every, auxk_coeff=args.auxk_coeff,
                         auxk_k=args.auxk_k, dead_window=args.dead_window, resample_every=args.resample_every)
    info = SAEInfo(site=store.site, model_name=str(store.meta.get("model")))
    saes = train_saes(store, config, args.out, info)
    for sae, target in zip(saes, config.targets, strict=True):
        print(f"{Path(args.out) / config.name(target)}: {sae.info.extra['training']['final']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gemmakit.scope.formats import detect_format, load_sae

    fmt, _ = detect_format(args.sae)
    sae = load_sae(args.sae)
    print(f"format:        {fmt}")
    print(f"architecture:  {sae.architecture}" + (f" (k={sae.k})" if hasattr(sae, "k") else ""))
    print(f"d_in / d_sae:  {sae.d_in} / {sae.d_sae}")
    print(f"site:          {sae.info.site}")
    print(f"model:         {sae.info.model_name}")
    print(f"target L0:     {sae.info.target_l0}")
    training = sae.info.extra.get("training")
    if training:
        print(f"training:      {json.dumps(training.get('final'))}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from gemmakit.scope.formats import load_sae, save_sae

    sae = load_sae(args.sae)
    if args.site:
        sae.info.site = args.site
    print(save_sae(sae, args.out, args.format))
    return 0


def _eval_sequences(args: argparse.Namespace, model):
    from gemmakit.scope.store import chunk_tokens

    seqs = chunk_tokens(model.tokenizer.encode(_read_text(args.text), add_bos=False), args.context,
                        model.tokenizer.bos_id)
    return seqs[: args.sequences]


def _sae_and_site(args: argparse.Namespace):
    from gemmakit.errors import InputError
    from gemmakit.scope.formats import load_sae

    sae = load_sae(args.sae)
    site = args.site or sae.info.site
    if site is None:
        raise InputError(f"{args.sae}: the SAE does not record its site; pass --site layers.<i>.<kind>")
    return sae, site


def cmd_eval(args: argparse.Namespace) -> int:
    from gemmakit.scope.metrics import evaluate

    model = load_model(args)
    sae, site = _sae_and_site(args)
    metrics = evaluate(model, sae, site, _eval_sequences(args, model), batch_size=args.model_batch)
    print(json.dumps(metrics.summary(), indent=2))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from gemmakit.scope.dashboard import dashboard_data, write_dashboard

    model = load_model(args)
    sae, site = _sae_and_site(args)
    features = [int(f) for f in args.features.split(",")] if args.features else None
    data = dashboard_data(model, sae, site, _eval_sequences(args, model), features=features,
                          n_features=args.n_features, texts=args.example_text or (), steer_prompt=args.steer_prompt,
                          steer_coeff=args.steer_coeff, batch_size=args.model_batch, n_neighbours=args.neighbours)
    print(write_dashboard(args.out, data))
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from gemmakit.scope.explore import steer_generate

    model = load_model(args)
    sae, site = _sae_and_site(args)
    out = steer_generate(model, sae, site, args.feature, args.coeff, args.prompt, args.max_new_tokens)
    print(f"default: {args.prompt}{out['default']}\nsteered: {args.prompt}{out['steered']}")
    return 0


STORE_FLOAT = ("stored activations are an SAE's training data, taken from the unquantised model that SAEs are meant "
               "to read, as Gemma Scope's were; int8 weights would shift every activation")


def _add_store_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    p.add_argument("--store", required=True, help="activation store folder (built here if --model is given)")
    p.add_argument("--model", default=None, help="model to build the store with (HF dir, .gguf, .ckpt, 'default')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help=f"model dtype (default float32, not the library's int8 default for GGUF files: {STORE_FLOAT})")
    p.set_defaults(float_reason=STORE_FLOAT)
    p.add_argument("--text", default=None, help="UTF-8 text corpus to stream through the model")
    p.add_argument("--site", default="layers.9.resid_post", help="site, e.g. layers.9.resid_post")
    p.add_argument("--context", type=int, default=128, help="tokens per window, <bos> included (default 128)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop storing after about this many tokens")
    p.add_argument("--model-batch", type=int, default=8, help="windows per model forward")
    p.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32"])


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("sae", help="SAE folder or file (Gemma Scope 1/2 or SAELens format)")
    p.add_argument("--site", default=None, help="override the SAE's recorded site")
    p.add_argument("--text", required=True, help="UTF-8 text corpus")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--sequences", type=int, default=64, help="number of windows to use (default 64)")
    p.add_argument("--model-batch", type=int, default=8)


def register(verbs: argparse._SubParsersAction) -> None:
    sae = verbs.add_parser("sae", help="sparse autoencoders: store, train, eval, info, convert, steer, dashboard")
    sub = sae.add_subparsers(dest="sae_command", required=True, metavar="COMMAND")

    p = sub.add_parser("store", help="stream a corpus through a model into a memory-mapped activation store")
    _add_store_args(p)
    p.set_defaults(run=cmd_store)

    p = sub.add_parser("train", help="train JumpReLU or TopK SAEs (several L0 targets in one pass)")
    _add_store_args(p)
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt and one SAELens folder per target")
    p.add_argument("--arch", default="jumprelu", choices=["jumprelu", "topk"])
    p.add_argument("--width", type=int, default=16384, help="number of latents (default 16384)")
    p.add_argument("--l0", type=float, nargs="+", default=[60.0], help="target L0 per SAE (k for TopK)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--sparsity", default="quadratic", choices=["quadratic", "linear"])
    p.add_argument("--sparsity-coeff", type=float, default=1.0)
    p.add_argument("--sparsity-warmup", type=int, default=200)
    p.add_argument("--bandwidth", type=float, default=1e-3, help="STE kernel width in normalised units")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (resume by rerun)")
    dead = p.add_argument_group("dead latents")
    dead.add_argument("--auxk-coeff", type=float, default=1 / 32,
                      help="TopK: weight of the AuxK loss that trains dead latents on the residual (Gao et al. 2024; "
                           "default 1/32, 0 = off)")
    dead.add_argument("--auxk-k", type=int, default=None, help="TopK: dead latents used per row by AuxK (default d/2)")
    dead.add_argument("--dead-window", type=int, default=None,
                      help="steps without firing that make a latent dead for AuxK (default: 10M tokens' worth, at "
                           "most a tenth of the run)")
    dead.add_argument("--resample-every", type=int, default=0,
                      help="every N steps, re-initialise latents dead for N steps towards badly reconstructed "
                           "inputs (Anthropic's resampling; default 0 = never)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("info", help="describe an SAE file or folder")
    p.add_argument("sae")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("convert", help="rewrite an SAE in another format")
    p.add_argument("sae")
    p.add_argument("out")
    p.add_argument("--format", default="saelens", choices=["saelens", "gemma_scope_1", "gemma_scope_2"])
    p.add_argument("--site", default=None, help="record this site (e.g. for Gemma Scope 1 files)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("eval", help="L0, FVU, delta LM loss, dead/dense latents on a corpus")
    _add_eval_args(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("dashboard", help="write a self-contained HTML feature explorer")
    _add_eval_args(p)
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--features", default=None, help="comma-separated latent ids (default: spread over density)")
    p.add_argument("--n-features", type=int, default=40)
    p.add_argument("--example-text", action="append", help="text to show per-token features for (repeatable)")
    p.add_argument("--steer-prompt", default=None, help="prompt for default vs steered continuations per feature")
    p.add_argument("--steer-coeff", type=float, default=10.0)
    p.add_argument("--neighbours", type=int, default=8,
                   help="features listed per page as closest by decoder-direction cosine (default 8; 0 = none)")
    p.set_defaults(run=cmd_dashboard)

    p = sub.add_parser("steer", help="generate with a feature's decoder direction added at its site")
    add_model_argument(p)
    p.add_argument("sae")
    p.add_argument("prompt")
    p.add_argument("--feature", type=int, required=True)
    p.add_argument("--coeff", type=float, default=10.0)
    p.add_argument("--site", default=None)
    p.add_argument("-n", "--max-new-tokens", type=int, default=32)
    p.set_defaults(run=cmd_steer)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
