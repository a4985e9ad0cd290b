"""The native decode step computes the fp32 model whose weights are the dequantised int8 ones.

Reference: a plain fp32 `Transformer` holding w = q * scale for every linear, run by the eager forward. Both
get the same embedded inputs (the embedding lookup stays in Python and is not what is tested). The cases go
past the sliding window with left padding, grouped kv heads and Gemma 2's attention soft-cap, where a wrong
slot, mask or cap would show within a few steps.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from gemmakit.cache import KVCache
from gemmakit.decoding import choose_decoder, generate_tokens, native
from gemmakit.decoding.native import kernels
from gemmakit.decoding.native.decoder import _head
from gemmakit.loader import build_model
from gemmakit.quant import Int4Linear, Int8Linear, quantize_model
from gemmakit.ranker import Int3Ranker
from gemmakit.weights import hf
from support.tiny_models import VOCAB, WINDOW, save_hf_model

PROMPT = 12
STEPS = 3 * WINDOW  # the ring wraps several times

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler to build the native step")


def native_decoder(model: torch.nn.Module) -> native.NativeDecoder:
    """The decoder `choose_decoder` picks for an int8 model: the native one."""
    decoder = choose_decoder(model).decoder
    assert isinstance(decoder, native.NativeDecoder)
    return decoder


def tiny(family: str, directory, **overrides) -> torch.nn.Module:
    save_hf_model(family, directory, **overrides)
    return build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory).eval()


def dequantized_reference(quantized: torch.nn.Module, fp32: torch.nn.Module) -> torch.nn.Module:
    """`fp32` with every linear replaced by the dequantised int8 weight of the same linear in `quantized`."""
    fp32_modules = dict(fp32.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Int8Linear) and name in fp32_modules:  # the layers (the head is not tested)
            w = module.weight_int8.float() * module.scales.float()[:, None]
            fp32_modules[name].weight.data = w
    return fp32


# head shapes for the attention's register kernels (head_dim a multiple of 64; query heads per kv head in fours,
# then the rest): 1, 2, 3, 4 and 4 + 4 query heads a kv head
WIDE_HEADS = [dict(head_dim=64, num_attention_heads=h, num_key_value_heads=kv, query_pre_attn_scalar=64,
                   hidden_size=96 if h == 6 else 64)  # (Gemma 3's config wants hidden_size a multiple of heads)
              for h, kv in ((2, 2), (4, 2), (6, 2), (4, 1), (8, 1))]


@pytest.mark.parametrize(("family", "prompt", "pad", "heads"), [
    ("gemma", PROMPT, 3, {}), ("gemma2", PROMPT, 3, {}), ("gemma3", PROMPT, 3, {}), ("gemma3", 100, 40, {}),
    *[("gemma2" if i % 2 else "gemma3", 70, 5, shape) for i, shape in enumerate(WIDE_HEADS)]])
def test_native_step_equals_fp32_dequantized_model(family, prompt, pad, heads, tmp_path):
    """The fourth case attends over 100+ keys in global layers: several key chunks, the first of them all
    padding for row 0 (a chunk with no visible key), merged exactly. The `WIDE_HEADS` cases take the register
    kernels of a head_dim that is a multiple of 64 (the others the plain loops)."""
    model = quantize_model(tiny(family, tmp_path, **heads), "int8")
    reference = dequantized_reference(model, build_model(hf.read_config(tmp_path), hf.read_state_dict(tmp_path),
                                                         torch.float32, tmp_path).eval())
    assert native.supports(model)
    decoder = native.NativeDecoder(model, native.library())
    config = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, prompt), generator=gen)
    ids[0, :pad] = config.pad_id
    caches = [KVCache(config, 2, prompt + STEPS + 1, torch.float32) for _ in range(2)]
    for cache in caches:
        cache.pad.copy_(torch.tensor([pad, 0]))
    worst_h = worst_k = 0.0
    with torch.inference_mode():
        reference.hidden_states(ids, cache=caches[0])
        reference.hidden_states(ids, cache=caches[1])
        for _ in range(STEPS):
            token = torch.randint(3, VOCAB, (2, 1), generator=gen)
            embedded = reference.embed(token)
            reference.embed = lambda _ids, e=embedded: e  # both sides start from the same fp32 inputs
            expected = reference.hidden_states(token, cache=caches[0])
            del reference.embed
            got = decoder.hidden_states(token, caches[1], embedded)
            worst_h = max(worst_h, ((expected - got).abs().max() / expected.abs().max()).item())
            stored = zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True)
            worst_k = max(worst_k, max((a - b).abs().max().item() for a, b in stored))
    assert worst_h <= 1e-5, worst_h
    assert worst_k <= 1e-4, worst_k
    assert caches[1].length == caches[0].length
    assert torch.equal(caches[1].ring_times, caches[0].ring_times)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_prompt_chunks_in_one_native_step_equal_token_by_token_steps(family, tmp_path):
    """A short prompt chunk runs as entries of one native step (each token at its own time, rows left-padded):
    the residuals at its last position and every key, value and ring record it writes are bit for bit those of
    feeding the same tokens one step at a time, for a first chunk and for one after earlier tokens."""
    model = quantize_model(tiny(family, tmp_path), "int8")
    decoder = native_decoder(model)
    config = model.config
    ids = torch.randint(3, VOCAB, (2, WINDOW), generator=torch.Generator().manual_seed(3))
    ids[0, :3] = config.pad_id
    caches = [KVCache(config, 2, 4 * PROMPT, torch.float32) for _ in range(2)]
    for cache in caches:
        cache.pad.copy_(torch.tensor([3, 0]))
    cut = 3  # the chunks end within the sliding window's ring (else the chunk takes the module's forward)
    assert 2 * WINDOW <= native.decoder.PROMPT_ENTRIES
    with torch.inference_mode():
        chunked = [decoder.prefill(ids[:, :cut], caches[0]), decoder.prefill(ids[:, cut:], caches[0])]
        stepped = [decoder.advance(ids[:, t], caches[1]) for t in range(WINDOW)]
    assert torch.equal(chunked[0], stepped[cut - 1]) and torch.equal(chunked[1], stepped[-1])
    assert caches[0].length == caches[1].length == WINDOW
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(caches[0].ring_times, caches[1].ring_times)


def test_generation_uses_native_step_and_keeps_greedy_tokens(tmp_path):
    """Through `generate_tokens`: the native step's fp32 activations agree with the eager bf16 path's greedy
    tokens up to the rare near-tie (a wrong mask or slot would change them within a few tokens)."""
    model = quantize_model(tiny("gemma3", tmp_path), "int8")
    prompts = [[2, 17, 99, 5], [2, 8, 300, 41, 77, 12, 250]]
    eager = torch.stack(list(generate_tokens(model, prompts, STEPS)))
    decoder = native_decoder(model)
    calls = []
    step = decoder.greedy_step
    decoder.greedy_step = lambda *a: calls.append(1) or step(*a)
    fast = torch.stack(list(generate_tokens(model, prompts, STEPS, decoder=decoder)))
    assert len(calls) == STEPS - 1
    assert (eager == fast).float().mean().item() >= 0.95


@pytest.mark.skipif(not native.library().gk_has_int4_matvec(), reason="the native head needs AVX512-VNNI")
def test_gemma2_fused_greedy_keeps_the_eager_paths_tokens(tmp_path):
    """Gemma 2 (attention and final soft-caps) through the one-call greedy step against the eager module's own
    greedy decoding. The eager path rounds activations to bf16 and this tiny model caps logits at 3, so near-ties
    are common: the tokens must be equal up to the first step where the eager logits' best two lie within bf16
    resolution (0.05 at |logit| < 4), and there the fused step must have chosen one of the tied tokens."""
    model = quantize_model(wide_vocab("gemma2", tmp_path), "int8-rescore")
    prompts = [[2, 17, 99, 5], [2, 8, 300, 41, 77, 12, 250]]
    eager = torch.stack(list(generate_tokens(model, prompts, STEPS)))
    decoder = native_decoder(model)
    assert decoder.greedy_reads_ranker
    fused = torch.stack(list(generate_tokens(model, prompts, STEPS, decoder=decoder)))
    assert len(set(fused.flatten().tolist())) > 3
    for row, prompt in enumerate(prompts):
        differ = (eager[:, row] != fused[:, row]).nonzero()
        if len(differ) == 0:
            continue
        step = int(differ[0])
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + eager[:step, row].tolist()]))[0, -1].float()
        assert logits[fused[step, row]] >= logits.max() - 0.05, (row, step)


def wide_vocab(family: str, directory, vocab: int = 8192) -> torch.nn.Module:
    """A tiny model whose vocabulary is wide enough for int8-rescore's native head (128 candidate blocks of 64)."""
    import dataclasses

    save_hf_model(family, directory)
    config = dataclasses.replace(hf.read_config(directory), vocab_size=vocab)
    weights = hf.read_state_dict(directory)
    weights["model.embed_tokens.weight"] = torch.randn(vocab, config.hidden_size,
                                                       generator=torch.Generator().manual_seed(3)) * 0.15
    return build_model(config, weights, torch.float32, directory).eval()


