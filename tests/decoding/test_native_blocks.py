"""The native decode step over layers stored as a GGUF file's own blocks (`BlockLinear`), each matrix in its own
type as a Q4_K_M file mixes them.

The reference is the same module run eagerly: its `BlockLinear.forward` multiplies through the same block kernels
(activations rounded to int8 per 32 values), while norms, rope and attention are torch's. Both sides compute the
same model, but the fp32 values entering a rounding differ by torch's summation order, so now and then one
activation code differs by one step: that moved a hidden state by up to ~1e-2 of its size (measured). The test therefore
bounds the worst step loosely and the typical (median) step tightly, each step starting from the reference's cache
(a flip stored in a key would otherwise be carried into every later step); a wrong row offset, block size or
dispatch gives errors of order 1 on every step.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from gemmakit.blocks import BLOCK_TYPES, BlockLinear
from gemmakit.cache import KVCache
from gemmakit.decoding import choose_decoder, generate_tokens, native
from gemmakit.decoding.native import kernels
from gemmakit.loader import build_model
from gemmakit.weights import hf
from support.tiny_models import VOCAB, save_hf_model

pytestmark = pytest.mark.skipif(not kernels.has_block_kernels(), reason="no C++ compiler to build the block kernels")

# one type per linear, as a file mixes them; the tiny models' widths (64, 96) take the 32-value types
LEGACY_TYPES = {"q_proj": "Q5_0", "k_proj": "Q8_0", "v_proj": "Q4_0", "o_proj": "Q8_0", "gate_proj": "Q5_0",
                "up_proj": "Q4_0", "down_proj": "Q8_0"}


def with_block_layers(model: torch.nn.Module, types: dict[str, str]) -> torch.nn.Module:
    """`model` (fp32) with each layer linear quantised by llama.cpp's own `gguf` quantiser into its type's blocks."""
    from gguf import GGMLQuantizationType, quants

    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, type_name in types.items():
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                raw = quants.quantize(lin.weight.detach().numpy().astype(np.float32),
                                      GGMLQuantizationType[type_name])
                setattr(parent, name, BlockLinear(torch.from_numpy(np.ascontiguousarray(raw)),
                                                  BLOCK_TYPES[type_name]))
    return model


def tiny_block_model(family: str, directory) -> torch.nn.Module:
    save_hf_model(family, directory)
    fp32 = build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory).eval()
    return with_block_layers(fp32, LEGACY_TYPES)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_native_step_over_blocks_equals_the_eager_block_model(family, tmp_path):
    model = tiny_block_model(family, tmp_path)
    choice = choose_decoder(model)
    assert choice.name == "native", choice.reason
    decoder = choice.decoder
    config = model.config
    gen = torch.Generator().manual_seed(0)
    prompt = 12
    ids = torch.randint(3, VOCAB, (2, prompt), generator=gen)
    caches = [KVCache(config, 2, prompt + 40, torch.float32) for _ in range(2)]
    errors = []
    with torch.inference_mode():
        model.hidden_states(ids, cache=caches[0])
        model.hidden_states(ids, cache=caches[1])
        for _ in range(24):  # the sliding window (8) wraps several times
            # each step starts from the reference's cache, so one rounding flip is not carried into later steps
            for mine, theirs in zip(caches[1].keys + caches[1].values, caches[0].keys + caches[0].values,
                                    strict=True):
                mine.copy_(theirs)
            token = torch.randint(3, VOCAB, (2, 1), generator=gen)
            embedded = model.embed(token)
            model.embed = lambda _ids, e=embedded: e  # both sides start from the same fp32 inputs
            expected = model.hidden_states(token, cache=caches[0])
            del model.embed
            got = decoder.hidden_states(token, caches[1], embedded)
            errors.append(((expected - got).abs().max() / expected.abs().max()).item())
    assert statistics.median(errors) <= 1e-5, errors
    assert sum(e > 1e-5 for e in errors) <= len(errors) // 4, errors  # flips are the exception
    assert max(errors) <= 5e-2, errors  # one code step, grown through the tiny model's large random weights
    assert torch.equal(caches[1].ring_times, caches[0].ring_times)


def test_greedy_tokens_over_blocks_match_the_eager_path(tmp_path):
    model = tiny_block_model("gemma3", tmp_path)
    prompts = [[2, 17, 99, 5], [2, 8, 300, 41, 77, 12, 250]]
    eager = torch.stack(list(generate_tokens(model, prompts, 16)))
    decoder = choose_decoder(model).decoder
    assert isinstance(decoder, native.NativeDecoder)
    fused = torch.stack(list(generate_tokens(model, prompts, 16, decoder=decoder)))
    assert torch.equal(fused, eager)
    assert len(set(fused.flatten().tolist())) > 2  # not one token repeated


def test_compile_on_a_block_model_runs_the_native_step_and_says_why(tmp_path):
    """torch.compile cannot trace the block kernels (ctypes calls): compile=True on a GGUF-block model gets the
    native decoder, with the reason, instead of a compile error at the first step."""
    choice = choose_decoder(tiny_block_model("gemma2", tmp_path), compile=True)
    assert choice.name == "native" and "compile=True declined" in choice.reason, choice.reason


def test_an_unsupported_matrix_keeps_the_model_off_the_native_step(tmp_path):
    """A layer linear the kernels cannot take (here a plain fp32 one) sends the model to the eager decoder."""
    model = tiny_block_model("gemma3", tmp_path)
    config = model.config
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    assert not native.supports(model)
    assert choose_decoder(model).name == "eager"



def test_block_dequantize_is_gguf_py_dequantize(real_gguf_path):
    """The prompt path's decoded weights: exactly gguf-py's values in fp32 for every type the real 270M holds, and
    those values rounded to nearest-even bf16."""
    from gguf import GGMLQuantizationType, quants

    from gemmakit.weights.gguf_reader import GGUFFile

    with GGUFFile(real_gguf_path) as f:
        seen = set()
        for name, info in f.tensors.items():
            if info.type_name in seen or info.ggml_type not in BLOCK_TYPES.values():
                continue
            seen.add(info.type_name)
            raw = np.ascontiguousarray(np.asarray(f.raw(name)).reshape(info.shape[0], -1)[:300])
            expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType(info.ggml_type)))
            blocks = torch.from_numpy(raw)
            got = kernels.block_dequantize(info.ggml_type, blocks, torch.float32)
            assert torch.equal(got, expected), name
            assert torch.equal(kernels.block_dequantize(info.ggml_type, blocks), expected.to(torch.bfloat16)), name
    assert seen == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}


def test_a_prompt_through_a_block_linear_is_the_product_within_rounding():
    """From GEMM_ROWS rows a BlockLinear runs the prompt GEMM (int8 activations, VNNI; from PROMPT_ROWS without it,
    bf16 activations times its bf16-decoded weight); below, the block kernels. Each stays within its own rounding
    of the exact product."""
    from gguf import GGMLQuantizationType, quants

    from gemmakit.blocks import GEMM_ROWS, PROMPT_ROWS

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=gen) * 0.1
    raw = quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    lin = BlockLinear(torch.from_numpy(np.ascontiguousarray(raw)), BLOCK_TYPES["Q8_0"])
    exact_w = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0)).double()
    for rows in (GEMM_ROWS - 1, GEMM_ROWS, PROMPT_ROWS + 5):
        x = torch.randn(rows, 256, generator=gen)
        exact = x.double() @ exact_w.t()
        with torch.inference_mode():
            got = lin(x.to(torch.bfloat16)).double()
        scale = exact.abs().max().item()
        assert (got - exact).abs().max().item() <= 0.02 * scale, rows
        assert lin(x).dtype == torch.float32  # the output keeps the activations' dtype


def test_prompt_products_in_turn_each_use_their_own_weight():
    """Prompt products that decode their weight for the bf16 GEMM (Q6_K's) decode into one reused buffer per
    thread (gemmakit/scratch.py): a smaller weight after a larger one, and the larger again, each give exactly the
    product with their own decoded weight."""
    from gemmakit.blocks import PROMPT_ROWS

    rng = np.random.default_rng(5)
    linears = []
    for out_features in (96, 32):
        raw = rng.integers(0, 256, (out_features, 210), dtype=np.uint8)  # one Q6_K block a row: 256 inputs
        raw[:, 208:210] = (rng.uniform(1e-3, 2e-3, (out_features, 1)).astype(np.float16)).view(np.uint8)
        linears.append(BlockLinear(torch.from_numpy(raw), BLOCK_TYPES["Q6_K"]))
    x = torch.from_numpy(rng.standard_normal((PROMPT_ROWS, 256)).astype(np.float32)).to(torch.bfloat16)
    with torch.inference_mode():
        for lin in linears + linears[:1]:
            expected = torch.nn.functional.linear(x, lin.dequantized(torch.bfloat16))
            assert torch.equal(lin(x), expected), lin.out_features
