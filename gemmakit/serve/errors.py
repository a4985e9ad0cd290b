"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status that goes with it.

Every failure a client can cause becomes an `APIError` before it reaches the framework, so a bad request never turns
into a 500 and a message never carries anything but the client's own argument names and values.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error returned to the client as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",  # noqa: A002 - OpenAI's name
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'.",
                    "invalid_request_error", None, "invalid_api_key")


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"The model {name!r} does not exist; this server serves {served!r}.",
                    "invalid_request_error", "model", "model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds the limit of {limit} bytes.", "invalid_request_error", None,
                    "request_too_large")


def queue_full(limit: int) -> APIError:
    return APIError(429, f"The server is busy: {limit} requests are already waiting. Retry shortly.",
                    "rate_limit_error", None, "queue_full", headers={"Retry-After": "1"})


def not_ready() -> APIError:
    return APIError(503, "The model is still loading.", "server_error", None, "model_loading",
                    headers={"Retry-After": "2"})
