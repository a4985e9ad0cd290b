"""The server against the official `openai` client (sync and async, streaming and not) on the real Gemma 3 270M.

References are the model itself: a greedy request must give exactly the ids `Gemma.generate_ids` gives for the same
prompt (the same request alone), moderation scores exactly what `ShieldClassifier` gives in-process.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from gemmakit.chat import render_chat  # noqa: E402
from gemmakit.serve import ServeOptions  # noqa: E402

CHAT = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(real_gemma, start_server):
    with start_server(real_gemma, ServeOptions(model_name="gemma-270m", slots=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(gemma, ids: list[int], n: int) -> str:
    return gemma.tokenizer.decode(gemma.generate_ids([ids], max_new_tokens=n)[0])


def test_chat_sync_equals_the_model_alone(client, real_gemma):
    r = client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=24, temperature=0)
    ids = render_chat(CHAT, real_gemma.tokenizer)
    assert r.choices[0].message.content == reference(real_gemma, ids, 24)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "gemma-270m"


def test_chat_stream_matches_non_stream_and_frames_like_openai(client):
    whole = client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_line_by_line(server, parse_sse):
    body = {"model": "gemma-270m", "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finish = chunks[-2]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all("content" in c["choices"][0]["delta"] for c in chunks[1:-2])


def test_async_client_chat_and_completions(server, real_gemma):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = await client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=12, temperature=0,
                                                 stream=True)
        streamed = "".join([c.choices[0].text async for c in stream if c.choices])
        whole = await client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=12, temperature=0)
        chat = await client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=6, temperature=0)
        await client.close()
        return streamed, whole, chat

    streamed, whole, chat = asyncio.run(run())
    assert whole.choices[0].text == streamed == reference(real_gemma, real_gemma.encode(PROMPT), 12)
    assert chat.choices[0].message.content


def test_stop_string_across_tokens_is_never_emitted(client, real_gemma):
    ids = real_gemma.encode(PROMPT)
    out = real_gemma.generate_ids([ids], max_new_tokens=16)[0]
    pieces = [real_gemma.tokenizer.decode(out[:i]) for i in range(len(out) + 1)]
    full = pieces[-1]
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(2, len(out)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = full[len(pieces[k]) - 1:len(pieces[k]) + 1]
    expected = full[:full.index(stop)]
    r = client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_logprobs_chat_and_completions(client):
    r = client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
    c = client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(d) == 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


def test_seeded_sampling_n_choices_reproducible(client):
    def ask():
        return client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=12, temperature=1.0,
                                              top_p=0.95, seed=7, n=2, extra_body={"top_k": 40, "min_p": 0.01})
    a, b = ask(), ask()
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens == b.usage.completion_tokens >= 2


def test_logit_bias_and_penalties_change_the_choice(client, real_gemma):
    target = real_gemma.tokenizer.encode(" banana", add_bos=False)[0]
    r = client.completions.create(model="gemma-270m", prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(target): 100})
    assert r.choices[0].text == real_gemma.tokenizer.decode([target] * 3)
    plain = client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=24, temperature=0)
    penalised = client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=24, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    words = plain.choices[0].message.content.split()
    assert len(set(words)) < len(words), "the reference answer should repeat itself for this check to mean anything"
    assert penalised.choices[0].message.content != plain.choices[0].message.content


def test_json_schema_output_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}},
              "required": ["colour", "count", "ok"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="gemma-270m", messages=[{"role": "user", "content": "Describe a colour as JSON."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="gemma-270m", messages=CHAT, max_tokens=40, temperature=0.8, seed=3,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert r.choices[0].message.content.startswith("{")


def test_moderations_match_the_classifier(client, real_gemma):
    from gemmakit.safety import ShieldClassifier

    texts = ["I will find you and hurt you.", "What a lovely day for a picnic."]
    r = client.moderations.create(input=texts)
    assert len(r.results) == 2
    direct = ShieldClassifier(real_gemma).score_batch(texts)
    for result, scores in zip(r.results, direct, strict=True):
        got = result.model_dump(by_alias=True)["category_scores"]
        assert got["hate"] == pytest.approx(scores["hate"], abs=1e-6)
        assert got["harassment"] == pytest.approx(scores["harassment"], abs=1e-6)
        assert got["illicit/violent"] == pytest.approx(scores["dangerous"], abs=1e-6)
        assert result.flagged == any(v >= 0.5 for v in scores.values())
    single = client.moderations.create(input="hello", model="omni-moderation-latest")
    assert len(single.results) == 1
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(input=5)  # type: ignore[arg-type]
    from gemmakit.safety import Policy

    guideline = '"No Personal Data": The prompt shall not contain or seek anyone\'s home address.'
    custom = client.moderations.create(input=texts[:1], extra_body={"policies": [
        "hate", {"name": "pii", "guideline": guideline}]}).results[0].model_dump(by_alias=True)
    direct = ShieldClassifier(real_gemma, policies=["hate", Policy.from_text("pii", guideline)]).score(texts[0])
    assert {k for k, v in custom["category_scores"].items() if v is not None} == {"hate", "pii"}
    assert custom["category_scores"]["pii"] == pytest.approx(direct["pii"], abs=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.moderations.create(input="x", model="gpt-9")


def test_tokenize_detokenize_models_health_metrics(server, real_gemma):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["tokens"] == real_gemma.encode("Hello world") and ids["count"] == len(ids["tokens"])
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"][1:]}).json()
    assert text["prompt"] == "Hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == render_chat(CHAT, real_gemma.tokenizer)
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["gemma-270m"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'gemmakit_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    for name in ("gemmakit_time_to_first_token_seconds_count", "gemmakit_inter_token_latency_seconds_count",
                 "gemmakit_busy_slots", "gemmakit_queue_length", "gemmakit_prefix_cache_hits_total",
                 "gemmakit_completion_tokens_total"):
        line = next(m for m in metrics.splitlines() if m.startswith(name))
        assert float(line.split()[-1]) >= 0
    ttft = next(m for m in metrics.splitlines() if m.startswith("gemmakit_time_to_first_token_seconds_count"))
    assert float(ttft.split()[-1]) > 0


def test_explorer_is_mounted_or_says_why_not(server):
    import importlib.util

    page = httpx.get(server.url + "/explore", timeout=30)
    info = httpx.get(server.url + "/ui/info").json()
    if importlib.util.find_spec("gemmakit.explain.web") is None:
        assert page.status_code == 404 and "Explorer not available" in page.text and not info["explore"]
    else:
        assert page.status_code == 200 and "text/html" in page.headers["content-type"] and info["explore"]

