"""Aggregation into words, sentences, lines, paragraphs and regex matches (each segment's score is the sum of its
tokens, checked against segments found independently with str methods), and the `gemmakit explain` command on a
tiny model saved with a real SentencePiece tokenizer: --json, --granularity, --html, no colour off a terminal."""

from __future__ import annotations

import json
import random
import re

import pytest

from gemmakit.cli import main
from gemmakit.errors import InputError
from gemmakit.explain.segments import aggregate, segment_ids
from support.scope_support import one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
TEXT = "The sea was calm. The ship sailed!\nA king, a queen.\n\nNew paragraph here? Yes it is."


def _split_pieces(text: str, seed: int) -> list[str]:
    """Random token boundaries (1-4 characters) inside words; as with SentencePiece, whitespace only ever leads a
    token ("\u2581sea"), so no token straddles two words."""
    rng, pieces = random.Random(seed), []
    for chunk in re.findall(r"\s*\S+", text):
        lead = len(chunk) - len(chunk.lstrip())
        cut = [0] + ([lead] if lead and rng.random() < 0.5 else [])  # sometimes the spaces are a token of their own
        i = lead
        while (i := i + rng.randint(1, 4)) < len(chunk):
            cut.append(i)
        cut.append(len(chunk))
        pieces += [chunk[a:b] for a, b in zip(cut[:-1], cut[1:], strict=True)]
    return pieces


@pytest.mark.parametrize("seed", range(5))
def test_words_and_lines_sum_their_tokens(seed):
    pieces = _split_pieces(TEXT, seed)
    scores = [random.Random(seed + 100).uniform(-1, 1) for _ in pieces]
    starts = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]

    def owner_sum(spans):
        """Score of each (start, end) text span: tokens whose first non-space character lies inside it."""
        out = []
        for lo, hi in spans:
            total = 0.0
            for st, p, s in zip(starts, pieces, scores, strict=True):
                first = st + len(p) - len(p.lstrip())
                if p.strip() and lo <= first < hi:
                    total += s
            out.append(total)
        return out

    word_spans, pos = [], 0
    for w in TEXT.split():
        lo = TEXT.index(w, pos)
        word_spans.append((lo, lo + len(w)))
        pos = lo + len(w)
    words = [s for s in aggregate(pieces, scores, "word") if s.text.strip()]
    assert [s.text.strip() for s in words] == TEXT.split()
    expected = owner_sum(word_spans)
    # a pure-space token joins the next word; add those back to the independent sums
    for k, seg in enumerate(words):
        extra = sum(scores[i] for i in seg.tokens if not pieces[i].strip())
        assert seg.score == pytest.approx(expected[k] + extra, abs=1e-9)
    line_spans, pos = [], 0
    for line in TEXT.split("\n"):
        if line:
            line_spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    lines = [s for s in aggregate(pieces, scores, "line") if s.matched]
    assert len(lines) == 3
    for seg, want in zip(lines, owner_sum(line_spans), strict=True):
        extra = sum(scores[i] for i in seg.tokens if not pieces[i].strip())
        assert seg.score == pytest.approx(want + extra, abs=1e-9)


def test_every_granularity_partitions_the_tokens():
    pieces = _split_pieces(TEXT, 7)
    scores = [float(i) for i in range(len(pieces))]
    for g in ("token", "word", "sentence", "line", "paragraph", r"[A-Z]\w*"):
        segs = aggregate(pieces, scores, g)
        assert "".join(s.text for s in segs) == TEXT
        assert sorted(i for s in segs for i in s.tokens) == list(range(len(pieces)))
        assert sum(s.score for s in segs) == pytest.approx(sum(scores))
        ids = segment_ids(pieces, g)
        assert max(ids) + 1 == len(segs) and all(ids[i] == k for k, s in enumerate(segs) for i in s.tokens)
    sentences = [s.text.strip() for s in aggregate(list(TEXT), [0.0] * len(TEXT), "sentence") if s.matched]
    assert sentences == ["The sea was calm.", "The ship sailed!", "A king, a queen.", "New paragraph here?",
                         "Yes it is."]
    paragraphs = [s.text.strip() for s in aggregate(list(TEXT), [0.0] * len(TEXT), "paragraph") if s.matched]
    assert paragraphs == ["The sea was calm. The ship sailed!\nA king, a queen.", "New paragraph here? Yes it is."]
    with pytest.raises(InputError):
        aggregate(pieces, scores, "(unclosed")