@pytest.mark.skipif(not native.library().gk_has_int4_matvec(), reason="the native head needs AVX512-VNNI")
def test_fused_greedy_step_chooses_what_step_and_argmax_choose(tmp_path):
    """Greedy generation takes the one-call path (layers, candidates from the 3-bit ranker, the best of them by
    exact int8 logit; the prompt's token from the same head) and yields exactly the tokens of the separate
    native step (int4 candidates) and argmax:
    the exact maximum is among the ranker's 128 candidates at every step. A soft-capped head (Gemma 2) declines
    the fused path, so capping stays in one place."""
    model = quantize_model(wide_vocab("gemma3", tmp_path), "int8-rescore")
    assert isinstance(model.model.embed_tokens.ranker, Int3Ranker)
    decoder = native_decoder(model)
    prompts = [[2, 17, 99, 5], [2, 8, 300, 41, 77, 12, 250]]
    fused_calls = []
    fused_step = decoder._fused
    decoder._fused = lambda *a: fused_calls.append(1) or fused_step(*a)  # gk_greedy_step: one call a token
    fused = torch.stack(list(generate_tokens(model, prompts, STEPS, decoder=decoder)))
    assert len(fused_calls) == STEPS - 1
    separate_decoder = native_decoder(model)
    separate_decoder.greedy_step = lambda ids, cache: separate_decoder.argmax(  # layers, int4 head, argmax
        separate_decoder.step(ids, cache))
    separate_decoder.greedy = lambda h: separate_decoder.argmax(separate_decoder.logits(h))
    separate = torch.stack(list(generate_tokens(model, prompts, STEPS, decoder=separate_decoder)))
    assert torch.equal(fused, separate)
    assert len(set(fused.flatten().tolist())) > 5  # a real sequence, not one token repeated

    # what greedy decoding reads: the ranker instead of the int4 head (the bench's bytes a token)
    from gemmakit.quant import weight_bytes_per_token

    emb = model.model.embed_tokens
    assert decoder.greedy_reads_ranker
    int4_bytes = sum(t.numel() * t.element_size() for t in emb.coarse.buffers())
    assert (weight_bytes_per_token(model) - weight_bytes_per_token(model, ranked=True)
            == int4_bytes - emb.ranker.planes.numel())

    # Gemma 2: the final soft-cap is applied inside the fused step (candidates rank the same under tanh; the
    # best is chosen by capped value, ties to the lower index), so its greedy tokens are still the capped argmax
    capped = quantize_model(wide_vocab("gemma2", tmp_path / "g2"), "int8-rescore")
    assert capped.config.final_softcap is not None
    capped_decoder = native_decoder(capped)
    assert capped_decoder.greedy_reads_ranker
    fused_calls.clear()
    capped_decoder._fused = lambda *a: fused_calls.append(1) or type(capped_decoder)._fused(capped_decoder, *a)
    fused = torch.stack(list(generate_tokens(capped, prompts, STEPS, decoder=capped_decoder)))
    assert len(fused_calls) == STEPS - 1
    separate_decoder = native_decoder(capped)
    separate_decoder.greedy_step = lambda ids, cache: separate_decoder.argmax(separate_decoder.step(ids, cache))
    separate_decoder.greedy = lambda h: separate_decoder.argmax(separate_decoder.logits(h))
    separate = torch.stack(list(generate_tokens(capped, prompts, STEPS, decoder=separate_decoder)))
    assert torch.equal(fused, separate)
    cache = KVCache(capped.config, 1, 16, capped.dtype)
    capped_decoder.prefill(torch.tensor([[2, 5]]), cache)
    h = capped_decoder.advance(torch.tensor([7]), cache)
    assert torch.equal(capped_decoder.greedy(h), capped_decoder.logits(h).argmax(-1))


