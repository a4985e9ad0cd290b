"""Bad input, authentication and limits on a live server (a tiny random Gemma 3: the answers' words do not matter
here, only the statuses, OpenAI's error shape, and that the server still answers afterwards)."""

from __future__ import annotations

import threading

import httpx
import pytest

from gemmakit.serve import ServeOptions

KEYS = ["key-one", "key-two"]
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_chat_gemma, start_server):
    options = ServeOptions(model_name="tiny", api_keys=KEYS, slots=1, max_queue=1, context=128, max_body_bytes=4096)
    with start_server(tiny_chat_gemma, options) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer key-one"}, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


BAD = [
    ("malformed json", b'{"model": "tiny", "messages": [', 400, "invalid_json", None),
    ("NaN", b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400,
     "invalid_json", None),
    ("not an object", b"[1, 2]", 400, "invalid_json", None),
    ("bad utf-8", b'{"model": "\xff"}', 400, "invalid_json", None),
]
BAD_FIELDS = [
    ({"temperature": "hot"}, "invalid_type", "temperature"),
    ({"temperature": 5}, "invalid_value", "temperature"),
    ({"top_p": 0}, "invalid_value", "top_p"),
    ({"top_k": -1}, "invalid_value", "top_k"),
    ({"min_p": 2}, "invalid_value", "min_p"),
    ({"max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"max_tokens": True}, "invalid_type", "max_tokens"),
    ({"n": 0}, "invalid_value", "n"),
    ({"n": 100}, "invalid_value", "n"),
    ({"stop": 3}, "invalid_type", "stop"),
    ({"stop": [""]}, "invalid_value", "stop"),
    ({"logit_bias": {"999999": 5}}, "invalid_value", "logit_bias"),
    ({"logit_bias": {"5": 500}}, "invalid_value", None),
    ({"top_logprobs": 3}, "invalid_value", "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "invalid_value", "top_logprobs"),
    ({"presence_penalty": -3}, "invalid_value", "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
    ({"response_format": {"type": "xml"}}, "invalid_value", "response_format.type"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"messages": "hi"}, "invalid_type", "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "invalid_value", None),
    ({"messages": [{"role": "assistant", "content": "first"}]}, "invalid_value", "messages"),
    ({"tools": [{"type": "function"}]}, "unsupported_parameter", "tools"),
]


@pytest.mark.parametrize("name,raw,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_malformed_bodies(http, name, raw, status, code, param):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, status, code, param)


def test_bad_fields_each_get_400_and_the_server_goes_on(http):
    for patch, code, param in BAD_FIELDS:
        assert_error(http.post("/v1/chat/completions", json={**OK_CHAT, **patch}), 400, code, param)
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 99999]}), 400, "invalid_value")
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": {"a": 1}}), 400, "invalid_type")
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "suffix": "b"}), 400,
                 "unsupported_parameter")
    assert_error(http.post("/v1/moderations", json={"input": "x"}), 400, "moderation_unavailable")  # no Yes/No
    assert_error(http.post("/detokenize", json={"tokens": ["a"]}), 400, "invalid_type")
    assert http.post("/v1/chat/completions", json=OK_CHAT).status_code == 200


def test_prompt_longer_than_the_context(http):
    long = {**OK_CHAT, "messages": [{"role": "user", "content": "the sea " * 200}]}
    error = assert_error(http.post("/v1/chat/completions", json=long), 400, "context_length_exceeded")
    assert "128" in error["message"]
    too_many = {**OK_CHAT, "max_tokens": 500}
    assert_error(http.post("/v1/chat/completions", json=too_many), 400, "context_length_exceeded")
    prompt = {"model": "tiny", "prompt": list(range(5, 200))}
    assert_error(http.post("/v1/completions", json=prompt), 400, "context_length_exceeded")
    assert http.post("/v1/chat/completions", json=OK_CHAT).status_code == 200


def test_unknown_model_and_route(http):
    assert_error(http.post("/v1/chat/completions", json={**OK_CHAT, "model": "gpt-9"}), 404, "model_not_found",
                 "model")
    assert_error(http.get("/v1/nothing"), 404, "not_found")
    assert_error(http.get("/v1/chat/completions"), 405)


def test_auth(server):
    url = server.url
    assert_error(httpx.post(url + "/v1/chat/completions", json=OK_CHAT), 401, "invalid_api_key")
    assert_error(httpx.post(url + "/v1/chat/completions", json=OK_CHAT, headers={"Authorization": "Bearer nope"}),
                 401, "invalid_api_key")
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "key-one"}), 401)  # no "Bearer"
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"X-Api-Key": "key-one"}).status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # public, for load balancers
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/static/chat.js").status_code == 200
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=url + "/v1", api_key="key-two", max_retries=0).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_body_limit(http):
    big = {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(http.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}),
                 413, "request_too_large")
    assert http.post("/v1/chat/completions", json=OK_CHAT).status_code == 200


def test_full_queue_gets_429(server, http):
    """One slot, a queue of one: with a long request running and one waiting, the next is refused."""
    long = {**OK_CHAT, "max_tokens": 80, "stream": True}
    started = threading.Event()
    results: list[int] = []

    def hold() -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=120,
                          headers={"X-Api-Key": "key-one"}) as r:
            results.append(r.status_code)
            started.set()
            r.read()

    first = threading.Thread(target=hold)
    first.start()
    assert started.wait(60)
    server.state.backend.scheduler.submit  # noqa: B018 - the scheduler is up
    waiting = threading.Thread(target=hold)
    statuses = []
    waiting.start()
    for _ in range(200):  # the second request is queued as soon as it is submitted
        if server.state.backend.stats()["queue_length"] == 1 or len(results) == 2:
            break
        threading.Event().wait(0.005)
    if server.state.backend.stats()["queue_length"] == 1:
        r = http.post("/v1/chat/completions", json=OK_CHAT)
        statuses.append(r.status_code)
        error = assert_error(r, 429, "queue_full")
        assert r.headers.get("retry-after") == "1" and error["type"] == "rate_limit_error"
    first.join(120)
    waiting.join(120)
    assert results == [200, 200]
    if not statuses:
        pytest.skip("the running request finished before the queue could be filled (a very fast machine)")
    assert http.post("/v1/chat/completions", json=OK_CHAT).status_code == 200
