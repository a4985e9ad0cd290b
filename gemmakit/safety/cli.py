"""Safety verbs: `classify`, `eval-safety`, and the `safety` group (`safety train-agile`).

Thin parsing only; the work is in `scoring`, `datasets`, `metrics` and `agile`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gemmakit.cli import add_model_argument, load_model
from gemmakit.errors import InputError
from gemmakit.safety.datasets import FORMATS, LABEL_RULES, MODERATION_CATEGORIES, read_dataset, read_jsonl
from gemmakit.safety.policies import POLICIES, Policy


@contextlib.contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """Show the `gemmakit.safety` logger's warnings (what a label rule drops) on stderr while reading or training."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(message)s]"))
    logger = logging.getLogger("gemmakit.safety")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _policies(args: argparse.Namespace) -> list[str | Policy] | None:
    """--policy NAME (repeatable or comma-separated) and --custom-policy NAME=GUIDELINE; none = the advertised 4."""
    chosen: list[str | Policy] = [n.strip() for value in args.policy or [] for n in value.split(",") if n.strip()]
    for spec in args.custom_policy or []:
        name, sep, text = spec.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--custom-policy {spec!r}: expected NAME=GUIDELINE")
        chosen.append(Policy.from_text(name.strip(), text))
    return chosen or None


def _thresholds(values: list[str] | None) -> tuple[float, dict[str, float]]:
    """--threshold 0.7 (every policy) and/or --threshold hate=0.3 (one policy), repeatable; later values win."""
    default, per_policy = 0.5, {}
    for value in values or []:
        name, sep, number = value.rpartition("=")
        try:
            parsed = float(number)
        except ValueError as e:
            raise InputError(f"--threshold {value!r}: expected a number or NAME=NUMBER") from e
        if sep:
            per_policy[name] = parsed
        else:
            default = parsed
    return default, per_policy


def _classifier(args: argparse.Namespace, model: Any):
    from gemmakit.safety.policies import get_policies
    from gemmakit.safety.scoring import ShieldClassifier

    default, per_policy = _thresholds(args.threshold)
    if getattr(args, "adapter", None):
        from gemmakit.safety.agile import AgileClassifier

        return AgileClassifier.load(model, args.adapter, threshold=default)
    policies = get_policies(_policies(args))
    threshold = {p.name: default for p in policies} | per_policy
    return ShieldClassifier(model, policies=policies, threshold=threshold, temperature=args.temperature,
                            alpha=args.alpha, batch_size=args.batch_size)


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", action="append", metavar="NAME",
                        help=f"policy to screen against, repeatable or comma-separated: {', '.join(POLICIES)} "
                             "(default: dangerous, harassment, hate, sexual)")
    parser.add_argument("--custom-policy", action="append", metavar="NAME=GUIDELINE",
                        help="a policy of your own, the guideline written as ShieldGemma's (repeatable)")
    parser.add_argument("--threshold", action="append", metavar="[NAME=]P",
                        help="flag when P(violation) >= P; NAME=P sets one policy's threshold (default 0.5)")
    parser.add_argument("--temperature", type=float, default=1.0, help="T of the paper's Eq. 1 (default 1)")
    parser.add_argument("--alpha", type=float, default=0.0,
                        help="uncertainty α of Eq. 1 (default 0; > 0 computes the full-vocabulary softmax)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    parser.add_argument("--adapter", default=None,
                        help="score with an agile classifier (a directory from `safety train-agile`) instead")


def cmd_classify(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.input is None):
        raise InputError("give a TEXT or --input FILE.jsonl (one of them)")
    if args.input is not None:
        items = [(e.prompt, e.response) for e in read_jsonl(args.input)]
        if args.response is not None:
            raise InputError("--response goes with TEXT, not with --input (put 'response' in the JSONL lines)")
    else:
        items = [(args.text, args.response)]
    model = load_model(args)
    classifier = _classifier(args, model)
    for (prompt, response), verdict in zip(items, classifier.classify_batch(items), strict=True):
        record = {"text": prompt, **({"response": response} if response is not None else {}), **verdict.to_dict()}
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gemmakit.safety.metrics import evaluate, write_pr_curve_png

    with _warnings_on_stderr():
        examples = read_dataset(args.data, args.format, label_rule=args.label_rule, category=args.category)
    if args.limit is not None:
        examples = examples[:args.limit]
    if not examples:
        raise InputError(f"{args.data}: no examples to evaluate")
    model = load_model(args)
    classifier = _classifier(args, model)
    # ShieldGemma's OpenAI-moderation protocol: each text is screened as a model answer to an empty prompt
    items = [("", e.prompt) if args.as_response else e.item for e in examples]
    start = time.perf_counter()
    verdicts = classifier.classify_batch(items)
    elapsed = time.perf_counter() - start
    scores = [v.score for v in verdicts]
    labels = [e.label for e in examples]
    report = evaluate(labels, scores, threshold=_thresholds(args.threshold)[0])
    report.update(data=str(args.data), seconds=round(elapsed, 2), policies=list(verdicts[0].scores))
    if args.scores_out:
        with open(args.scores_out, "w", encoding="utf-8") as f:
            for e, v in zip(examples, verdicts, strict=True):
                f.write(json.dumps({"text": e.prompt, "label": e.label, **v.to_dict()}, ensure_ascii=False) + "\n")
    known = [(y, s) for y, s in zip(labels, scores, strict=True) if y is not None]
    if args.png and any(y == 1 for y, _ in known):
        report["pr_curve_png"] = str(write_pr_curve_png(args.png, [y for y, _ in known], [s for _, s in known]))
    print(json.dumps(report, indent=2))
    return 0


