"""Loading within memory: files are read lazily, converted one tensor at a time, and refused early when too big.

- A lazy read (`RawTensor`s over the file's map) decodes to exactly the eager read's tensors.
- The streaming conversion (meta model, one tensor decoded at a time) gives the same modules bit for bit as the
  in-memory one on an fp32 module, and the head converted in row chunks equals the whole-tensor conversion.
- A conversion in a subprocess, on a model of 0.5 GB in fp32, grows its anonymous memory by far less than that.
- `gemmakit.memory.check_fits` refuses with the figures, before converting; the env switch turns it off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gemmakit import loader, memory, quant
from gemmakit.blocks import BlockLinear
from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError, InputError
from gemmakit.ranker import Int3Ranker
from gemmakit.weights import gguf, hf
from gemmakit.weights.raw import RawTensor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_q8(tiny_dir, tmp_path_factory):
    """The tiny model as a Q8_0 GGUF (F32 norms), written by gemmakit's exporter."""
    pytest.importorskip("gguf")
    from gemmakit.export import gguf_tensor_plan, write_gguf

    exact = loader.load_model(tiny_dir, dtype="float32")
    config = exact.module.config.replace(query_pre_attn_scalar=16.0)  # the value llama.cpp assumes, as GGUF has no key
    state = exact.module.state_dict()
    return write_gguf(tmp_path_factory.mktemp("q8") / "tiny-q8.gguf", config, exact.tokenizer,
                      ((name, state[name]) for name, _ in gguf_tensor_plan(config)), "Q8_0")


def _old_conversion(source, scheme_name: str) -> nn.Module:
    """The conversion as it was before streaming: every tensor decoded, the whole model built in fp32, then
    converted in place (the in-memory path, which shares the per-tensor code)."""
    checkpoint = loader.read_checkpoint(source)
    module = loader.build_model(checkpoint.config, checkpoint.state, torch.float32, checkpoint.source)
    quant.quantize_model(module, scheme_name)
    return module


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


# --- lazy reads -----------------------------------------------------------------------------------------------------
def test_a_lazy_gguf_read_decodes_to_the_eager_read(tiny_q8):
    eager, lazy = gguf.read(tiny_q8), gguf.read(tiny_q8, lazy=True)
    assert eager.state.keys() == lazy.state.keys() and eager.tensor_types == lazy.tensor_types
    assert all(isinstance(t, RawTensor) for t in lazy.state.values())
    norm = lazy.state["model.layers.0.input_layernorm.weight"]
    assert norm.shift == -1.0 and norm.type_name == "F32"
    assert lazy.state["model.layers.0.mlp.up_proj.weight"].type_name == "Q8_0"
    for name, raw in lazy.state.items():
        assert torch.equal(raw.dequantize(), eager.state[name]), name


def test_a_lazy_hf_read_maps_the_shards_and_decodes_to_the_eager_read(tiny_dir, tmp_path):
    eager, lazy = hf.read(tiny_dir), hf.read(tiny_dir, lazy=True)
    assert eager.state.keys() == lazy.state.keys() and eager.tensor_types == lazy.tensor_types
    for name, raw in lazy.state.items():
        assert isinstance(raw, RawTensor) and torch.equal(raw.dequantize(), eager.state[name].float()), name
    # bf16 shards, and a header that lies about a tensor's bytes
    from safetensors.torch import save_file

    bf16 = {k: v.bfloat16() for k, v in hf.read_state_dict(tiny_dir).items()}
    save_file(bf16, str(tmp_path / "model.safetensors"))
    mapped = hf.read_lazy_state_dict(tmp_path)
    assert all(torch.equal(mapped[k].dequantize(), v.float()) for k, v in bf16.items())
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 2
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    (tmp_path / "model.safetensors").write_bytes(bytes(data[:8]) + text.ljust(n) + bytes(data[8 + n:]))
    with pytest.raises(FormatError, match=rf"model\.safetensors: tensor '{name}'"):
        hf.read_lazy_state_dict(tmp_path)


