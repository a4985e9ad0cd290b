"""`--guard` on a live server with the real 270M: the Guard's decisions reach the client as OpenAI would show a
filtered answer (`finish_reason: "content_filter"`) plus the verdicts. The base 270M is no safety classifier, so
the thresholds make the outcome certain (0: every text is flagged; 1: none is) and the plumbing is what is tested.
"""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from gemmakit.chat import render_chat  # noqa: E402
from gemmakit.serve import ServeOptions  # noqa: E402

CHAT = [{"role": "user", "content": "Tell me about the weather in spring."}]


@pytest.fixture(scope="module")
def blocking(real_gemma, start_server):
    with start_server(real_gemma, ServeOptions(model_name="g", guard=["dangerous"],
                                               guard_threshold=0.0, slots=2)) as s:
        yield s


@pytest.fixture(scope="module")
def annotating(real_gemma, start_server):
    with start_server(real_gemma, ServeOptions(model_name="g", guard=["dangerous"], guard_action="annotate",
                                               guard_threshold=1.0, guard_chunk_chars=30, slots=2)) as s:
        yield s


def test_blocked_prompt_is_refused_with_content_filter(blocking, parse_sse):
    client = openai.OpenAI(base_url=blocking.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="g", messages=CHAT, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter"
    assert "flagged" in choice.message.content and r.usage.completion_tokens == 0
    verdict = choice.model_extra["guard"][0]
    assert verdict["stage"] == "prompt" and verdict["blocked"] and set(verdict["scores"]) == {"dangerous"}
    raw = httpx.post(blocking.url + "/v1/chat/completions", timeout=60,
                     json={"model": "g", "messages": CHAT, "stream": True, "max_tokens": 8}).text
    chunks = [json.loads(e) for e in parse_sse(raw)[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter" and chunks[-1]["guard"][0]["blocked"]
    assert "guard_blocks" in httpx.get(blocking.url + "/metrics").text


def test_annotating_guard_screens_the_answer_as_it_grows(annotating, real_gemma):
    client = openai.OpenAI(base_url=annotating.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="g", messages=CHAT, max_tokens=40, temperature=0)
    alone = real_gemma.tokenizer.decode(real_gemma.generate_ids([render_chat(CHAT, real_gemma.tokenizer)],
                                                                max_new_tokens=40)[0])
    assert r.choices[0].message.content == alone  # annotate passes everything through unchanged
    stages = [v["stage"] for v in r.choices[0].model_extra["guard"]]
    assert stages[0] == "prompt" and "chunk" in stages and not any(v["blocked"] for v in
                                                                   r.choices[0].model_extra["guard"])
    streamed = list(client.chat.completions.create(model="g", messages=CHAT, max_tokens=40, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == alone
    assert streamed[-1].model_extra["guard"][0]["stage"] == "prompt"
