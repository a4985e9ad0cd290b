"""The compiled decode step equals eager decoding: same logits (fp32), same greedy tokens (quantised bf16).

The cases reach past the sliding window, with left padding and grouped kv heads, because that is where the
static masks and slots of the compiled step could go wrong. Each compilation takes 10-30 s, so few are made.
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.cache import KVCache
from gemmakit.decoding import choose_decoder, generate_tokens
from gemmakit.decoding.compiled import CompiledDecoder
from gemmakit.loader import build_model
from gemmakit.quant import quantize_model
from gemmakit.weights import hf
from support.tiny_models import VOCAB, WINDOW, save_hf_model

PROMPT = 12
STEPS = 3 * WINDOW  # the ring wraps several times


def tiny(family: str, directory) -> torch.nn.Module:
    save_hf_model(family, directory)
    return build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory).eval()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_compiled_step_equals_eager_forward_fp32(family, tmp_path):
    model = tiny(family, tmp_path)
    decoder = CompiledDecoder(model)
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = model.config.pad_id
    caches = [KVCache(model.config, 2, PROMPT + STEPS, torch.float32) for _ in range(2)]
    for cache in caches:
        cache.pad.copy_(torch.tensor([3, 0]))
    with torch.inference_mode():
        eager = model(ids, cache=caches[0], last_only=True)[:, -1]
        model(ids, cache=caches[1], last_only=True)
        worst = 0.0
        for _ in range(STEPS):
            token = eager.argmax(-1).view(-1, 1)
            eager = model(token, cache=caches[0], last_only=True)[:, -1]
            compiled = decoder.step(token, caches[1])
            worst = max(worst, (eager - compiled).abs().max().item())
    assert worst <= 1e-4
    assert caches[1].length == caches[0].length
    assert torch.equal(caches[1].ring_times, caches[0].ring_times)


def test_generate_with_compiled_decoding_keeps_the_greedy_tokens(tmp_path):
    """Quantised bf16 (the path compile is for): the compiled graph may round bf16 intermediates differently,
    so the check is the greedy continuation, which a wrong mask or slot would change within a few tokens."""
    model = quantize_model(tiny("gemma3", tmp_path), "int8")
    prompts = [[2, 17, 99, 5], [2, 8, 300, 41, 77, 12, 250]]
    eager = torch.stack(list(generate_tokens(model, prompts, STEPS)))
    decoder = choose_decoder(model, compile=True).decoder
    assert isinstance(decoder, CompiledDecoder)
    compiled = torch.stack(list(generate_tokens(model, prompts, STEPS, decoder=decoder)))
    assert (eager == compiled).float().mean().item() >= 0.95


def test_hooks_send_compiled_decoding_back_to_the_eager_path(tmp_path):
    """The graph would not see hooks added after it was compiled; global hooks count too."""
    model = tiny("gemma3", tmp_path)
    decoder = CompiledDecoder(model)  # nothing is compiled until a step runs
    cache = KVCache(model.config, 1, 8, torch.float32)
    assert decoder.usable(cache)
    handle = model.model.layers[0].self_attn.attn_out.register_forward_hook(lambda *a: None)
    assert not decoder.usable(cache)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not decoder.usable(cache)
    finally:
        handle.remove()
    assert decoder.usable(cache)
