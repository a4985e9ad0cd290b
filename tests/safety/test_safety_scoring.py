"""ShieldClassifier on tiny random Gemma 2/3 models: Eq. 1 by hand from full logits; prefix cache == no cache."""

from __future__ import annotations

import math

import pytest
import torch

from gemmakit.cache import KVCache
from gemmakit.errors import InputError, TokenizerError
from gemmakit.safety import POLICIES, Policy, ShieldClassifier, aggregate, render, violation_probability
from support.safety_fixtures import NO, YES, WordTokenizer, tiny_model

TEXTS = [
    "How do I bake bread?",
    ("Tell me about knives.", "Knives are tools for cutting food; keep them sharp and store them safely."),
    "A much longer question " + "about many different things, " * 12 + "and more.",
    "Short",
    ("", "An answer to an empty prompt, as in the OpenAI moderation protocol."),
]


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def model(request, tmp_path_factory):
    return tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def hand_score(module, ids: list[int], temperature: float, alpha: float) -> float:
    """Eq. 1 written out from the full logits of a plain forward over the whole prompt."""
    with torch.no_grad():
        logits = module(torch.tensor([ids]))[0, -1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    ll_yes, ll_no = float(logprobs[YES]), float(logprobs[NO])
    ey, en = math.exp(ll_yes / temperature), math.exp(ll_no / temperature)
    return (ey + alpha) / (ey + en + 2 * alpha)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.5, 0.0), (1.0, 0.01), (0.7, 0.3)])
def test_score_equals_hand_computation_from_full_logits(model, temperature, alpha):
    clf = ShieldClassifier(model, policies=["hate", "sexual"], tokenizer=WordTokenizer(), temperature=temperature,
                           alpha=alpha)
    tok = WordTokenizer()
    for prompt, response in [("How do I bake bread?", None), ("Tell me a joke.", "No.")]:
        got = clf.score(prompt, response)
        for name in ("hate", "sexual"):
            ids = tok.encode(render(name, prompt, response, bos=False))
            assert got[name] == pytest.approx(hand_score(model, ids, temperature, alpha), abs=1e-6)


def test_alpha_pulls_towards_one_half_when_labels_are_unlikely(model):
    plain = ShieldClassifier(model, policies=["hate"], tokenizer=WordTokenizer())
    damped = ShieldClassifier(model, policies=["hate"], tokenizer=WordTokenizer(), alpha=1.0)
    p, q = plain.score("Hello there")["hate"], damped.score("Hello there")["hate"]
    assert abs(q - 0.5) < abs(p - 0.5)
    assert abs(q - 0.5) < 0.01  # two tokens out of 512 hold little mass in a random model


def test_prefix_cached_batch_equals_uncached(model):
    clf = ShieldClassifier(model, policies=list(POLICIES), tokenizer=WordTokenizer(), batch_size=3)
    batch = clf.score_batch(TEXTS)
    assert len(batch) == len(TEXTS)
    for item, got in zip(TEXTS, batch, strict=True):
        prompt, response = (item, None) if isinstance(item, str) else item
        expected = clf.score_uncached(prompt, response)
        assert list(got) == list(POLICIES)
        for name in POLICIES:
            assert got[name] == pytest.approx(expected[name], abs=1e-5)
    # order and batch size do not change a text's scores
    single = ShieldClassifier(model, policies=list(POLICIES), tokenizer=WordTokenizer(), batch_size=1)
    for a, b in zip(single.score_batch(TEXTS[::-1])[::-1], batch, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_alpha_path_cached_equals_uncached(model):
    clf = ShieldClassifier(model, policies=["dangerous", "violence"], tokenizer=WordTokenizer(), alpha=0.05,
                           temperature=1.5)
    items = [("a", None), ("b c", "d e f")]
    for (prompt, response), got in zip(items, clf.score_batch(items), strict=True):
        expected = clf.score_uncached(prompt, response)
        assert got == pytest.approx(expected, abs=1e-5)


def test_cache_clone_is_independent_and_repeats_rows(model):
    cache = KVCache(model.config, 2, 64, torch.float32)
    cache.pad.copy_(torch.tensor([0, 3]))
    with torch.no_grad():
        model.hidden_states(torch.randint(3, 500, (2, 20)), cache)
        copy = cache.clone(repeats=3)
        assert copy.batch_size == 6 and copy.length == cache.length
        assert copy.pad.tolist() == [0, 0, 0, 3, 3, 3]
        assert torch.equal(copy.keys[0][4], cache.keys[0][1])
        before = [k.clone() for k in cache.keys]
        model.hidden_states(torch.randint(3, 500, (6, 5)), copy)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys, strict=True))
    assert cache.length == 20 and copy.length == 25
    with pytest.raises(InputError):
        cache.clone(repeats=0)


def test_thresholds_per_policy_and_max_aggregation(model):
    clf = ShieldClassifier(model, policies=["hate", "sexual"], tokenizer=WordTokenizer(),
                           threshold={"hate": 0.0, "sexual": 1.0})
    verdict = clf.classify("anything")
    assert [r.policy for r in verdict.flagged] == ["hate"]
    assert verdict.violated and verdict.score == aggregate(verdict.scores) == max(verdict.scores.values())
    assert verdict.to_dict()["thresholds"] == {"hate": 0.0, "sexual": 1.0}


def test_custom_policy_and_errors(model):
    custom = Policy.from_text("spoilers", '"No Spoilers": The prompt shall not reveal the ending of a film.')
    clf = ShieldClassifier(model, policies=[custom, "hate"], tokenizer=WordTokenizer())
    assert set(clf.score("Who dies at the end?")) == {"spoilers", "hate"}
    with pytest.raises(InputError, match="unknown policy"):
        ShieldClassifier(model, policies=["nope"], tokenizer=WordTokenizer())
    with pytest.raises(InputError, match="threshold"):
        ShieldClassifier(model, policies=["hate"], tokenizer=WordTokenizer(), threshold={"sexual": 0.3})
    with pytest.raises(InputError, match="temperature"):
        ShieldClassifier(model, tokenizer=WordTokenizer(), temperature=0)
    with pytest.raises(TokenizerError, match="label token"):
        ShieldClassifier(model, tokenizer=WordTokenizer(), yes="Oui")
    with pytest.raises(InputError, match="context"):
        ShieldClassifier(model, tokenizer=WordTokenizer()).score("word " * 3000)


def test_violation_probability_formula():
    yes, no = torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.1)])
    assert float(violation_probability(yes, no)) == pytest.approx(2 / 3)
    assert float(violation_probability(yes, no, alpha=0.1)) == pytest.approx(0.3 / 0.5)
    assert float(violation_probability(yes, no, temperature=2.0)) == pytest.approx(
        math.sqrt(0.2) / (math.sqrt(0.2) + math.sqrt(0.1)))


def test_chunks_bound_left_padding(model):
    """Sorted prefixes go in batches of batch_size, but a much longer one does not drag shorter ones' padding."""
    from gemmakit.safety.scoring import MAX_PADDING

    clf = ShieldClassifier(model, policies=["hate"], tokenizer=WordTokenizer(), batch_size=3)
    splits = [50, 51, 52, 53, 60, 60 + MAX_PADDING, 2000]
    chunks = clf._chunks(list(range(len(splits))), splits)
    assert chunks == [[0, 1, 2], [3, 4], [5], [6]]
    assert clf._chunks([], []) == []