def cmd_train_agile(args: argparse.Namespace) -> int:
    from gemmakit.safety.agile import AgileConfig, train_agile

    model = load_model(args)
    with _warnings_on_stderr():
        examples = read_dataset(args.data, args.format, label_rule=args.label_rule)
    cfg = AgileConfig(labels=tuple(args.labels.split(",")), epochs=args.epochs, lr=args.lr, rank=args.rank,
                      batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    start = time.perf_counter()
    with _warnings_on_stderr():
        classifier = train_agile(model, examples, cfg, progress=not args.quiet)
    classifier.save(args.out)
    print(f"[trained on {len(examples)} examples in {time.perf_counter() - start:.1f} s; adapter in {args.out}]",
          file=sys.stderr)
    return 0


TRAINING_NEEDS_FLOAT = ("training needs float weights: the LoRA adapters wrap float linear layers and the gradient "
                       "flows back through them, which int8 weights do not support")


def _add_label_rule_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-rule", default="any", choices=LABEL_RULES,
                        help="OpenAI moderation files' binary label: any (default, ShieldGemma's protocol on all "
                             "texts): 1 if any annotated category is 1, else 0; strict: 0 only when all eight "
                             "categories are annotated 0, dropping the other texts (says how many on stderr)")


class _TrailingText(argparse.ArgumentParser):
    """Lets TEXT come after the options (`classify MODEL --policy hate TEXT`).

    argparse (before 3.12) fills an optional positional with nothing as soon as it meets MODEL, so a later TEXT
    is left over as unrecognised; this takes one such leftover as TEXT.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = super().parse_known_args(args, namespace)
        if getattr(ns, "text", None) is None and len(extras) == 1 and not extras[0].startswith("-"):
            ns.text, extras = extras[0], []
        return ns, extras


def register(verbs: argparse._SubParsersAction) -> None:
    classify = verbs.add_parser("classify", help="ShieldGemma P(violation) per policy, JSON lines out")
    classify.__class__ = _TrailingText
    add_model_argument(classify)
    classify.add_argument("text", nargs="?", default=None, help="the user prompt to screen")
    classify.add_argument("--response", default=None, help="screen this model answer to TEXT instead")
    classify.add_argument("--input", type=Path, default=None,
                          help="JSONL file of {\"text\": ..., \"response\"?: ...} lines, one verdict line each")
    _add_scoring_arguments(classify)
    classify.set_defaults(run=cmd_classify)

    evaluate = verbs.add_parser("eval-safety", help="optimal F1, AU-PRC and ROC-AUC of a classifier on a data set")
    add_model_argument(evaluate)
    evaluate.add_argument("data", type=Path, help="JSONL {text,label}, XSTest CSV, OpenAI moderation JSONL(.gz), "
                                                  "ETHOS CSV or HarmBench CSV")
    evaluate.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="data format (default auto)")
    evaluate.add_argument("--as-response", action="store_true",
                          help="screen each text as a model answer to an empty prompt (ShieldGemma's OpenAI protocol)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    evaluate.add_argument("--png", type=Path, default=None, help="write the precision-recall curve to this PNG")
    evaluate.add_argument("--scores-out", type=Path, default=None, help="write each example's scores as JSONL")
    _add_label_rule_argument(evaluate)
    evaluate.add_argument("--category", default=None, choices=MODERATION_CATEGORIES,
                          help="OpenAI moderation files: evaluate one category's label instead of the binary "
                               "one (texts where it was not annotated are skipped)")
    _add_scoring_arguments(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    safety = verbs.add_parser("safety", help="safety classifier tools (train-agile)")
    group = safety.add_subparsers(dest="safety_verb", required=True, metavar="VERB")
    agile = group.add_parser("train-agile", help="tune a LoRA agile classifier on labelled examples")
    add_model_argument(agile, float_reason=TRAINING_NEEDS_FLOAT)
    agile.add_argument("data", type=Path, help="labelled examples (JSONL {text,label} or any eval-safety format)")
    agile.add_argument("out", type=Path, help="directory for the adapter and its classifier settings")
    agile.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="data format (default auto)")
    _add_label_rule_argument(agile)
    agile.add_argument("--labels", default="Positive,Negative",
                       help="single-token label words for label 0 and label 1 (default Positive,Negative: the "
                            "notebook's, Negative = harmful)")
    agile.add_argument("--epochs", type=int, default=4)
    agile.add_argument("--lr", type=float, default=5e-4)
    agile.add_argument("--rank", type=int, default=4)
    agile.add_argument("--batch-size", type=int, default=2)
    agile.add_argument("--max-length", type=int, default=128)
    agile.add_argument("--seed", type=int, default=1234)
    agile.add_argument("--quiet", action="store_true", help="no progress output")
    agile.set_defaults(run=cmd_train_agile)
