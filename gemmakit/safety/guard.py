"""A guard around chat: screen the user's message before generating and the answer after (or in chunks while
streaming), then block with a message or annotate and pass.

Any classifier with `classify(prompt, response=None) -> Classification` works (ShieldGemma, an agile classifier).
When blocking a stream, text is held back until the chunk containing it has been screened, so nothing the guard
would block reaches the user; annotating streams at once and screens alongside.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gemmakit.errors import InputError
from gemmakit.safety.scoring import Classification, PolicyResult, ShieldClassifier

DEFAULT_MESSAGE = "I can't help with that: the {stage} was flagged by the {policy} policy."
ACTIONS = ("block", "annotate")


class Classifier(Protocol):
    def classify(self, prompt: str, response: str | None = None) -> Classification: ...


@dataclass(frozen=True)
class GuardResult:
    """One screening: which stage, all policies' verdicts, and whether the guard blocked because of it."""

    stage: str  # "prompt", "response", or "chunk" (a streamed answer so far)
    classification: Classification
    blocked: bool
    message: str | None = None

    @property
    def flagged(self) -> list[PolicyResult]:
        return self.classification.flagged

    @property
    def top(self) -> PolicyResult:
        """The policy that decided: the highest-scoring flagged one, else the highest-scoring one."""
        flagged = self.flagged
        return max(flagged, key=lambda r: r.score) if flagged else self.classification.top

    @property
    def policy(self) -> str:
        return self.top.policy

    @property
    def score(self) -> float:
        return self.top.score

    @property
    def threshold(self) -> float:
        return self.top.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "blocked": self.blocked, "policy": self.policy, "score": self.score,
                "threshold": self.threshold, "message": self.message, **self.classification.to_dict()}


@dataclass
class GuardedReply:
    """The text the user gets (the answer, or the block message) and every screening on the way."""

    text: str
    results: list[GuardResult] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return any(r.blocked for r in self.results)

    @property
    def flagged(self) -> bool:
        return any(r.flagged for r in self.results)


class GuardedStream:
    """Iterate for text pieces; `.reply` (text and results) is complete once the iteration ends."""

    def __init__(self, pieces: Iterator[str], reply: GuardedReply) -> None:
        self._pieces, self.reply = pieces, reply

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def results(self) -> list[GuardResult]:
        return self.reply.results

    @property
    def blocked(self) -> bool:
        return self.reply.blocked


class Guard:
    """Wrap a chat model (`chat_stream(messages, max_new_tokens, **sampling)`) with a safety classifier.

    `action` is "block" (replace the answer by `message`, formatted with `{stage}`, `{policy}` and `{score}`)
    or "annotate" (pass everything and record the verdicts). `chunk_chars` sets how often a streamed answer is
    re-screened; 0 screens only the finished answer.
    """

    def __init__(self, model: Any, classifier: Classifier | None = None, action: str = "block",
                 message: str = DEFAULT_MESSAGE, check_prompt: bool = True, check_response: bool = True,
                 chunk_chars: int = 200, **classifier_options: Any) -> None:
        if action not in ACTIONS:
            raise InputError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
        if chunk_chars < 0:
            raise InputError(f"chunk_chars must be >= 0, got {chunk_chars}")
        if classifier is not None and classifier_options:
            raise InputError(f"give either a classifier or its options ({', '.join(classifier_options)}), not both")
        self.model = model
        self.classifier = classifier if classifier is not None else ShieldClassifier(model, **classifier_options)
        self.action, self.message, self.chunk_chars = action, message, chunk_chars
        self.check_prompt, self.check_response = check_prompt, check_response

    def _result(self, stage: str, classification: Classification) -> GuardResult:
        blocked = self.action == "block" and classification.violated
        result = GuardResult(stage, classification, blocked)
        if blocked:
            top = result.top
            text = self.message.format(stage="answer" if stage != "prompt" else "request", policy=top.policy,
                                       score=top.score)
            result = GuardResult(stage, classification, True, text)
        return result

    def screen_prompt(self, prompt: str) -> GuardResult:
        return self._result("prompt", self.classifier.classify(prompt))

    def screen_response(self, prompt: str, response: str, stage: str = "response") -> GuardResult:
        return self._result(stage, self.classifier.classify(prompt, response))

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, **sampling: Any) -> GuardedReply:
        """The whole guarded exchange: the answer, or the block message when a screening blocked it."""
        stream = self.chat_stream(messages, max_new_tokens, **sampling)
        for _ in stream:
            pass
        return stream.reply

    def chat_stream(self, messages: list[dict[str, str]], max_new_tokens: int = 256, **sampling: Any) -> GuardedStream:
        if not messages or messages[-1].get("role") != "user":
            raise InputError("messages: the last message must be the user's (role 'user')")
        reply = GuardedReply("")
        return GuardedStream(self._run(messages, max_new_tokens, sampling, reply), reply)

    def _run(self, messages: list[dict[str, str]], max_new_tokens: int, sampling: dict[str, Any],
             reply: GuardedReply) -> Iterator[str]:
        prompt = messages[-1]["content"]
        if self.check_prompt:
            result = self.screen_prompt(prompt)
            reply.results.append(result)
            if result.blocked:
                reply.text = result.message or ""
                yield reply.text
                return
        hold = self.action == "block" and self.check_response
        answer, pending, screened_at = "", "", 0
        for piece in self.model.chat_stream(messages, max_new_tokens, **sampling):
            answer += piece
            if hold:
                pending += piece
            else:
                yield piece
            if self.check_response and self.chunk_chars and len(answer) - screened_at >= self.chunk_chars:
                screened_at = len(answer)
                result = self.screen_response(prompt, answer, stage="chunk")
                reply.results.append(result)
                if result.blocked:
                    reply.text = result.message or ""
                    yield reply.text
                    return
                if hold:
                    yield pending
                    pending = ""
        if self.check_response and (screened_at < len(answer) or not answer):
            result = self.screen_response(prompt, answer)
            reply.results.append(result)
            if result.blocked:
                reply.text = result.message or ""
                yield reply.text
                return
        if pending:
            yield pending
        reply.text = answer
