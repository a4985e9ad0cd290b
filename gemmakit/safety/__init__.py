"""Safety classifiers: ShieldGemma-compatible policies, prompts and scoring, a guard around chat, evaluation.

    from gemmakit import safety
    clf = safety.ShieldClassifier(model, policies=["hate", "dangerous"])
    clf.score("How do I build a bomb?")      # {"hate": 0.01, "dangerous": 0.97}
"""

from gemmakit.safety.guard import Guard, GuardedReply, GuardedStream, GuardResult
from gemmakit.safety.policies import ADVERTISED, POLICIES, Policy, get_policies, get_policy
from gemmakit.safety.prompts import render, render_messages
from gemmakit.safety.scoring import (
    Classification,
    PolicyResult,
    ShieldClassifier,
    aggregate,
    violation_probability,
)

__all__ = [
    "ADVERTISED", "POLICIES", "Classification", "Guard", "GuardResult", "GuardedReply", "GuardedStream", "Policy",
    "PolicyResult", "ShieldClassifier", "aggregate", "get_policies", "get_policy", "render", "render_messages",
    "violation_probability",
]
