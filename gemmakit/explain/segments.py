"""Token scores summed into words, sentences, lines, paragraphs or the matches of any regex, as LIT does.

Each token joins the segment that holds its first non-space character (a token made of spaces only, or one that
completes no character yet, goes with the token after it). Tokens outside every match form their own gap
segments, so the segments always partition the tokens: their texts join back into the whole text and their
scores add up to the total of the token scores.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gemmakit.errors import InputError

PATTERNS = {
    "word": r"\S+",
    "sentence": r"[^\n]+?(?:[.!?]+(?=\s|$)|(?=\n)|$)",
    "line": r"[^\n]+",
    "paragraph": r"(?:[^\n]|\n(?![ \t]*\n))+",
}
GRANULARITIES = ("token", *PATTERNS)


@dataclass
class Segment:
    text: str
    score: float
    tokens: list[int]  # indices into the token list
    matched: bool  # False for a gap between matches


def pattern_for(granularity: str) -> re.Pattern[str]:
    """A named granularity's regex, or `granularity` itself compiled as a regex (its matches are the segments)."""
    source = PATTERNS.get(granularity, granularity)
    try:
        return re.compile(source)
    except re.error as e:
        raise InputError(f"granularity {granularity!r} is neither one of {', '.join(GRANULARITIES)} nor a valid "
                         f"regular expression ({e})") from e


def _anchors(pieces: Sequence[str]) -> list[int]:
    """For each token the character that places it: its first non-space one, else the next token's anchor."""
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    anchors: list[int | None] = []
    for start, p in zip(starts, pieces, strict=True):
        stripped = len(p) - len(p.lstrip())
        anchors.append(start + stripped if stripped < len(p) else None)
    nxt = pos  # past the end: a trailing run of spaces is a gap of its own
    out = [0] * len(pieces)
    for i in range(len(pieces) - 1, -1, -1):
        nxt = anchors[i] if anchors[i] is not None else nxt
        out[i] = nxt
    return out


def assign(pieces: Sequence[str], granularity: str) -> list[tuple[int, bool]]:
    """For each token (segment key, matched): tokens with equal consecutive keys form one segment."""
    spans = [m.span() for m in pattern_for(granularity).finditer("".join(pieces)) if m.end() > m.start()]
    starts = [s for s, _ in spans]
    keys: list[tuple[int, bool]] = []
    gap = -1
    for anchor in _anchors(pieces):
        k = bisect.bisect_right(starts, anchor) - 1
        if k >= 0 and anchor < spans[k][1]:
            keys.append((k, True))
        else:
            if not keys or keys[-1][1]:
                gap -= 1
            keys.append((gap, False))
    return keys


def aggregate(pieces: Sequence[str], scores: Sequence[float], granularity: str = "word") -> list[Segment]:
    """Segments in text order, each scored by the sum of its tokens' scores ("token" gives one per token)."""
    if len(pieces) != len(scores):
        raise InputError(f"{len(pieces)} tokens but {len(scores)} scores")
    if granularity == "token":
        return [Segment(p, float(s), [i], True) for i, (p, s) in enumerate(zip(pieces, scores, strict=True))]
    segments: list[Segment] = []
    last = None
    for i, (key, matched) in enumerate(assign(pieces, granularity)):
        if key != last:
            segments.append(Segment("", 0.0, [], matched))
            last = key
        seg = segments[-1]
        seg.text += pieces[i]
        seg.score += float(scores[i])
        seg.tokens.append(i)
    return segments


def segment_ids(pieces: Sequence[str], granularity: str) -> list[int]:
    """The index of each token's segment (what the page uses to colour whole segments)."""
    out, seg, last = [], -1, None
    for key in (range(len(pieces)) if granularity == "token" else assign(pieces, granularity)):
        if key != last:
            seg += 1
            last = key
        out.append(seg)
    return out
