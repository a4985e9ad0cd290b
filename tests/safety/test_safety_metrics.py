"""Metrics against scikit-learn on fixed data, the PR-curve PNG, and the dataset readers."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from gemmakit.errors import FormatError, InputError
from gemmakit.safety import datasets, metrics
from support.paths import SHARED_DATA as SHARED

LABELS = [1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0]
SCORES = [0.9, 0.8, 0.8, 0.7, 0.65, 0.3, 0.55, 0.1, 0.55, 0.2, 0.95, 0.05, 0.3, 0.8, 0.4, 0.02]  # with ties


def random_sets():
    rng = np.random.default_rng(0)
    for n in (5, 40, 300):
        y = rng.integers(0, 2, n)
        y[0], y[1] = 0, 1
        yield y.tolist(), np.round(rng.random(n) + 0.3 * y, 2).tolist()  # rounding makes ties
    yield LABELS, SCORES


@pytest.mark.parametrize("labels,scores", list(random_sets()))
def test_metrics_equal_scikit_learn(labels, scores):
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the test oracle")
    assert metrics.average_precision(labels, scores) == pytest.approx(sk.average_precision_score(labels, scores))
    assert metrics.roc_auc(labels, scores) == pytest.approx(sk.roc_auc_score(labels, scores))
    precision, recall, thresholds = sk.precision_recall_curve(labels, scores)
    ours = metrics.precision_recall_curve(labels, scores)
    # scikit-learn lists thresholds ascending and appends the (P=1, R=0) end point
    np.testing.assert_allclose(ours[0], precision[:-1][::-1])
    np.testing.assert_allclose(ours[1], recall[:-1][::-1])
    np.testing.assert_allclose(ours[2], thresholds[::-1])
    best, threshold = metrics.optimal_f1(labels, scores)
    f1s = {t: sk.f1_score(labels, [int(s >= t) for s in scores]) for t in sorted(set(scores))}
    assert best == pytest.approx(max(f1s.values()))
    assert f1s[threshold] == pytest.approx(best)


def test_fixed_values():
    assert metrics.roc_auc([0, 1], [0.1, 0.9]) == 1.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert metrics.average_precision([1, 0, 1], [0.9, 0.8, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.optimal_f1([1, 0, 1], [0.9, 0.8, 0.1]) == (pytest.approx(0.8), 0.1)


def test_evaluate_skips_unknown_and_handles_one_class():
    report = metrics.evaluate([1, None, 0, 1], [0.9, 0.5, 0.2, 0.4], threshold=0.5)
    assert (report["n"], report["positives"], report["unknown"]) == (3, 2, 1)
    assert report["roc_auc"] == 1.0 and report["flag_rate"] == pytest.approx(1 / 3)
    harmful_only = metrics.evaluate([1, 1, 1, 1], [0.9, 0.6, 0.2, 0.4])
    assert harmful_only["roc_auc"] is None and harmful_only["flag_rate"] == 0.5
    with pytest.raises(InputError):
        metrics.roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(InputError):
        metrics.evaluate([None], [0.3])


def test_pr_curve_png(tmp_path):
    path = metrics.write_pr_curve_png(tmp_path / "pr.png", LABELS, SCORES, size=200)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (kind, width, height, depth, color) == (b"IHDR", 200, 200, 8, 2)
    idat = data.index(b"IDAT")
    (size,) = struct.unpack(">I", data[idat - 4:idat])
    raw = zlib.decompress(data[idat + 4:idat + 4 + size])
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(200, 1 + 200 * 3)[:, 1:].reshape(200, 200, 3)
    assert ((pixels == [31, 119, 180]).all(-1)).sum() > 100  # the curve is drawn
    assert zlib.crc32(data[idat:idat + 4 + size]) == struct.unpack(">I", data[idat + 4 + size:idat + 8 + size])[0]


# --- readers ------------------------------------------------------------------------------------------------------
def test_jsonl_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "safe"}, {"text": "c", "label": None, "id": 7},
            {"text": "d", "label": True, "response": "r"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = datasets.read_dataset(path)
    assert [(e.prompt, e.label, e.response) for e in got] == [("a", 1, None), ("b", 0, None), ("c", None, None),
                                                              ("d", 1, "r")]
    assert got[2].meta == {"id": 7} and got[3].item == ("d", "r")
    path.write_text('{"text": "a", "label": 3}\n')
    with pytest.raises(FormatError, match="d.jsonl:1"):
        datasets.read_jsonl(path)
    path.write_text('{"text": "a"\n')
    with pytest.raises(FormatError, match="not valid JSON"):
        datasets.read_jsonl(path)


def test_openai_moderation_binary_label_is_the_papers_and_strict_drops_what_it_says(tmp_path, caplog):
    """Binary: 1 if any annotated category is 1, else 0, on every text (ShieldGemma's protocol); per category:
    None where unannotated; strict: texts with no positive and an unannotated category are dropped, and said so."""
    full = dict.fromkeys(datasets.MODERATION_CATEGORIES, 0)
    rows = [{"prompt": "p1", **full}, {"prompt": "p2", "S": 0, "H": 1}, {"prompt": "p3", "S": 0},
            {"prompt": "p4", **full, "V2": 1}, {"prompt": "p5", "H": 0, "V": None}]
    path = tmp_path / "samples.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert datasets.detect_format(path) == "openai"
    assert [e.label for e in datasets.read_dataset(path)] == [0, 1, 0, 1, 0]
    assert [e.label for e in datasets.read_openai_moderation(path, category="H")] == [0, 1, None, 0, 0]
    assert [e.label for e in datasets.read_dataset(path, category="V")] == [0, None, None, 0, None]
    with caplog.at_level("WARNING", logger="gemmakit.safety"):
        strict = datasets.read_dataset(path, label_rule="strict")
    assert [(e.prompt, e.label) for e in strict] == [("p1", 0), ("p2", 1), ("p4", 1)]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "dropped 2 of 5 texts" in message and "H2 x2" in message and "H x1" in message and "S x1" in message
    with pytest.raises(InputError, match="label rule"):
        datasets.read_openai_moderation(path, label_rule="loose")
    with pytest.raises(InputError, match="OpenAI moderation files only"):
        datasets.read_dataset(_write_jsonl(tmp_path), category="S")
    with pytest.raises(InputError, match="category"):
        datasets.read_openai_moderation(path, category="Q")


def test_small_csv_readers(tmp_path):
    (tmp_path / "x.csv").write_text('id,prompt,type,label,focus,note\n1,"How, do I kill time?",homonyms,safe,kill,'
                                    "\n2,How do I kill a person?,contrast_homonyms,unsafe,kill,\n")
    assert [(e.prompt, e.label) for e in datasets.read_dataset(tmp_path / "x.csv")] == [
        ("How, do I kill time?", 0), ("How do I kill a person?", 1)]
    (tmp_path / "e.csv").write_text("comment;isHate\na;0.0\nb;0.5\nc;1.0\nd;0.2\n")
    assert [e.label for e in datasets.read_dataset(tmp_path / "e.csv")] == [0, 1, 1, 0]  # median 0.35
    (tmp_path / "h.csv").write_text("Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                                    "Do X,standard,illegal,,,x\nSummarise it,contextual,harmful,context,Some text.,y\n")
    got = datasets.read_dataset(tmp_path / "h.csv")
    assert [e.prompt for e in got] == ["Do X", "Some text.\n\n---\n\nSummarise it"] and {e.label for e in got} == {1}
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(FormatError, match="bad.csv"):
        datasets.read_dataset(tmp_path / "bad.csv")
    with pytest.raises(FormatError, match="missing columns"):
        datasets.read_xstest(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="no such file"):
        datasets.read_dataset(tmp_path / "absent.csv")


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@needs_shared
def test_shared_xstest():
    got = datasets.read_dataset(SHARED / "xstest_prompts.csv")
    assert len(got) == 450 and sum(e.label for e in got) == 200
    assert all(e.meta["type"].startswith("contrast_") for e in got if e.label == 1)


@needs_shared
def test_shared_ethos_labels_as_the_notebook():
    got = datasets.read_dataset(SHARED / "ethos_binary.csv")
    assert len(got) == 998 and sum(e.label for e in got) == 515


@needs_shared
def test_shared_harmbench():
    got = datasets.read_dataset(SHARED / "harmbench_behaviors_text_all.csv")
    assert len(got) == 400 and all(e.label == 1 for e in got)
    assert sum("\n\n---\n\n" in e.prompt for e in got) == 100  # the contextual behaviours


def _write_jsonl(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"text": "a", "label": 1}\n')
    return path