def test_models_it_cannot_run_are_left_alone(tmp_path):
    fp32 = tiny("gemma3", tmp_path)
    assert not native.supports(fp32)
    assert choose_decoder(fp32).name == "eager"
    assert not native.supports(quantize_model(fp32, "int4"))


def test_native_int8_head_equals_dequantized_product():
    gen = torch.Generator().manual_seed(1)
    lin = Int8Linear.from_weight(torch.randn(320, 96, generator=gen), torch.bfloat16)
    x = torch.randn(3, 96, generator=gen)
    expected = x.double() @ (lin.weight_int8.double() * lin.scales.double()[:, None]).t()
    got = kernels.int8_matvec(lin, x)
    assert got.shape == (3, 320)
    assert (got.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.skipif(not native.library().gk_has_int4_matvec(), reason="the int4 head needs AVX512-VNNI")
@pytest.mark.parametrize("group", [32, 64])
def test_native_int4_head_error_is_bounded_by_activation_rounding(group):
    """The int4 kernel rounds activations to int8 with one scale per group of inputs: each logit may move by
    at most half a step of each group's rounding times the group's summed |weights|. A wrong row order, nibble
    or group scale breaks the bound by orders of magnitude, and one activation scale per row (coarser where
    the residual has an outlier) breaks it too."""
    gen = torch.Generator().manual_seed(2)
    lin = Int4Linear.from_weight(torch.randn(256, 128, generator=gen), group, torch.bfloat16)
    x = torch.randn(2, 128, generator=gen)
    x[0, 3] = 40.0  # an outlier, as Gemma's normed residuals have
    w = lin.dequantized_rows(torch.arange(256)).double()  # [N, K], what the packed codes mean
    expected = x.double() @ w.t()
    got = kernels.int4_matvec(lin, x)
    # per group of inputs: half an int8 step of that group's activations times the group's summed |weights|
    groups = x.double().view(2, -1, group)  # [M, G, g]
    step = groups.abs().amax(dim=-1) / 127  # [M, G]
    weight_mass = w.abs().view(256, -1, group).sum(dim=-1)  # [N, G]
    bound = 0.5 * step @ weight_mass.t() + 1e-4  # [M, N]
    assert ((got.double() - expected).abs() <= bound).all()


def test_hooks_send_decoding_back_to_the_eager_path(tmp_path):
    """Scope's capture and steering hook modules; the native step would silently skip them."""
    model = quantize_model(tiny("gemma3", tmp_path), "int8")
    decoder = native_decoder(model)
    cache = KVCache(model.config, 1, 8, model.dtype)
    assert decoder.usable(cache)
    calls = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append(1))
    assert not decoder.usable(cache)
    list(generate_tokens(model, [[2, 17, 99]], 4, decoder=decoder))
    assert len(calls) == 4  # prefill and three eager decode steps all ran the hooked module
    handle.remove()
    assert decoder.usable(cache)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert not decoder.usable(cache)
    finally:
        handle.remove()


