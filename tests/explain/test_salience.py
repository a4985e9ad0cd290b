"""Sequence salience on tiny random Gemma 1/2/3 models, checked against independent computations.

- gradients against central finite differences of our own forward (fp32: the model computes its norms and rope
  in fp32 whatever the dtype, so fp64 would not be fp64; Richardson-combined steps h = 0.05, 0.025);
- gradient L2 and gradient . input against captum's LayerGradientXActivation on transformers' model with the same
  weights (an independent forward and autograd), relative error <= 1e-4;
- integrated gradients against captum's IntegratedGradients (same rule and nodes) on our forward and against
  captum's LayerIntegratedGradients on transformers' model; completeness within 1% at the default step count.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.errors import InputError
from gemmakit.explain.salience import (
    DEFAULT_STEPS,
    float_model,
    gradient,
    ig_baseline,
    input_embeddings,
    integrated_gradients,
    make_problem,
    parse_span,
    salience,
    span_logprob,
)
from support.scope_support import one_thread, tiny_gemma
from support.tiny_models import save_hf_model, save_tiny_tokenizer

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
FAMILIES = ("gemma", "gemma2", "gemma3")
PROMPT, TARGET = "Hello there, my friend. How are you?", " I am fine."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: tiny_gemma(f, root) for f in FAMILIES}, root  # cached per session: each knows its own .source


def _problem(model, span="1:5"):
    p = make_problem(model, PROMPT, target=TARGET, span=span)
    return p, torch.tensor(p.ids), p.absolute_span


def _hf(model):
    """transformers' model from the directory our tiny model was read from (its own saved weights)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model.source, attn_implementation="eager").float().eval()


