"""Classifier evaluation as the ShieldGemma paper reports it: optimal F1 and AU-PRC, plus ROC-AUC.

AU-PRC is average precision, sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (scikit-learn's
`average_precision_score`; the paper does not name its estimator). ROC-AUC is the trapezoid area, which counts
tied scores as half right. Written with numpy so that evaluation needs no scikit-learn (the tests use it as the
oracle). The PR-curve PNG is drawn by hand for the same reason: a few lines instead of a plotting dependency.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.errors import InputError


def _check(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1 or len(y) == 0:
        raise InputError(f"labels and scores must be two non-empty lists of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise InputError("labels must be 0 or 1 (drop unknown labels first)")
    if not np.isfinite(s).all():
        raise InputError("scores must be finite numbers")
    return y.astype(np.int64), s


def _counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when predicting `score >= t`, for each distinct t from high to low."""
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp, fp, s[last]


def precision_recall_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) for thresholds from high to low (point i predicts score >= thresholds[i])."""
    y, s = _check(labels, scores)
    if y.sum() == 0:
        raise InputError("precision-recall needs at least one positive label")
    tp, fp, thresholds = _counts(y, s)
    return tp / (tp + fp), tp / y.sum(), thresholds


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    y, s = _check(labels, scores)
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    if positives == 0 or negatives == 0:
        raise InputError("ROC-AUC needs both positive and negative labels")
    tp, fp, _ = _counts(y, s)
    tpr, fpr = np.r_[0.0, tp / positives], np.r_[0.0, fp / negatives]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def optimal_f1(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold that reaches it (predict positive when score >= it)."""
    y, s = _check(labels, scores)
    tp, fp, thresholds = _counts(y, s)
    f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def evaluate(labels: Sequence[int | None], scores: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """A report over the known labels (None = unknown, skipped). Metrics that a one-class set cannot define are
    None; `flag_rate` (share flagged at `threshold`) still says e.g. how much of HarmBench a classifier catches."""
    known = [(int(y), float(s)) for y, s in zip(labels, scores, strict=True) if y is not None]
    if not known:
        raise InputError("no example has a known label")
    y = [k[0] for k in known]
    s = [k[1] for k in known]
    positives = sum(y)
    both = 0 < positives < len(y)
    f1, best = optimal_f1(y, s) if positives else (None, None)
    flagged = [v >= threshold for v in s]
    tp = sum(1 for f, t in zip(flagged, y, strict=True) if f and t)
    return {
        "n": len(y), "positives": positives, "unknown": len(labels) - len(y),
        "optimal_f1": f1, "optimal_threshold": best,
        "average_precision": average_precision(y, s) if both else None,
        "roc_auc": roc_auc(y, s) if both else None,
        "threshold": threshold, "flag_rate": sum(flagged) / len(y),
        "f1_at_threshold": 2 * tp / (sum(flagged) + positives) if sum(flagged) + positives else None,
        "accuracy_at_threshold": sum(1 for f, t in zip(flagged, y, strict=True) if f == bool(t)) / len(y),
    }


# --- PR curve as a PNG ------------------------------------------------------------------------------------------
def write_pr_curve_png(path: str | Path, labels: Sequence[int], scores: Sequence[float], size: int = 400) -> Path:
    """Precision (y) against recall (x) on the unit square, grid every 0.1, step-wise like scikit-learn's plot."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    margin = size // 10
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    span = size - 2 * margin

    def xy(r: float, p: float) -> tuple[int, int]:
        return margin + round(r * span), size - margin - round(p * span)

    for i in range(11):
        _line(image, xy(i / 10, 0), xy(i / 10, 1), (225, 225, 225))
        _line(image, xy(0, i / 10), xy(1, i / 10), (225, 225, 225))
    for a, b in [((0, 0), (1, 0)), ((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 1), (1, 1))]:
        _line(image, xy(*a), xy(*b), (0, 0, 0))
    points = [(0.0, float(precision[0]))] + [(float(r), float(p)) for r, p in zip(recall, precision, strict=True)]
    for (r0, p0), (r1, p1) in zip(points, points[1:], strict=False):
        _line(image, xy(r0, p0), xy(r1, p0), (31, 119, 180), width=2)  # recall grows at the old precision
        _line(image, xy(r1, p0), xy(r1, p1), (31, 119, 180), width=2)
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path


def _line(image: np.ndarray, a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int],
          width: int = 1) -> None:
    steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
    xs = np.rint(np.linspace(a[0], b[0], steps + 1)).astype(int)
    ys = np.rint(np.linspace(a[1], b[1], steps + 1)).astype(int)
    for dx in range(width):
        for dy in range(width):
            image[np.clip(ys + dy, 0, image.shape[0] - 1), np.clip(xs + dx, 0, image.shape[1] - 1)] = color


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an [H, W, 3] uint8 array (no filtering; zlib does the work)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
