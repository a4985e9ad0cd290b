"""Readers for safety evaluation sets, each turned into `Example(prompt, response, label)`.

Labels are 1 (harmful), 0 (benign) or None (unknown): OpenAI's moderation set leaves categories out where nobody
labelled them, so a per-category label can be unknown (and is skipped in evaluation), while its binary any-harm
label follows ShieldGemma's protocol: 1 if any annotated category is 1, else 0, on every text.
Each reader follows the dataset's own convention:
ETHOS is binarised at the column median as the agile-classifier notebook does, HarmBench's contextual behaviours
get their context in front as HarmBench's own code builds them.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit.errors import FormatError, InputError
from gemmakit.jsonl import iter_jsonl, open_text

MODERATION_CATEGORIES = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")
FORMATS = ("jsonl", "xstest", "openai", "ethos", "harmbench")
logger = logging.getLogger("gemmakit.safety")


@dataclass(frozen=True)
class Example:
    prompt: str
    label: int | None
    response: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def item(self) -> str | tuple[str, str | None]:
        """What `ShieldClassifier.score_batch` takes."""
        return self.prompt if self.response is None else (self.prompt, self.response)


def parse_label(value: Any, where: str) -> int | None:
    """1/0, true/false, "unsafe"/"safe", "1"/"0"; null or "" is unknown."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        for label, words in ((1, ("1", "true", "unsafe", "harmful", "yes")), (0, ("0", "false", "safe", "no"))):
            if lowered in words:
                return label
    raise FormatError(f"{where}: label {value!r} is not 0/1, true/false or safe/unsafe")


def read_jsonl(path: str | Path) -> list[Example]:
    """Lines `{"text": ..., "label": 0|1|null}`; an optional `"response"` makes `text` the prompt it answers."""
    path = Path(path)
    examples = []
    for number, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise FormatError(f"{path}:{number}: needs a string field 'text'")
        response = record.get("response")
        meta = {k: v for k, v in record.items() if k not in ("text", "label", "response")}
        examples.append(Example(record["text"], parse_label(record.get("label"), f"{path}:{number}"), response, meta))
    return examples


LABEL_RULES = ("any", "strict")


def read_openai_moderation(path: str | Path, category: str | None = None, label_rule: str = "any") -> list[Example]:
    """OpenAI's `samples-1680.jsonl(.gz)`: `{"prompt", "S": 0|1, ...}` with categories left out when unlabelled.

    With `category`: that category's label, None where it was not annotated (per-category evaluation skips it).
    Without, the binary any-harm label of ShieldGemma's table, by `label_rule`:
    - "any" (default, the paper's protocol on all 1,680 texts): 1 if any annotated category is 1, else 0.
    - "strict": 0 only when all eight categories are annotated 0; texts with no positive and an unannotated
      category are dropped (not returned), and a warning on the `gemmakit.safety` logger says how many and
      which categories were missing. On the released file this keeps far fewer benign texts, so its figures
      are not comparable with the paper's.
    """
    path = Path(path)
    if category is not None and category not in MODERATION_CATEGORIES:
        raise InputError(f"category {category!r} is unknown; expected one of {', '.join(MODERATION_CATEGORIES)}")
    if label_rule not in LABEL_RULES:
        raise InputError(f"label rule {label_rule!r} is unknown; expected one of {', '.join(LABEL_RULES)}")
    examples, dropped, missing = [], 0, Counter()
    total = 0
    for number, record in iter_jsonl(path):
        if not isinstance(record.get("prompt"), str):
            raise FormatError(f"{path}:{number}: needs a string field 'prompt'")
        total += 1
        where = f"{path}:{number}"
        known = {c: parse_label(record.get(c), where) for c in MODERATION_CATEGORIES}
        known = {c: v for c, v in known.items() if v is not None}  # absent and null both mean "not annotated"
        if category is not None:
            label = known.get(category)
        elif any(v == 1 for v in known.values()):
            label = 1
        elif label_rule == "strict" and len(known) < len(MODERATION_CATEGORIES):
            dropped += 1
            missing.update(c for c in MODERATION_CATEGORIES if c not in known)
            continue
        else:
            label = 0
        examples.append(Example(record["prompt"], label, meta=known))
    if dropped:
        counts = ", ".join(f"{c} x{n}" for c, n in missing.most_common())
        logger.warning(f"{path}: strict label rule dropped {dropped} of {total} texts (no category is 1 and at "
                       f"least one is unannotated; unannotated: {counts}); the paper's rule (label_rule='any') "
                       f"keeps all {total}")
    return examples


