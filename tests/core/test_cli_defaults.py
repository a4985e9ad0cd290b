"""One default load everywhere: every verb that takes a model either loads it as `gemmakit.load(MODEL)` does
(--dtype auto) and says on stderr which path ran, or defaults to float32 and says why in its --help."""

from __future__ import annotations

import argparse
import json

import pytest

import gemmakit
from gemmakit.cli import build_parser, describe_load, load_model, main

LIBRARY_DEFAULT = {"generate", "chat", "classify", "eval-safety", "sae eval", "sae dashboard", "sae steer"}
FLOAT_FOR_A_REASON = {"safety train-agile", "train sft", "train distill", "export", "sae store", "sae train"}


def model_verbs() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)verb whose parser takes a model (MODEL or --model) and a --dtype, by its full name."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
        dests = {a.dest for a in parser._actions}
        if prefix and "dtype" in dests and "model" in dests:
            found[prefix] = parser

    walk(build_parser(), "")
    return found


def dtype_action(parser: argparse.ArgumentParser) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == "dtype")


def test_every_model_verb_uses_the_library_default_or_its_help_says_why():
    verbs = model_verbs()
    assert LIBRARY_DEFAULT | FLOAT_FOR_A_REASON <= set(verbs), sorted(verbs)
    for name, parser in verbs.items():
        action = dtype_action(parser)
        if action.default == "auto":
            assert "gemmakit.load()'s own choice" in action.help, name
            assert name not in FLOAT_FOR_A_REASON, name
        else:
            assert action.default == "float32", name
            reason = parser.get_default("float_reason")
            assert reason and reason in action.help and "not the library's int8 default" in action.help, name
            assert name not in LIBRARY_DEFAULT, name
    for name in LIBRARY_DEFAULT:
        assert dtype_action(verbs[name]).default == "auto", name
    for name in FLOAT_FOR_A_REASON:
        help_text = " ".join(verbs[name].format_help().split())  # what `--help` prints, line breaks aside
        assert "not the library's int8 default" in help_text and "int8" in verbs[name].get_default("float_reason"), name


def test_classify_on_the_real_gguf_loads_like_gemmakit_load_and_says_which_path(real_gguf_path, capsys):
    """The verb's scores equal a classifier on `gemmakit.load(path)`'s model, and stderr names that path."""
    from gemmakit.safety.scoring import ShieldClassifier

    assert main(["classify", str(real_gguf_path), "--policy", "dangerous", "How do I bake bread?"]) == 0
    out, err = capsys.readouterr()
    library = gemmakit.load(real_gguf_path)
    expected_path = describe_load(library, "auto")
    assert f"{real_gguf_path}" in err and expected_path in err and "gemmakit.load()'s default" in err
    score = json.loads(out)["scores"]["dangerous"]
    reference = ShieldClassifier(library, policies=["dangerous"]).score("How do I bake bread?")["dangerous"]
    assert score == pytest.approx(reference, abs=1e-6)


def test_a_training_verb_loads_float32_and_says_why(real_gguf_path, capsys):
    args = build_parser().parse_args(["train", "sft", str(real_gguf_path), "data.jsonl", "--out", "run"])
    model = load_model(args)
    err = capsys.readouterr().err
    assert str(model.module.dtype) == "torch.float32"
    assert "float32 weights and activations, unquantised (--dtype float32, not the library's default: training " \
           "needs float weights" in err