# --- streaming equals the old conversion ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme_name", ["int8", "int8-rescore", "int4", "bf16"])
def test_streaming_conversion_of_an_hf_directory_equals_the_in_memory_one(tiny_dir, scheme_name):
    streamed = loader.quantized_module(loader.read_checkpoint(tiny_dir, lazy=True), scheme_name)
    _same_state(streamed, _old_conversion(tiny_dir, scheme_name))
    assert streamed.quant_scheme == scheme_name


@pytest.mark.parametrize("scheme_name", ["int8", "int8-rescore"])
def test_streaming_conversion_of_a_gguf_equals_the_in_memory_one(tiny_q8, scheme_name):
    checkpoint = loader.read_checkpoint(tiny_q8, lazy=True)
    streamed = loader.quantized_module(checkpoint, scheme_name)
    assert checkpoint.state == {}  # consumed, tensor by tensor
    reference = _old_conversion(tiny_q8, scheme_name)
    _same_state(streamed, reference)
    ids = torch.tensor([[2, 10, 20, 30]])
    with torch.inference_mode():
        assert torch.equal(streamed(ids), reference(ids))


def _whole_head(w: torch.Tensor, spec: quant.Scheme, dtype: torch.dtype) -> quant.QuantEmbedding:
    """The head as `quantize_model` converted it before chunking: each part from the whole fp32 tensor."""
    table = (quant.Int4Linear.from_weight(w, spec.group, dtype) if spec.head == "int4"
             else quant.Int8Linear.from_weight(w, dtype))
    coarse = ranker = None
    if spec.coarse_head:
        coarse = quant.Int4Linear.from_weight(w, spec.group, dtype, search=False)
        ranker = Int3Ranker.from_weight(w, rows_per_chunk=w.shape[0])
    return quant.QuantEmbedding(table, dtype, coarse, ranker)


@pytest.mark.parametrize("scheme_name", ["int8-rescore", "int4"])
def test_the_head_in_row_chunks_equals_the_whole_tensor_conversion(scheme_name):
    """int8 rows, int4 packing ([N, K/2] in 64-row blocks) and the ranker's 64-row blocks concatenate exactly."""
    w = torch.randn(64 * 7, 128, generator=torch.Generator().manual_seed(3)) * 0.2
    spec = quant.scheme(scheme_name)
    chunked = quant.make_head(w, spec, torch.bfloat16, rows_per_chunk=128)  # 3.5 chunks: a short last one
    _same_state(chunked, _whole_head(w, spec, torch.bfloat16))
    raw = RawTensor(w.numpy().view(np.uint8).reshape(-1), 0, tuple(w.shape), name="head")  # the same, as F32 bytes
    _same_state(quant.make_head(raw, spec, torch.bfloat16, rows_per_chunk=192), chunked)
    with pytest.raises(ValueError, match="multiple of 64"):
        quant.make_head(w, spec, torch.bfloat16, rows_per_chunk=100)


@pytest.mark.slow  # ~60 s on 2 shared cores: the whole-tensor reference is the slow part
def test_the_real_270m_head_converts_in_chunks_bit_for_bit():
    """The embedded 270M's 262144 x 640 Q8_0... head (as the file stores it), chunked against whole."""
    try:
        from gemmakit.weights.source import default_model_path

        path = default_model_path()
    except Exception as e:  # noqa: BLE001 - the package is optional
        pytest.skip(f"the embedded 270M is not installed: {e}")
    raw = gguf.read(path, lazy=True).state["model.embed_tokens.weight"]
    spec = quant.scheme("int8-rescore")
    chunked = quant.make_head(raw, spec, torch.bfloat16)
    _same_state(chunked, _whole_head(raw.dequantize(), spec, torch.bfloat16))