def test_explain_command_json_html_and_plain_terminal(tiny_dir, tmp_path, capsys):
    prompt = "the king and the queen. the ship sailed to the city"
    args = ["explain", str(tiny_dir), "--prompt", prompt, "--target", " of the sea", "--span", "1:3"]
    assert main([*args, "--method", "grad_dot_input", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)
    assert "".join(tokens["tokens"]) == prompt and len(tokens["scores"]) == len(tokens["tokens"])
    assert main([*args, "--method", "grad_dot_input", "--granularity", "sentence", "--json",
                 "--html", str(tmp_path / "out.html")]) == 0
    sentences = json.loads(capsys.readouterr().out)
    assert [t.strip() for t in sentences["tokens"]] == ["the king and the queen.", "the ship sailed to the city"]
    assert sum(sentences["scores"]) == pytest.approx(sum(tokens["scores"]), abs=1e-5)
    page = (tmp_path / "out.html").read_text()
    assert "<script" in page and "http" not in page.split("<body>")[1]  # self-contained
    assert page.count('"span": true') == 2 and page.count('"target": false') == 2  # 2 prompt sentences, 2 span tokens
    assert main([*args, "--method", "integrated_gradients", "--granularity", "word"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "completeness error" in out and "[[" in out
    assert main([*args, "--granularity", "(bad"]) == 2


def test_explain_command_with_an_sae_file(tiny_dir, tmp_path, capsys):
    import torch

    from gemmakit import scope

    sae = scope.make_sae("jumprelu", 64, 48, info=scope.SAEInfo(site="layers.3.resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 0.3)
        sae.W_dec.copy_(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.3)
    folder = scope.save_sae(sae, tmp_path / "sae")
    args = ["explain", str(tiny_dir), "--prompt", "the king and the queen", "--target", " of the sea",
            "--sae", str(folder), "--top", "4"]
    assert main([*args, "--json", "--html", str(tmp_path / "f.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    feats = out["features"]
    assert feats["site"] == "layers.3.resid_post" and len(feats["features"]) == 4
    assert feats["total"] == pytest.approx(feats["latents"] + feats["bias"] + feats["error"], rel=1e-4, abs=1e-6)
    assert "SAE features at layers.3.resid_post" in (tmp_path / "f.html").read_text()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "error share" in text and f"#{feats['features'][0]['feature']}" in text


def test_terminal_colours_follow_the_scores():
    from gemmakit.explain import render
    from gemmakit.explain.salience import Salience

    s = Salience(["a", " b", " c", " d"], [10, 11, 12, 13], [0.25, -0.5, 1.0, 0.0], 3, (0, 1), "grad_dot_input", -1.0)
    out = render.terminal(s, "token", colour_on=True)
    backgrounds = [tuple(map(int, m)) for m in re.findall(r"48;2;(\d+);(\d+);(\d+)m", out)]
    assert backgrounds[2] == render.POSITIVE  # the largest |score| gets the full hue
    r, g, b = backgrounds[1]
    assert r > g and r > b  # negative: red, half intensity
    assert backgrounds[1] == render.colour(-0.5, 1.0, True)
    assert backgrounds[0] == render.colour(0.25, 1.0, True) != (255, 255, 255)
    assert "\x1b[4;1m d\x1b[0m" in out  # the span, underlined
    unsigned = render.terminal(Salience(s.tokens, s.ids, [0.5, 0.5, 1.0, 0.0], 3, (0, 1), "grad_l2", -1.0), "token")
    assert tuple(map(int, re.findall(r"48;2;(\d+);(\d+);(\d+)m", unsigned)[2])) == render.UNSIGNED