def _csv(path: Path, required: tuple[str, ...], delimiter: str = ",") -> list[dict[str, str]]:
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise FormatError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
        return list(reader)


def read_xstest(path: str | Path) -> list[Example]:
    """XSTest v2 `id,prompt,type,label,focus,note`: `unsafe` = 1 (the `contrast_*` types), `safe` = 0."""
    path = Path(path)
    rows = _csv(path, ("prompt", "label"))
    return [Example(r["prompt"], parse_label(r["label"], f"{path}:{i + 2}"),
                    meta={k: r.get(k, "") for k in ("id", "type", "focus", "note")}) for i, r in enumerate(rows)]


def read_ethos(path: str | Path) -> list[Example]:
    """ETHOS binary `comment;isHate` (a float): label 1 when isHate >= the file's median (0.333: 515 of 998)."""
    path = Path(path)
    rows = _csv(path, ("comment", "isHate"), delimiter=";")
    if not rows:
        raise FormatError(f"{path}: no rows")
    try:
        values = [float(r["isHate"]) for r in rows]
    except ValueError as e:
        raise FormatError(f"{path}: isHate must be a number: {e}") from e
    median = statistics.median(values)
    return [Example(r["comment"], int(v >= median), meta={"isHate": v}) for r, v in zip(rows, values, strict=True)]


def read_harmbench(path: str | Path) -> list[Example]:
    """HarmBench behaviours (all harmful, label 1); contextual ones become `{context}\\n\\n---\\n\\n{behavior}`."""
    path = Path(path)
    rows = _csv(path, ("Behavior", "ContextString"))
    examples = []
    for r in rows:
        context = (r.get("ContextString") or "").strip()
        text = f"{context}\n\n---\n\n{r['Behavior']}" if context else r["Behavior"]
        meta = {k: r.get(k, "") for k in ("BehaviorID", "FunctionalCategory", "SemanticCategory", "Tags")}
        examples.append(Example(text, 1, meta=meta))
    return examples


def detect_format(path: str | Path) -> str:
    """Guess the reader from the first line: a CSV header or the keys of the first JSON object."""
    path = Path(path)
    with open_text(path) as f:
        first = f.readline().strip()
    if first.startswith("{"):
        try:
            keys = set(json.loads(first))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: first line is not valid JSON: {e}") from e
        if "text" in keys:
            return "jsonl"
        if "prompt" in keys:
            return "openai"
    header = first.lstrip("\ufeff")
    if header.startswith("comment;isHate"):
        return "ethos"
    if header.startswith("Behavior,"):
        return "harmbench"
    if "prompt" in header.split(",") and "label" in header.split(","):
        return "xstest"
    raise FormatError(f"{path}: cannot tell the dataset format from its first line {first[:80]!r}; pass one of "
                      f"{', '.join(FORMATS)}")


def read_dataset(path: str | Path, format: str = "auto", label_rule: str = "any",  # noqa: A002 - the CLI's word
                 category: str | None = None) -> list[Example]:
    """Read any supported set; `format` is one of FORMATS or "auto".

    `label_rule` and `category` apply to OpenAI moderation files only (see `read_openai_moderation`); asking for
    a category of another format is an error, while the label rule is simply not needed there.
    """
    fmt = detect_format(path) if format == "auto" else format
    readers = {"jsonl": read_jsonl, "xstest": read_xstest, "openai": read_openai_moderation, "ethos": read_ethos,
               "harmbench": read_harmbench}
    if fmt not in readers:
        raise InputError(f"format {format!r} is unknown; expected auto or one of {', '.join(FORMATS)}")
    if fmt == "openai":
        return read_openai_moderation(path, category=category, label_rule=label_rule)
    if category is not None:
        raise InputError(f"{path}: a moderation category ({category!r}) applies to OpenAI moderation files only; "
                         f"this one reads as {fmt!r}")
    return readers[fmt](path)
