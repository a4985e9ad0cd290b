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


def _openai_file(tmp_path):
    """OpenAI moderation lines: 2 fully annotated, 2 with categories left out (one of them positive)."""
    full = {c: 0 for c in ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")}
    rows = [{"prompt": "fine text one", **full}, {"prompt": "awful text two", **full, "H": 1},
            {"prompt": "fine text three", "S": 0}, {"prompt": "awful text four", "V": 1}]
    path = tmp_path / "samples-4.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_safety_on_openai_moderation_uses_the_papers_binary_rule_or_the_strict_one(tmp_path, capsys):
    data = _openai_file(tmp_path)
    assert main(["eval-safety", "tiny", str(data), "--policy", "hate", "--as-response"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 4 and report["positives"] == 2
    assert main(["eval-safety", "tiny", str(data), "--policy", "hate", "--label-rule", "strict"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 3 and "dropped 1 of 4 texts" in err
    assert main(["eval-safety", "tiny", str(data), "--policy", "hate", "--category", "H"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2  # per category: unannotated texts are skipped


def test_train_agile_on_openai_moderation_uses_the_same_rule(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gemmakit.train.lora", reason="LoRA (gemmakit.train.lora) is not available")
    own = SimpleNamespace(module=tiny_model("gemma2", tmp_path / "m"), tokenizer=WordTokenizer())
    monkeypatch.setattr(safety_cli, "load_model", lambda args: own)
    data = _openai_file(tmp_path)
    assert main(["safety", "train-agile", "tiny", str(data), str(tmp_path / "a"), "--labels", "No,Yes", "--epochs",
                 "1", "--quiet"]) == 0
    assert "[trained on 4 examples" in capsys.readouterr().err
    fresh = SimpleNamespace(module=tiny_model("gemma2", tmp_path / "m2"), tokenizer=WordTokenizer())
    monkeypatch.setattr(safety_cli, "load_model", lambda args: fresh)  # adapters go on a model without any
    assert main(["safety", "train-agile", "tiny", str(data), str(tmp_path / "b"), "--labels", "No,Yes", "--epochs",
                 "1", "--quiet", "--label-rule", "strict"]) == 0
    err = capsys.readouterr().err
    assert "[trained on 3 examples" in err and "dropped 1 of 4 texts" in err
