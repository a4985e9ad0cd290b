"""`gemmakit classify` and `gemmakit eval-safety` end to end on a tiny model (the loader is stubbed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import gemmakit.safety.cli as safety_cli
from gemmakit.cli import main
from support.safety_fixtures import WordTokenizer, tiny_model


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    module = tiny_model("gemma3", tmp_path_factory.mktemp("cli"))
    return SimpleNamespace(module=module, tokenizer=WordTokenizer())


@pytest.fixture(autouse=True)
def stub_loader(monkeypatch, stand_in):
    monkeypatch.setattr(safety_cli, "load_model", lambda args: stand_in)


def test_classify_text(capsys):
    assert main(["classify", "tiny", "--policy", "hate,sexual", "--threshold", "0.0", "--threshold", "sexual=1",
                 "How are you?"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text"] == "How are you?" and set(record["scores"]) == {"hate", "sexual"}
    assert record["flagged"] == ["hate"] and record["thresholds"] == {"hate": 0.0, "sexual": 1.0}


def test_classify_input_file_writes_one_line_each(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two", "response": "answer"}\n')
    assert main(["classify", "tiny", "--input", str(data), "--custom-policy", 'pii="No PII": none']) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in lines] == ["one", "two"] and lines[1]["response"] == "answer"
    assert set(lines[0]["scores"]) == {"pii"}


def test_classify_needs_exactly_one_source(capsys):
    assert main(["classify", "tiny"]) == 2
    assert "TEXT or --input" in capsys.readouterr().err


def test_eval_safety_reports_metrics_and_png(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}", "label": i % 2}) + "\n" for i in range(6)))
    png = tmp_path / "pr.png"
    assert main(["eval-safety", "tiny", str(data), "--policy", "hate", "--png", str(png),
                 "--scores-out", str(tmp_path / "s.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6 and report["positives"] == 3
    assert 0 <= report["roc_auc"] <= 1 and 0 < report["average_precision"] <= 1 and 0 < report["optimal_f1"] <= 1
    assert png.read_bytes().startswith(b"\x89PNG") and len((tmp_path / "s.jsonl").read_text().splitlines()) == 6


def test_train_agile_then_classify_with_the_adapter(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gemmakit.train.lora", reason="LoRA (gemmakit.train.lora) is not available")
    own = SimpleNamespace(module=tiny_model("gemma2", tmp_path / "m"), tokenizer=WordTokenizer())
    monkeypatch.setattr(safety_cli, "load_model", lambda args: own)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"word {i} {'awful' if i % 2 else 'fine'}", "label": i % 2}) + "\n"
                            for i in range(6)))
    out = tmp_path / "adapter"
    assert main(["safety", "train-agile", "tiny", str(data), str(out), "--labels", "No,Yes", "--epochs", "1",
                 "--quiet"]) == 0
    assert (out / "agile_classifier.json").exists()
    fresh = SimpleNamespace(module=tiny_model("gemma2", tmp_path / "m2"), tokenizer=WordTokenizer())
    monkeypatch.setattr(safety_cli, "load_model", lambda args: fresh)
    capsys.readouterr()
    assert main(["classify", "tiny", "--adapter", str(out), "some text"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert list(record["scores"]) == ["agile"] and 0 < record["max"] < 1