def test_make_linear_keeps_supported_gguf_blocks_and_decodes_the_rest(tiny_q8):
    state = gguf.read(tiny_q8, lazy=True).state
    q8 = state["model.layers.0.mlp.up_proj.weight"]
    lin = quant.make_linear(q8, "gguf", 32, torch.bfloat16)
    assert isinstance(lin, BlockLinear) and lin.type_name == "Q8_0"
    assert lin.weight_blocks.data_ptr() == q8.blocks().data_ptr()  # the file's bytes, not a copy
    assert torch.equal(lin.dequantized(), q8.dequantize())
    decoded = q8.dequantize()
    for w in (decoded, RawTensor(decoded.numpy().view(np.uint8).reshape(-1), 0, tuple(decoded.shape))):
        fallback = quant.make_linear(w, "gguf", 32, torch.bfloat16)  # F32 has no block kernel: int8
        reference = quant.Int8Linear.from_weight(decoded, torch.bfloat16)
        assert isinstance(fallback, quant.Int8Linear)
        assert torch.equal(fallback.weight_int8, reference.weight_int8)
        assert torch.equal(fallback.scales, reference.scales)


# --- refusing early -------------------------------------------------------------------------------------------------
def test_available_bytes_reads_meminfo():
    available = memory.available_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo on this system")
    assert 0 < available < 1 << 50


