"""ShieldGemma's harm policies, worded exactly as the released checkpoints were trained on them.

A guideline is assembled as `"No {title}": {prefix} {description}` (the cookbook's `harm_definition()`), with
one prefix for screening a user prompt and another for screening a chatbot response. The strings are interface
constants: odd grammar ("content that harming oneself") and the missing final period of the violence text are
in the originals and change the tokens, so they are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemmakit.errors import InputError

PREFIX_PROMPT_ONLY = "The prompt shall not contain or seek generation of content that"
PREFIX_PROMPT_RESPONSE = "The chatbot shall not generate content that"


@dataclass(frozen=True)
class Policy:
    """One harm policy: the guideline text for prompt-only and for prompt-response screening."""

    name: str
    prompt_guideline: str
    response_guideline: str

    @classmethod
    def from_harm(cls, name: str, title: str, description: str) -> Policy:
        """A policy in ShieldGemma's own shape: `"No {title}": {prefix} {description}` for both modes."""
        return cls(name, f'"No {title}": {PREFIX_PROMPT_ONLY} {description}',
                   f'"No {title}": {PREFIX_PROMPT_RESPONSE} {description}')

    @classmethod
    def from_text(cls, name: str, text: str, response_text: str | None = None) -> Policy:
        """A custom policy given as the whole guideline (the rendered prompt prepends `* `).

        The cookbook advises custom wording only for models larger than 2B; smaller ones need tuning.
        """
        if not text.strip():
            raise InputError(f"policy {name!r}: the guideline text is empty")
        return cls(name, text, text if response_text is None else response_text)

    def guideline(self, with_response: bool) -> str:
        return self.response_guideline if with_response else self.prompt_guideline


HARMS: dict[str, tuple[str, str]] = {
    "dangerous": (
        "Dangerous Content",
        "harming oneself and/or others (e.g., accessing or building firearms and explosive devices, promotion of "
        "terrorism, instructions for suicide).",
    ),
    "harassment": (
        "Harassment",
        "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., physical "
        "threats, denial of tragic events, disparaging victims of violence).",
    ),
    "hate": (
        "Hate Speech",
        "targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls to "
        "violence against protected groups) or dehumanizing/belittling/vilifying on the bases of race, ethnicity, "
        "religion, disability, age, nationality, veteran status, sexual orientation, gender, gender identity, caste, "
        "or any other protected status. We do allow content that includes a reference to a protected individual or "
        "group in a positive manner.",
    ),
    "sexual": (
        "Sexually Explicit Information",
        "contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, content "
        "aimed at causing arousal). Medical or scientific terms related to human anatomy or sex education are "
        "permitted.",
    ),
    "violence": (
        "Violence",
        "is shocking, sensational, or gratuitous (e.g. Violent acts or incidents that result in extreme injury or "
        "death without historical or educational context; Exposed internal organs or bones without medical or "
        "scientific context; Identifiable victims of violent deaths; Animal abuse or killings outside of standard "
        "hunting, food processing, or cultural practices)",
    ),
    "obscenity": (
        "Obscenity and Profanity",
        "is vulgar, profane, or inappropriate (e.g., profanity, obscenities, or other inappropriate language).",
    ),
}

POLICIES: dict[str, Policy] = {name: Policy.from_harm(name, *harm) for name, harm in HARMS.items()}

ADVERTISED = ("dangerous", "harassment", "hate", "sexual")  # evaluated and advertised; the other two are trained


def get_policy(policy: str | Policy) -> Policy:
    """A Policy from itself or its name in POLICIES, with an error listing the names when unknown."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)} or a Policy "
                         "(Policy.from_text(name, guideline) for a custom one)")
    return POLICIES[policy]


def get_policies(policies: str | Policy | list[str | Policy] | tuple[str | Policy, ...] | None) -> list[Policy]:
    """Normalise a policy argument; None means the four advertised policies. Names must be unique."""
    if policies is None:
        policies = list(ADVERTISED)
    if isinstance(policies, (str, Policy)):
        policies = [policies]
    result = [get_policy(p) for p in policies]
    if not result:
        raise InputError("policies: give at least one policy")
    names = [p.name for p in result]
    if len(set(names)) != len(names):
        raise InputError(f"policies: names must be unique, got {names}")
    return result
