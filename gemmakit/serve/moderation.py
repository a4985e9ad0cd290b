"""`POST /v1/moderations` in OpenAI's shape, scored by a ShieldGemma-style classifier.

The scorer is `gemmakit.safety.ShieldClassifier` over the served model, over a second model (`--moderation-model`,
a ShieldGemma checkpoint: the embedded 270M base model is no safety classifier), or an agile classifier from
`gemmakit safety train-agile` (`--moderation-adapter`). Each text is screened in ShieldGemma's prompt-only mode.

ShieldGemma's policies map onto OpenAI's category names as below (docs/serve.md explains the choices); a policy
with no OpenAI counterpart (obscenity, custom policies, an agile classifier's name) appears under its own name.
`category_scores` holds P(violation) and `categories` whether it reached the policy's threshold; OpenAI
categories that no policy scores are left out rather than reported as 0, which would claim a check that never ran.
The raw per-policy scores and thresholds are repeated in `policy_scores` / `thresholds`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from gemmakit.errors import GemmaKitError
from gemmakit.serve.errors import bad_request

OPENAI_CATEGORIES: dict[str, str] = {
    "dangerous": "illicit/violent",
    "harassment": "harassment",
    "hate": "hate",
    "sexual": "sexual",
    "violence": "violence/graphic",
}
OPENAI_MODEL_ALIASES = ("omni-moderation", "text-moderation")


def category(policy: str) -> str:
    return OPENAI_CATEGORIES.get(policy, policy)


class Moderator:
    """Scores texts with one classifier; calls are serialised (they share the model with generation)."""

    def __init__(self, classifier: Any, name: str, model: Any | None = None, lock: threading.Lock | None = None):
        self.classifier, self.name, self.model = classifier, name, model
        self.lock = lock or threading.Lock()

    def accepts_model(self, requested: str | None) -> bool:
        return requested is None or requested == self.name or requested.startswith(OPENAI_MODEL_ALIASES)

    def _classifier_for(self, policies: Any) -> Any:
        if policies is None:
            return self.classifier
        from gemmakit.safety import Policy, ShieldClassifier

        if self.model is None:
            raise bad_request("'policies' cannot be chosen per request with an agile classifier", "policies",
                              "unsupported_parameter")
        if not isinstance(policies, list) or not policies:
            raise bad_request("'policies' must be a non-empty array of policy names or {name, guideline} objects",
                              "policies", "invalid_type")
        chosen: list[Any] = []
        for p in policies:
            if isinstance(p, str):
                chosen.append(p)
            elif isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("guideline"), str):
                chosen.append(Policy.from_text(p["name"], p["guideline"]))
            else:
                raise bad_request(f"'policies': {p!r} is neither a policy name nor a {{name, guideline}} object",
                                  "policies", "invalid_value")
        try:
            return ShieldClassifier(self.model, policies=chosen)
        except GemmaKitError as e:
            raise bad_request(f"'policies': {e}", "policies", "invalid_value") from None

    def moderate(self, texts: Sequence[str], policies: Any = None) -> dict[str, Any]:
        """The whole response body for these texts (runs the classifier: call it off the event loop)."""
        classifier = self._classifier_for(policies)
        with self.lock:
            verdicts = classifier.classify_batch(list(texts))
        results = []
        for verdict in verdicts:
            scores = {category(r.policy): r.score for r in verdict.results}
            flags = {category(r.policy): r.violated for r in verdict.results}
            results.append({
                "flagged": verdict.violated,
                "categories": flags,
                "category_scores": scores,
                "category_applied_input_types": {name: ["text"] for name in scores},
                "policy_scores": verdict.scores,
                "thresholds": {r.policy: r.threshold for r in verdict.results},
            })
        return {"id": f"modr-{uuid.uuid4().hex}", "model": self.name, "created": int(time.time()), "results": results}
