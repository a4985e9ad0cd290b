"""Many clients at once on the real 270M: batch invariance through the server, and cancellation on disconnect."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from gemmakit.serve import ServeOptions  # noqa: E402

TOPICS = ["the sea", "a city at night", "bread", "winter", "a robot", "the moon", "music", "a library",
          "rain", "a mountain", "coffee", "a train", "gardens", "the desert", "a clock", "friendship"]


@pytest.fixture(scope="module")
def server(real_gemma, start_server):
    with start_server(real_gemma, ServeOptions(model_name="m", slots=16, max_queue=64)) as s:
        yield s


def _messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write one sentence about {topic}."}]


def test_16_concurrent_greedy_streams_equal_each_request_alone(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    alone = {}
    for topic in TOPICS:  # one at a time: nothing else in the batch
        r = client.chat.completions.create(model="m", messages=_messages(topic), max_tokens=8, temperature=0)
        alone[topic] = r.choices[0].message.content

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)

        async def one(topic: str) -> str:
            stream = await aclient.chat.completions.create(model="m", messages=_messages(topic), max_tokens=8,
                                                           temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        out = await asyncio.gather(*(one(t) for t in TOPICS))
        await aclient.close()
        return out

    stats_before = server.state.backend.stats()["steps"]
    streamed = asyncio.run(together())
    assert dict(zip(TOPICS, streamed, strict=True)) == alone
    steps = server.state.backend.stats()["steps"] - stats_before
    assert steps < 16 * 8, f"{steps} steps for 16 x 8 tokens: the requests were not batched"


def test_disconnect_frees_the_slot(server):
    body = {"model": "m", "messages": _messages("a long story"), "max_tokens": 2000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in seen)
        assert server.state.backend.stats()["busy_slots"] == 1
    deadline = time.monotonic() + 5
    while server.state.backend.stats()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state.backend.stats()["busy_slots"] == 0
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    deadline = time.monotonic() + 5
    while server.state.backend.stats()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state.backend.stats()["busy_slots"] == 0
    assert httpx.get(server.url + "/health").status_code == 200
