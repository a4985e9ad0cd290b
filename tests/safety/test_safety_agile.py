"""Agile classifiers on a tiny model: the prompt shape, training separates a learnable set, save/load round-trip,
and the guard accepts the result."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from support.safety_fixtures import WordTokenizer, tiny_model

pytest.importorskip("gemmakit.train.lora", reason="LoRA (gemmakit.train.lora) is not available")

from gemmakit.errors import InputError, TokenizerError  # noqa: E402
from gemmakit.safety import Guard  # noqa: E402
from gemmakit.safety.agile import AgileClassifier, AgileConfig, train_agile  # noqa: E402
from gemmakit.safety.datasets import Example  # noqa: E402
from gemmakit.safety.metrics import roc_auc  # noqa: E402

WORDS = ["river", "cloud", "table", "green", "music", "paper", "stone", "light"]


def dataset(n: int) -> list[Example]:
    """Label 1 exactly when the text contains 'awful' (else 'quiet' in its place): learnable from one token."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 3)]
        words.insert(i % len(words), "awful" if i % 2 else "quiet")
        out.append(Example(" ".join(words), i % 2))
    return out


def test_prompt_is_the_notebooks():
    tok = WordTokenizer()
    clf = AgileClassifier.__new__(AgileClassifier)
    cfg = AgileConfig(labels=("No", "Yes"), max_length=64)
    clf.config, clf.tokenizer = cfg, tok
    clf._head = tok.encode("Classify the following text into one of the following classes:[No,Yes]\n<separator>\nText:")
    clf._tail = tok.encode("\n<separator>\nPrediction:", add_bos=False)
    whole = "Classify the following text into one of the following classes:[No,Yes]\n<separator>\nText:hello " \
            "world\n<separator>\nPrediction:"
    assert clf.prompt_ids("hello world") == tok.encode(whole)
    assert len(clf.prompt_ids("word " * 500)) == 64  # the text is cut, the cue stays
    assert clf.prompt_ids("word " * 500)[-len(clf._tail):] == clf._tail


def test_train_save_load_and_guard(tmp_path):
    model = tiny_model("gemma3", tmp_path / "m")
    train, held_out = dataset(24), dataset(40)[24:]
    cfg = AgileConfig(labels=("No", "Yes"), epochs=6, lr=1e-2, batch_size=4, max_length=48, seed=0)
    clf = train_agile(model, train, cfg, tokenizer=WordTokenizer())
    probs = clf.probabilities([e.prompt for e in held_out])
    assert roc_auc([e.label for e in held_out], probs) >= 0.9
    out = clf.save(tmp_path / "adapter")
    assert json.loads((out / "agile_classifier.json").read_text())["labels"] == ["No", "Yes"]
    assert (out / "adapter_model.safetensors").exists()

    fresh = tiny_model("gemma3", tmp_path / "m2")  # same seed, same base weights
    loaded = AgileClassifier.load(fresh, out, tokenizer=WordTokenizer())
    assert loaded.probabilities([e.prompt for e in held_out]) == pytest.approx(probs, abs=1e-5)

    class Chat:
        def chat_stream(self, messages, max_new_tokens=256, **sampling):
            yield "ok"

    ranked = sorted(zip(probs, held_out, strict=True), key=lambda pair: pair[0])
    (low, negative), (high, positive) = ranked[0], ranked[-1]
    assert (negative.label, positive.label) == (0, 1) and low < 0.5 <= high
    blocked = Guard(Chat(), loaded).chat([{"role": "user", "content": positive.prompt}])
    passed = Guard(Chat(), loaded, check_response=False).chat([{"role": "user", "content": negative.prompt}])
    assert blocked.blocked and blocked.results[0].policy == "agile"
    assert not passed.blocked and passed.text == "ok"


def test_errors(tmp_path):
    model = tiny_model("gemma2", tmp_path)
    with pytest.raises(TokenizerError, match="single token"):
        AgileClassifier(model, AgileConfig(), tokenizer=WordTokenizer())  # Positive/Negative are not in it
    with pytest.raises(InputError, match="labels"):
        AgileConfig(labels=("Yes", "Yes"))
    with pytest.raises(InputError, match="labelled"):
        train_agile(model, [Example("x", None)], AgileConfig(labels=("No", "Yes")), tokenizer=WordTokenizer())


def test_bf16_model_scores_from_fp32_label_logits(tmp_path):
    """A bf16 model's two label logits are computed in fp32 (bf16 logits would quantise the scores into ties)."""
    model = tiny_model("gemma2", tmp_path)  # gemma2: the final soft-cap is applied too
    clf = AgileClassifier(model.to(torch.bfloat16), AgileConfig(labels=("No", "Yes")), tokenizer=WordTokenizer())
    h = torch.randn(3, model.config.hidden_size).to(torch.bfloat16) * 4
    got = clf._label_logits(h)
    reference = copy.deepcopy(model).float()  # the same bf16-rounded weights, held in fp32
    expected = reference.unembed(h.float()[:, None], rows=torch.tensor(clf.label_ids))[:, 0]
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    texts = ["river awful table green music", "quiet", "cloud awful"]  # batched by length, returned in order
    assert clf.probabilities(texts, batch_size=2) == clf.probabilities(texts[::-1], batch_size=2)[::-1]
