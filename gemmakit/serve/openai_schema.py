"""Request bodies of OpenAI's API, parsed and checked by hand into plain dataclasses.

Each check names the parameter, what was expected and what came, and raises `APIError(400)` with `param` set, as
OpenAI does. JSON's NaN/Infinity (which Python's json accepts) are refused at parse time. Unknown fields are
ignored, as most OpenAI-compatible servers do, except the ones that would change the answer in a way we do not
support (`tools`, `functions`, `suffix`, `best_of` > n), which are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from gemmakit.serve.errors import APIError, bad_request

MAX_STOPS = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else (not JSON, NaN, a list, bad UTF-8) is a 400."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


# --- field readers --------------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def number(body: dict[str, Any], name: str, default: float | None, lo: float, hi: float,
           lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {_type_name(value)} {value!r}", name, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"'{name}' must be in {interval}, got {value!r}", name, "invalid_value")
    return float(value)


def integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {_type_name(value)} {value!r}", name, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(f"'{name}' must be {bound}, got {value}", name, "invalid_value")
    return value


def boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_type_name(value)} {value!r}", name, "invalid_type")
    return value


def string(body: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {_type_name(value)}", name, "invalid_type")
    return value


# --- generation parameters shared by chat and completions ---------------------------------------------------------
@dataclass
class ResponseFormat:
    type: str = "text"  # text | json_object | json_schema
    schema: dict[str, Any] | None = None
    name: str | None = None


@dataclass
class GenParams:
    """What to generate and how, common to /v1/chat/completions and /v1/completions."""

    model: str | None
    max_tokens: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs; k >= 0: the sampled token's logprob and k alternatives
    logit_bias: dict[int, float]
    presence_penalty: float
    frequency_penalty: float
    ignore_eos: bool = False  # vLLM's and llama-server's extension: generate past the stop tokens (benchmarks)
    response_format: ResponseFormat = field(default_factory=ResponseFormat)


def _stops(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop", "invalid_value")
    if any(s == "" for s in stops):
        raise bad_request("'stop' sequences must not be empty", "stop", "invalid_value")
    return list(dict.fromkeys(stops))


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"'logit_bias' must be an object mapping token ids to numbers, got {_type_name(value)}",
                          "logit_bias", "invalid_type")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias",
                              "invalid_value") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"'logit_bias': token id {token} is outside the vocabulary [0, {vocab_size})",
                              "logit_bias", "invalid_value")
        out[token] = number(value, key, None, -100, 100) if not isinstance(bias, bool) else _bad_bias(key, bias)
    return out


def _bad_bias(key: str, bias: Any) -> float:
    raise bad_request(f"'logit_bias[{key}]' must be a number in [-100, 100], got {bias!r}", "logit_bias",
                      "invalid_type")


def _response_format(body: dict[str, Any]) -> ResponseFormat:
    value = body.get("response_format")
    if value is None:
        return ResponseFormat()
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request("'response_format' must be an object with a 'type'", "response_format", "invalid_type")
    kind = value["type"]
    if kind == "text":
        return ResponseFormat()
    if kind == "json_object":
        return ResponseFormat("json_object", {"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema' object",
                              "response_format.json_schema", "invalid_type")
        return ResponseFormat("json_schema", spec.get("schema", {}), spec.get("name"))
    raise bad_request(f"'response_format.type' must be one of text, json_object, json_schema; got {kind!r}",
                      "response_format.type", "invalid_value")


def gen_params(body: dict[str, Any], vocab_size: int, chat: bool) -> GenParams:
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"'{name}' (function calling) is not supported by this server", name,
                              "unsupported_parameter")
    max_tokens = integer(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                         else "max_tokens", None, 1)
    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise bad_request("'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                          "invalid_type")
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options",
                          "invalid_value")
    if chat:
        want = boolean(body, "logprobs", False)
        top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if want else None
    else:
        logprobs = integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    model = string(body, "model")
    return GenParams(
        model=model, max_tokens=max_tokens,
        temperature=number(body, "temperature", 1.0, 0, 2),  # type: ignore[arg-type]
        top_p=number(body, "top_p", None, 0, 1, lo_open=True),
        top_k=integer(body, "top_k", None, 0) or None,  # 0 or absent: off (vLLM's -1 is refused as out of range)
        min_p=number(body, "min_p", None, 0, 1),
        seed=integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1),
        stop=_stops(body), n=integer(body, "n", 1, 1, MAX_N),  # type: ignore[arg-type]
        stream=stream, include_usage=bool(options and options.get("include_usage")),
        logprobs=logprobs, logit_bias=_logit_bias(body, vocab_size),
        presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),  # type: ignore[arg-type]
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),  # type: ignore[arg-type]
        ignore_eos=boolean(body, "ignore_eos", False), response_format=_response_format(body),
    )


# --- chat -----------------------------------------------------------------------------------------------------------
def messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """`messages` with every content flattened to a string ("developer" is treated as "system")."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty array of {role, content} objects", "messages",
                          "invalid_type" if not isinstance(value, list) else "invalid_value")
    out = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{param}' must be an object, got {_type_name(m)}", param, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"'{param}.role' must be one of {', '.join(ROLES)}; got {role!r}", f"{param}.role",
                              "invalid_value")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), param)})
    return out


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"'{param}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}} "
                                  "(this server is text-only)", f"{param}.content", "invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"'{param}.content' must be a string or an array of text parts, got {_type_name(content)}",
                      f"{param}.content", "invalid_type")


# --- completions ----------------------------------------------------------------------------------------------------
def prompts(body: dict[str, Any], vocab_size: int) -> list[str | list[int]]:
    """`prompt` as a list of prompts, each a string or a list of token ids."""
    value = body.get("prompt")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [_ids(value, vocab_size, "prompt")]
        if all(isinstance(p, list) for p in value):
            return [_ids(p, vocab_size, f"prompt[{i}]") for i, p in enumerate(value)]
    raise bad_request("'prompt' must be a string, an array of strings, an array of token ids, or an array of such "
                      "arrays", "prompt", "invalid_type")


def _ids(value: list[Any], vocab_size: int, param: str) -> list[int]:
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_request(f"'{param}' must be a non-empty array of token ids", param, "invalid_type")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"'{param}': token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param,
                          "invalid_value")
    return list(value)


def completion_extras(body: dict[str, Any], n: int) -> bool:
    """`echo`, after refusing `suffix` and a `best_of` other than n."""
    if body.get("suffix"):
        raise bad_request("'suffix' (insertion) is not supported by this server", "suffix", "unsupported_parameter")
    best_of = integer(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad_request(f"'best_of' must equal 'n' ({n}) on this server, got {best_of}", "best_of",
                          "unsupported_parameter")
    return boolean(body, "echo", False)


# --- moderation, tokenize -------------------------------------------------------------------------------------------
def moderation_inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                out.append(item["text"])
            else:
                raise bad_request(f"'input[{i}]' must be a string or a text part (this server is text-only)",
                                  "input", "invalid_value")
        return out
    raise bad_request("'input' must be a string or a non-empty array of strings", "input", "invalid_type")


def token_ids(body: dict[str, Any], name: str, vocab_size: int) -> list[int]:
    value = body.get(name)
    if not isinstance(value, list):
        raise bad_request(f"'{name}' must be an array of token ids", name, "invalid_type")
    if not value:
        return []
    return _ids(value, vocab_size, name)