def ranker_logits(ranker: Int3Ranker, x: torch.Tensor) -> torch.Tensor:
    """What the native 3-bit pass computes, in float64: int8 activations with one scale (max / 127) and one
    exact sum per 64 inputs, against the ranker's codes, scales and minima."""
    codes, scale, minimum = ranker.unpacked()
    groups = x.double().view(x.shape[0], -1, 64)
    x_scale = groups.abs().amax(-1) / 127
    xq = torch.round(groups / x_scale[..., None])
    dots = torch.einsum("bgi,ngi->bng", xq, codes.double().view(codes.shape[0], -1, 64))
    return (scale.double() * dots * x_scale[:, None, :] + minimum.double() * groups.sum(-1)[:, None, :]).sum(-1)


@pytest.mark.skipif(not native.library().gk_has_int4_matvec(), reason="the native head needs AVX512-VNNI")
@pytest.mark.parametrize("ranked", [False, True])
def test_rescored_head_recomputes_the_coarse_top_candidates_exactly(ranked):
    """int8-rescore's decode head in one native call: the coarse logits (int4 head, or the 3-bit ranker greedy
    decoding uses) everywhere, except the top CANDIDATES of each row, which hold the exact int8 logits of the
    normed residual; the best of those by exact logit is each row's greedy token. A vocabulary of 8192 rows is
    large enough for the block search (128 candidates need at least 128 blocks of 64). Residuals of +-1 with
    eps 0 make the norm exact, so torch's normed x is bit for bit the kernel's. the 11 rows are computed 8 and
    3 at a time, and each row equals its own call bit for bit."""
    from gemmakit.model import RMSNorm
    from gemmakit.quant import QuantEmbedding

    gen = torch.Generator().manual_seed(5)
    vocab, dim, batch = 8192, 128, 11
    weight = torch.randn(vocab, dim, generator=gen)
    emb = QuantEmbedding(Int8Linear.from_weight(weight, torch.bfloat16), torch.bfloat16,
                         Int4Linear.from_weight(weight, 32, torch.bfloat16, search=False),
                         Int3Ranker.from_weight(weight))
    norm = RMSNorm(dim, eps=0.0)
    norm.weight.data = torch.randn(dim, generator=gen) * 0.5
    h = torch.randint(0, 2, (batch, 1, dim), generator=gen).float() * 2 - 1
    lib = native.library()
    keep: list[torch.Tensor] = []
    head = _head(lib, emb, norm, emb.table.scales.float(), keep, None)  # what a decoder binds
    assert head is not None and head.ranker
    logits, best = torch.empty(batch, vocab), torch.empty(batch, dtype=torch.long)
    assert lib.gk_rescored_head(h.reshape(batch, dim).contiguous().data_ptr(), batch, ctypes.byref(head),
                                logits.data_ptr(), int(ranked), best.data_ptr(), 2) == 0
    x = norm(h).view(batch, dim)
    if ranked:
        coarse = ranker_logits(emb.ranker, x)
    else:
        coarse = kernels.int4_matvec(emb.coarse, x).double()
    exact = x.double() @ (emb.table.weight_int8.double() * emb.table.scales.double()[:, None]).t()
    top = coarse.topk(emb.CANDIDATES, dim=-1).indices
    for row in range(batch):
        rescored = torch.zeros(vocab, dtype=torch.bool)
        rescored[top[row]] = True
        tail_err = (logits[row][~rescored].double() - coarse[row][~rescored]).abs().max().item()
        # the tail keeps the coarse values (the int4 ones bit for bit; the ranker's up to fp32 rounding)
        assert tail_err <= (1e-5 if ranked else 0.0) * coarse[row].abs().max().item()
        err = (logits[row][rescored].double() - exact[row][rescored]).abs().max().item()
        assert err <= 1e-5 * exact[row].abs().max().item()
        assert best[row].item() == top[row][exact[row][top[row]].argmax()].item()
    # every row bitwise as it is alone (the kernels unpack a block once for up to 8 rows)
    for row in (0, 7, 8, batch - 1):
        alone, alone_best = torch.empty(1, vocab), torch.empty(1, dtype=torch.long)
        assert lib.gk_rescored_head(h[row].contiguous().data_ptr(), 1, ctypes.byref(head), alone.data_ptr(),
                                    int(ranked), alone_best.data_ptr(), 2) == 0
        assert torch.equal(alone[0], logits[row]) and alone_best[0] == best[row]


