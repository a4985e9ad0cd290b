"""The server's parts without a model: stop strings, request parsing, SSE framing, logits processing, the guard's
stream rule and llguidance's view of a gemmakit vocabulary."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from gemmakit.serve import openai_schema as schema
from gemmakit.serve.errors import APIError
from gemmakit.serve.processors import make_processor
from gemmakit.serve.stops import StopMatcher
from gemmakit.serve.streaming import DONE, ChunkMaker


def run_stops(stops, pieces):
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    return out, m


def test_stop_string_spanning_pieces_is_held_and_never_emitted():
    out, m = run_stops(["END"], ["hello E", "N", "D and more"])
    assert out == ["hello ", "", ""] and m.stopped and m.matched == "END"
    out, m = run_stops(["END"], ["hello E", "N", "o!"])
    assert "".join(out) + m.flush() == "hello ENo!" and not m.stopped
    assert out[0] == "hello " and out[1] == ""  # "EN" could still start END: held back


def test_earliest_of_several_stops_wins_and_flush_releases_a_partial():
    out, m = run_stops(["\n\n", "ab"], ["xa", "b\n\nz"])
    assert "".join(out) == "x" and m.matched == "ab"
    out, m = run_stops(["stop"], ["the st"])
    assert out == ["the "] and m.flush() == "st"


@pytest.mark.parametrize("text", ["abcabd", "aaab", "xyz", "ababab"])
def test_stop_matcher_equals_cutting_the_whole_text(text):
    for stop in ("ab", "abd", "bab", "zz"):
        for split in range(len(text) + 1):
            out, m = run_stops([stop], [text[:split], text[split:]])
            got = "".join(out) + m.flush()
            assert got == (text[:text.index(stop)] if stop in text else text)


def parse(raw):
    return schema.parse_json(raw if isinstance(raw, bytes) else json.dumps(raw).encode())


@pytest.mark.parametrize("raw", [b"{", b"NaN", b'{"a": Infinity}', b"[]", b"\xff"])
def test_parse_json_refuses(raw):
    with pytest.raises(APIError) as e:
        schema.parse_json(raw)
    assert e.value.status == 400 and e.value.code == "invalid_json"


def test_gen_params_defaults_and_aliases():
    p = schema.gen_params({"max_completion_tokens": 7, "stop": "x", "logprobs": True}, 100, chat=True)
    assert (p.max_tokens, p.stop, p.logprobs, p.temperature, p.n) == (7, ["x"], 0, 1.0, 1)
    p = schema.gen_params({"logprobs": 3, "top_k": 0}, 100, chat=False)
    assert p.logprobs == 3 and p.top_k is None
    p = schema.gen_params({"logit_bias": {"5": -100, "7": 2.5}}, 100, chat=True)
    assert p.logit_bias == {5: -100.0, 7: 2.5}


def test_messages_flatten_text_parts_and_map_developer():
    msgs = schema.messages({"messages": [{"role": "developer", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}]})
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]


def test_chunk_maker_frames_events_like_openai():
    maker = ChunkMaker("chat", "chatcmpl-1", 123, "m", include_usage=True)
    events = [maker.role(0), maker.content(0, "hé"), maker.finish(0, "stop"), maker.usage({"prompt_tokens": 1})]
    for e in events:
        assert e.startswith(b"data: ") and e.endswith(b"\n\n") and e.count(b"\n") == 2
    chunks = [json.loads(e[6:]) for e in events]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"]["content"] == "hé" and chunks[1]["usage"] is None
    assert chunks[2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[3]["choices"] == [] and chunks[3]["usage"] == {"prompt_tokens": 1}
    assert DONE == b"data: [DONE]\n\n"
    text = ChunkMaker("text", "cmpl-1", 1, "m", include_usage=False)
    assert "usage" not in json.loads(text.content(0, "x")[6:]) and json.loads(text.content(0, "x")[6:])[
        "object"] == "text_completion"


def test_logits_processor_follows_openai_definitions():
    assert make_processor({}, 0.0, 0.0) is None
    process = make_processor({2: 5.0}, presence=0.5, frequency=0.25)
    logits = torch.zeros(6)
    out = process([1, 1, 3], logits)
    expected = torch.tensor([0, -(2 * 0.25 + 0.5), 5, -(0.25 + 0.5), 0, 0])
    assert torch.allclose(out, expected)


class WordClassifier:
    """Flags a response that contains a word (a stand-in policy whose verdict is known, so the stream rule shows)."""

    def __init__(self, word: str) -> None:
        self.word = word

    def classify(self, prompt, response=None):
        from gemmakit.safety import Classification, PolicyResult

        text = response if response is not None else prompt
        return Classification((PolicyResult("word", 1.0 if self.word in text else 0.0, 0.5),))


def test_blocking_stream_screen_holds_text_until_screened():
    from gemmakit.safety import Guard
    from gemmakit.serve.guard import ServeGuard

    guard = ServeGuard(Guard(None, classifier=WordClassifier("bomb"), chunk_chars=10))

    async def run(pieces):
        screen, out = guard.stream("q"), []
        for piece in pieces:
            text, blocked = await screen.feed(piece)
            out.append(text)
            if blocked:
                return out, blocked
        tail, blocked = await screen.finish()
        return out + [tail], blocked

    out, blocked = asyncio.run(run(["I like ", "cake", " and tea", "."]))
    assert "".join(out) == "I like cake and tea." and blocked is None
    assert out[0] == "" and out[1] == "I like cake"  # nothing leaves before its chunk was screened
    out, blocked = asyncio.run(run(["how to make ", "a bomb", " at home"]))
    assert blocked is not None and blocked.blocked and "bomb" not in "".join(out)


def test_llguidance_vocabulary_from_a_gemmakit_tokenizer():
    pytest.importorskip("llguidance")
    from gemmakit.serve.constrained import JsonConstraint, token_bytes
    from support.train_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.stop_ids = frozenset({tok.eos_id})
    data = token_bytes(tok)
    assert data[6 + 0x41] == b"A" and data[0] == b"\xff<pad>" and data[262] == b" "
    constraint = JsonConstraint(tok, {"type": "object", "properties": {"a": {"type": "boolean"}},
                                      "required": ["a"], "additionalProperties": False})
    ids = [6 + b for b in b'{"a": true}']
    for i in ids:
        assert constraint.allows(i) and not constraint.allows(6 + ord("x"))
        allowed = constraint.mask()
        assert allowed.dtype == torch.bool and allowed.shape == (tok.vocab_size,)
        # the mask allows this byte string (llguidance may keep one of several ids spelling the same bytes)
        assert any(data[j] == data[i] for j in allowed.nonzero().flatten().tolist())
        assert not allowed[6 + ord("x")]
        constraint.advance(i)
    assert constraint.done() and constraint.checks > 0 and constraint.masks == len(ids)
