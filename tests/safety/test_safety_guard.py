"""The guard blocks and passes as configured, before generation, after it, and in chunks while streaming."""

from __future__ import annotations

import pytest

from gemmakit.errors import InputError
from gemmakit.safety import Guard, ShieldClassifier
from gemmakit.safety.scoring import Classification, PolicyResult
from support.safety_fixtures import WordTokenizer, tiny_model


class WordClassifier:
    """Flags a text for the 'harassment' policy when it contains the word 'bad'; records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def classify(self, prompt: str, response: str | None = None) -> Classification:
        self.calls.append((prompt, response))
        text = prompt if response is None else response
        score = 0.9 if "bad" in text.split() else 0.1
        return Classification((PolicyResult("harassment", score, 0.5), PolicyResult("hate", 0.2, 0.5)))


class ScriptedChat:
    """A chat model that streams a fixed answer in pieces, and counts how many pieces were pulled."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces, self.pulled = pieces, 0

    def chat_stream(self, messages, max_new_tokens=256, **sampling):
        for piece in self.pieces:
            self.pulled += 1
            yield piece


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_blocks_a_flagged_prompt_before_generating():
    chat = ScriptedChat(["never", " said"])
    reply = Guard(chat, WordClassifier(), message="blocked: {policy} ({stage})").chat(user("a bad request"))
    assert reply.blocked and reply.text == "blocked: harassment (request)"
    assert chat.pulled == 0
    result = reply.results[0]
    assert (result.stage, result.policy, result.score, result.threshold) == ("prompt", "harassment", 0.9, 0.5)


def test_passes_a_clean_exchange_and_screens_the_answer_with_its_prompt():
    clf = WordClassifier()
    reply = Guard(ScriptedChat(["all", " good", " here"]), clf, chunk_chars=0).chat(user("hello"))
    assert not reply.blocked and reply.text == "all good here"
    assert clf.calls == [("hello", None), ("hello", "all good here")]
    assert [r.stage for r in reply.results] == ["prompt", "response"]


def test_blocks_a_flagged_answer_after_generation():
    reply = Guard(ScriptedChat(["this", " is", " bad"]), WordClassifier(), chunk_chars=0).chat(user("hi"))
    assert reply.blocked and "harassment" in reply.text and "bad" not in reply.text
    assert reply.results[-1].stage == "response"


def test_streaming_holds_back_unscreened_text_and_stops_at_the_flagged_chunk():
    pieces = ["one ", "two ", "three ", "bad ", "five ", "six ", "seven ", "eight "]
    chat = ScriptedChat(pieces)
    stream = Guard(chat, WordClassifier(), chunk_chars=8, message="[stopped]").chat_stream(user("hi"))
    out = list(stream)
    assert out[-1] == "[stopped]" and "bad" not in "".join(out)
    assert "".join(out[:-1]) == "one two "  # the chunk screened and passed before the flagged one
    assert chat.pulled < len(pieces)  # generation stopped early
    assert stream.blocked and stream.results[-1].stage == "chunk"


def test_annotate_passes_everything_and_records_the_verdicts():
    pieces = ["a ", "bad ", "answer"]
    stream = Guard(ScriptedChat(pieces), WordClassifier(), action="annotate", chunk_chars=4).chat_stream(
        user("bad question"))
    assert "".join(stream) == "a bad answer"
    assert not stream.blocked and stream.reply.flagged
    assert stream.results[0].flagged[0].policy == "harassment"
    assert stream.reply.text == "a bad answer"


def test_options_are_checked():
    with pytest.raises(InputError, match="action"):
        Guard(ScriptedChat([]), WordClassifier(), action="explode")
    with pytest.raises(InputError, match="last message"):
        Guard(ScriptedChat([]), WordClassifier()).chat([{"role": "assistant", "content": "x"}])


def test_with_a_shield_classifier_on_a_tiny_model(tmp_path):
    model = tiny_model("gemma3", tmp_path)
    chat = ScriptedChat(["fine"])
    strict = ShieldClassifier(model, policies=["hate", "dangerous"], tokenizer=WordTokenizer(), threshold=0.0)
    lenient = ShieldClassifier(model, policies=["hate", "dangerous"], tokenizer=WordTokenizer(), threshold=1.0)
    assert Guard(chat, strict).chat(user("hello")).blocked
    reply = Guard(chat, lenient).chat(user("hello"))
    assert not reply.blocked and reply.text == "fine"
    assert set(reply.results[0].classification.scores) == {"hate", "dangerous"}