def test_ranker_layout_round_trips_and_bounds_its_error():
    """The 3-bit ranker's packed planes give back the codes, scales and minima they were made from, and each
    weight is within half a step of its group's (bf16) range."""
    from gemmakit import ranker as ranker_module

    w = torch.randn(192, 256, generator=torch.Generator().manual_seed(2))
    codes, scale, minimum = ranker_module.quantize(w)
    ranker = Int3Ranker.from_weight(w, rows_per_chunk=64)  # three chunks
    got = ranker.unpacked()
    assert torch.equal(got[0], codes) and torch.equal(got[1], scale) and torch.equal(got[2], minimum)
    assert codes.max().item() == 7 and codes.min().item() == 0
    err = (ranker.dequantized() - w).abs().view(192, 4, 64).amax(-1)
    # half a step, plus how far rounding the pair to bf16 (8 significant bits) moves the grid's top and bottom
    assert bool((err <= scale * (0.5 + 7 / 256) + minimum.abs() / 256).all())


def test_native_embedding_is_the_fp32_dequantized_row_times_sqrt_d(tmp_path):
    model = quantize_model(tiny("gemma3", tmp_path), "int8")
    decoder = native.NativeDecoder(model, native.library())
    table = model.model.embed_tokens.table
    ids = torch.tensor([[7], [300]])
    caches = [KVCache(model.config, 2, 4, torch.float32) for _ in range(2)]
    embedded = (table.weight_int8[ids[:, 0]].float() * table.scales.float()[ids[:, 0], None]
                * model.config.hidden_size ** 0.5).unsqueeze(1)
    with torch.inference_mode():
        got = decoder.hidden_states(ids, caches[0])  # embedded by the library
        expected = decoder.hidden_states(ids, caches[1], embedded)
    assert (got - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()


def test_native_argmax_is_torch_argmax():
    decoder = native.NativeDecoder(torch.nn.Module(), native.library())
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 1003, generator=gen)  # not a multiple of the vector width
    logits[1, [17, 500, 1001]] = 9.0  # ties: the first wins
    logits[2, [999, 1002]] = 9.0  # ties in the scalar tail
    logits[3, [40, 600]] = float("nan")  # NaN counts as the largest, the first one
    logits[4] = -1.0
    assert torch.equal(decoder.argmax(logits), logits.argmax(dim=-1))


def test_struct_layouts_are_checked_against_the_compiler(monkeypatch):
    """The ctypes mirrors match the compiled structs field by field, and any difference is an error at load."""
    from gemmakit.decoding.native import abi
    from gemmakit.errors import GemmaKitError

    lib = native.library()
    abi.check(lib)  # the real layouts agree
    expected = abi.expected_layout()
    assert len(expected) == len(abi.STRUCTS) + sum(len(s._fields_) for s in abi.STRUCTS)
    shifted = list(expected)
    model_start = 2 + len(abi.Matrix._fields_) + len(abi.Layer._fields_)  # Model's size, after Matrix and Layer
    shifted[expected.index(abi.Model.ring_stride.offset, model_start + 1)] += 8
    monkeypatch.setattr(abi, "expected_layout", lambda: shifted)  # as if a field were added on one side only
    with pytest.raises(GemmaKitError, match="struct layout"):
        abi.check(lib)