def test_a_conversion_that_cannot_fit_is_refused_before_it_starts(tiny_dir, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    calls = []
    monkeypatch.setattr(quant, "make_linear", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError, match=rf"converting {tiny_dir.name} to int8 needs ~0\.\d GB, this machine has "
                                         r"0\.0 GB available") as err:
        loader.convert(tiny_dir, "int8", progress=False)
    assert str(tiny_dir) in str(err.value) and "GEMMAKIT_SKIP_MEMORY_CHECK" in str(err.value)
    assert calls == []  # refused before the first tensor
    with pytest.raises(InputError, match="building the model in torch.float32 needs"):
        loader.load_model(tiny_dir, dtype="float32")
    monkeypatch.setenv("GEMMAKIT_SKIP_MEMORY_CHECK", "1")
    assert isinstance(loader.load_model(tiny_dir, dtype="float32").module.model.embed_tokens, nn.Embedding)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    monkeypatch.delenv("GEMMAKIT_SKIP_MEMORY_CHECK")
    memory.check_fits(1 << 60, "anything", "unknown.gguf")  # unknown availability: nothing refused


def test_the_estimate_covers_the_converted_size(tiny_dir):
    for name in ("int8", "int8-rescore", "int4"):
        checkpoint = loader.read_checkpoint(tiny_dir, lazy=True)
        estimate, transient = quant.conversion_bytes(checkpoint.state, quant.scheme(name))
        module = loader.quantized_module(checkpoint, name)
        held = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        assert held <= estimate <= 1.1 * held + 4096, name
        assert transient > 0


# --- peak memory of a real-sized conversion, in a subprocess --------------------------------------------------------
CONFIG = dict(family="gemma3", vocab_size=4096, hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=4,
              head_dim=128, intermediate_size=4096, query_pre_attn_scalar=128.0, sliding_window=512,
              use_qk_norm=True)

# Run in a fresh interpreter: a thread samples RssAnon (/proc/self/status) every millisecond while the conversion
# runs. Anonymous memory, not VmHWM/VmRSS: the GGUF is read through a memory map, and every page of it the
# conversion touches counts in RSS as file-backed (RssFile) although the kernel can drop it at any time, so
# VmHWM would grow with the file's size even for a perfect streaming loader. What a loader holds of its own
# (decoded tensors, converted buffers, allocator slack) is anonymous. The baseline is taken after the imports
# and a first small conversion, so torch's one-time allocations do not count as growth.
CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from gemmakit import loader, quant

    def anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    source, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    loader.quantized_module(loader.read_checkpoint(sys.argv[4], lazy=True), "int8")  # warm-up: torch's first use
    base = anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    if mode == "convert":
        loader.convert(source, "int8", out, progress=False)
    else:  # the pre-streaming way: the whole model decoded and built in fp32, then converted in place
        checkpoint = loader.read_checkpoint(source)
        module = loader.build_model(checkpoint.config, checkpoint.state, None, source)
        checkpoint.state = {}
        quant.quantize_model(module, "int8")
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    peak[0] = max(peak[0], anon())
    print(json.dumps({"growth": peak[0] - base, "base": base, "seconds": seconds}))
""")


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory, tiny_q8):
    """A 130M-parameter Gemma 3 (520 MB in fp32) as an F16 GGUF, written tensor by tensor (never whole)."""
    from gemmakit.export import gguf_tensor_plan, write_gguf
    from gemmakit.tokenizer import Tokenizer
    from support.tiny_gguf import _tokens

    config = GemmaConfig(**CONFIG)
    tokens, types = _tokens(config.vocab_size)
    tokenizer = Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1})
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in gguf_tensor_plan(config):
            yield name, torch.randn(shape, generator=gen) * (0.5 if "norm" in name else 0.05)

    path = write_gguf(tmp_path_factory.mktemp("big") / "big-f16.gguf", config, tokenizer, tensors(), "F16")
    fp32 = sum(4 * int(np.prod(shape)) for _, shape in gguf_tensor_plan(config))
    largest = max(4 * int(np.prod(shape)) for _, shape in gguf_tensor_plan(config))
    return path, fp32, largest


def _run_child(path: Path, out: Path, mode: str, warm: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), mode, str(warm)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**__import__("os").environ,
                                                                  "GEMMAKIT_SKIP_MEMORY_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_converting_streams_within_the_converted_size_plus_one_tensor(big_gguf, tiny_q8, tmp_path):
    """Bound: the converted model (held while it is written) + the largest tensor in fp32 x 4 (decoded copy,
    the quantiser's temporaries) + 64 MB of allocator slack. For this model that is about half its fp32 size;
    the pre-streaming conversion held the whole fp32 model plus the converted one."""
    path, fp32, largest = big_gguf
    result = _run_child(path, tmp_path / "big-int8.safetensors", "convert", tiny_q8)
    converted = (tmp_path / "big-int8.safetensors").stat().st_size
    bound = converted + 4 * largest + (64 << 20)
    assert bound < 0.7 * fp32  # the bound itself tells streaming from building in fp32
    assert result["growth"] < bound, (f"anonymous memory grew {result['growth'] / 1e6:.0f} MB converting a model "
                                      f"of {fp32 / 1e6:.0f} MB in fp32 (bound {bound / 1e6:.0f} MB)")


def test_gguf_rescore_streams_a_gguf_keeping_its_blocks(tiny_q8):
    """Layers as the file stores them (BlockLinear over the file's map, never decoded); head int8-rescore."""
    if "gguf-rescore" not in quant.SCHEMES:
        pytest.skip("the gguf-rescore scheme is not defined yet")
    checkpoint = loader.read_checkpoint(tiny_q8, lazy=True)
    raw = checkpoint.state["model.layers.0.self_attn.q_proj.weight"]
    module = loader.quantized_module(checkpoint, "gguf-rescore")
    q = module.model.layers[0].self_attn.q_proj
    assert isinstance(q, BlockLinear) and q.weight_blocks.data_ptr() == raw.blocks().data_ptr()
    assert all(isinstance(getattr(layer.mlp, n), BlockLinear) for layer in module.model.layers
               for n in ("gate_proj", "up_proj", "down_proj"))
    reference = _old_conversion(tiny_q8, "int8-rescore")
    assert torch.equal(module.model.embed_tokens.table.weight_int8, reference.model.embed_tokens.table.weight_int8)
    estimate, _ = quant.conversion_bytes(loader.read_checkpoint(tiny_q8, lazy=True).state, quant.scheme("gguf-rescore"))
    held = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert held <= estimate <= 1.1 * held + 4096