def _hf_logprob(hf, ids, span):
    """The span's log-probability from transformers' forward of `ids[:b-1]` (input_ids [N, b-1])."""
    a, b = span

    def f(input_ids):
        logits = hf(input_ids=input_ids).logits[:, a - 1: b - 1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[a:b].view(1, -1, 1).expand(len(input_ids), -1, 1)
                                                    ).squeeze(-1).sum(-1)

    return f


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_equals_central_finite_differences(models, family):
    model = models[0][family]
    _, ids, span = _problem(model)
    x, g, f = gradient(model.module, ids, span)
    assert f == pytest.approx(float(span_logprob(model.module, ids, span)), rel=1e-6)

    def at(h):
        with torch.no_grad():
            return span_logprob(model.module, ids, span, h[None]).double()[0]

    worst = 0.0
    for t in range(x.shape[0]):  # along each position's own gradient direction: the derivative is |g_t|
        v = torch.zeros_like(x)
        v[t] = g[t] / g[t].norm()
        d = [(at(x + h * v) - at(x - h * v)) / (2 * h) for h in (0.05, 0.025)]
        estimate = (4 * d[1] - d[0]) / 3
        worst = max(worst, abs(float(estimate) - float(g[t].norm())) / float(g[t].norm()))
    assert worst <= 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_l2_and_grad_dot_input_equal_captum_on_transformers(models, family):
    from captum.attr import LayerGradientXActivation

    model = models[0][family]
    problem, ids, span = _problem(model)
    hf = _hf(model)
    forward = _hf_logprob(hf, ids, span)
    inputs = ids[: span[1] - 1].view(1, -1)
    layer = hf.get_input_embeddings()
    gxa = LayerGradientXActivation(forward, layer).attribute(inputs)[0].sum(-1)
    grad = LayerGradientXActivation(forward, layer, multiply_by_inputs=False).attribute(inputs)[0].norm(dim=-1)
    for method, ref in (("grad_dot_input", gxa), ("grad_l2", grad)):
        s = salience(model, PROMPT, target=TARGET, span="1:5", method=method)
        ours = torch.tensor(s.scores[: span[1] - 2])  # <bos> is left out of the scores
        ref = ref[1:].detach()
        assert torch.allclose(ours, ref, rtol=0, atol=1e-4 * float(ref.abs().max())), method
        assert s.scores[span[1] - 2:] == [0.0] * (len(s.scores) - span[1] + 2)  # the span's last token feeds nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_integrated_gradients_complete_and_equal_captum(models, family):
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model = models[0][family]
    _, ids, span = _problem(model, None)
    pad = model.tokenizer.pad_id
    attr, info = integrated_gradients(model.module, ids, span, pad)  # the defaults
    assert info["completeness_error"] <= 0.01 and info["steps_used"] >= DEFAULT_STEPS
    assert abs(float(attr.sum()) - (info["f_input"] - info["f_baseline"])) <= 0.01 * abs(
        info["f_input"] - info["f_baseline"])
    # one interval and no refinement is captum's Gauss-Legendre rule
    attr, info = integrated_gradients(model.module, ids, span, pad, DEFAULT_STEPS, intervals=1,
                                      max_steps=DEFAULT_STEPS)
    assert info["steps_used"] == DEFAULT_STEPS

    x = input_embeddings(model.module, ids, span)
    with torch.no_grad():
        own = IntegratedGradients(lambda h: span_logprob(model.module, ids, span, h)).attribute(
            x[None], ig_baseline(model.module, x, pad)[None], method="gausslegendre", n_steps=DEFAULT_STEPS,
            internal_batch_size=16)[0].sum(-1)
    assert torch.allclose(attr, own.detach(), rtol=0, atol=1e-5 * float(own.abs().max()))

    hf = _hf(model)
    inputs = ids[: span[1] - 1].view(1, -1)
    base_ids = torch.full_like(inputs, pad)
    base_ids[0, 0] = inputs[0, 0]
    ref = LayerIntegratedGradients(_hf_logprob(hf, ids, span), hf.get_input_embeddings()).attribute(
        inputs, base_ids, method="gausslegendre", n_steps=DEFAULT_STEPS, internal_batch_size=16)[0].sum(-1)
    assert torch.allclose(attr, ref.detach(), rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_refinement_splits_the_worst_interval_until_complete(models):
    """With a rule too coarse to start with (2 intervals of 1 node), splitting brings completeness within 1%."""
    model = models[0]["gemma3"]
    _, ids, span = _problem(model, None)
    pad = model.tokenizer.pad_id
    _, coarse = integrated_gradients(model.module, ids, span, pad, steps=2, intervals=2, max_steps=2)
    _, refined = integrated_gradients(model.module, ids, span, pad, steps=2, intervals=2, max_steps=400)
    assert coarse["completeness_error"] > 0.01 >= refined["completeness_error"]
    splits = refined["intervals"] - 2
    assert splits > 0 and refined["steps_used"] == 2 + 2 * splits  # each split evaluates two new halves
    assert refined["f_input"] == pytest.approx(coarse["f_input"])


def test_quantised_model_gets_gradients_from_a_float_copy_of_its_source(tmp_path):
    directory = tmp_path / "tiny"
    save_hf_model("gemma3", directory)
    save_tiny_tokenizer(directory)
    exact = gemmakit.load(directory, dtype="float32")
    quantised = gemmakit.load(directory, quant="int8", cache=False)
    assert float_model(exact)[0] is exact
    copy, note = float_model(quantised)
    assert copy is not quantised and str(directory) in note
    assert float_model(quantised)[0] is copy  # kept for the next call
    a = salience(exact, "the king and the queen", target=" of the sea", method="grad_dot_input")
    b = salience(quantised, "the king and the queen", target=" of the sea", method="grad_dot_input")
    assert a.tokens == b.tokens and a.scores == b.scores
    assert "reloaded" in b.details["weights"] and "own" in a.details["weights"]
    assert "".join(a.tokens) == "the king and the queen of the sea"


def test_generated_target_and_span_rules(models):
    model = models[0]["gemma3"]
    generated = model.generate_ids([model.encode(PROMPT)], 6)[0]
    s = salience(model, PROMPT, generate=6, span="-2:", method="grad_l2")
    assert s.ids[s.prompt_tokens:] == generated
    assert s.span == (len(generated) - 2, len(generated))
    assert parse_span("1:3", 5) == (1, 3) and parse_span(":-1", 5) == (0, 4) and parse_span(None, 5) == (0, 5)
    for bad in ("3:1", "x:2", "5"):
        with pytest.raises(InputError):
            parse_span(bad, 5)
    with pytest.raises(InputError):
        salience(model, PROMPT, target=TARGET, method="saliency")
    with pytest.raises(InputError):
        make_problem(model, PROMPT)  # neither a target nor generate
