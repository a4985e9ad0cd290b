"""Loading goes one way: a source is resolved once and each header read once; one builder serves every state dict.

The counters wrap the real functions (they still run): `weights.source._sniff` is the one read of a file's first
bytes, `GGUFFile._parse` the one parse of a GGUF header, and `resolve_source` the one resolver.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gemmakit
from gemmakit import loader, quant
from gemmakit.errors import FormatError, InputError
from gemmakit.weights import hf
from gemmakit.weights import source as sources
from gemmakit.weights.gguf_reader import GGUFFile
from support.tiny_gguf import write_tiny_gguf


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _counted(monkeypatch, owner, name, keep=lambda *args: True) -> list:
    """Wrap owner.name so that calls (those `keep` accepts) are recorded; the original still runs."""
    calls: list = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if keep(*args):
            calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.fixture
def counters(monkeypatch):
    def resolution(arg, *rest):
        return not isinstance(arg, sources.Source)  # passing a resolved Source on resolves nothing

    resolved = _counted(monkeypatch, sources, "resolve_source", resolution)
    monkeypatch.setattr(loader, "resolve_source", sources.resolve_source)  # the loader's name sees the counter
    return {"resolved": resolved, "sniffed": _counted(monkeypatch, sources, "_sniff"),
            "gguf headers": _counted(monkeypatch, GGUFFile, "_parse")}


def _reset(counters) -> None:
    for calls in counters.values():
        calls.clear()


def test_a_quantised_load_of_a_gguf_resolves_and_reads_its_header_once(tiny_gguf, counters, tmp_path):
    first = gemmakit.load(tiny_gguf, quant="int8")  # converts: reads the GGUF, writes the cache
    assert {k: len(v) for k, v in counters.items()} == {"resolved": 1, "sniffed": 1, "gguf headers": 1}
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    _reset(counters)
    again = gemmakit.load(tiny_gguf, quant="int8")  # maps the cached file: the GGUF is not parsed at all
    assert {k: len(v) for k, v in counters.items()} == {"resolved": 1, "sniffed": 1, "gguf headers": 0}
    assert again.tokenizer.encode("ab a") == first.tokenizer.encode("ab a")  # the tokenizer came from the header
    assert torch.equal(again.logits([2, 261, 262]), first.logits([2, 261, 262]))
    assert again.module.quant_scheme == first.module.quant_scheme == "int8"


def test_float_and_default_loads_of_a_gguf_resolve_once(tiny_gguf, counters):
    gemmakit.load(tiny_gguf, dtype="float32")
    assert {k: len(v) for k, v in counters.items()} == {"resolved": 1, "sniffed": 1, "gguf headers": 1}
    _reset(counters)
    gemmakit.load(tiny_gguf)  # the default: int8-rescore on a CPU with bf16, float32 elsewhere
    assert {k: len(v) for k, v in counters.items()} == {"resolved": 1, "sniffed": 1, "gguf headers": 1}


def test_a_converted_file_is_resolved_once_and_not_converted_again(tiny_gguf, counters, tmp_path):
    out = loader.convert(tiny_gguf, "int8", tmp_path / "tiny-int8.safetensors", progress=False)
    _reset(counters)
    model = gemmakit.load(out)
    assert {k: len(v) for k, v in counters.items()} == {"resolved": 1, "sniffed": 1, "gguf headers": 0}
    assert model.source == tiny_gguf.resolve()  # the original weights, named in the converted header
    with pytest.raises(InputError, match="already a converted model"):
        loader.convert(out, "int4", tmp_path / "again.safetensors", progress=False)


def test_a_foreign_safetensors_file_is_refused_with_the_reason(tiny_dir):
    with pytest.raises(FormatError, match="without gemmakit's conversion header") as err:
        gemmakit.load(tiny_dir / "model.safetensors")
    assert "model.safetensors" in str(err.value)


# --- the one builder ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4", "int8-rescore", "bf16"])
def test_the_builder_rebuilds_a_quantised_module_from_its_state_dict(tiny_dir, scheme):
    reference = loader.quantized_module(loader.read_checkpoint(tiny_dir), scheme)
    state = reference.state_dict()
    rebuilt = loader.build_model(reference.config, dict(state), None, "rebuilt")
    got = rebuilt.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) and got[k].dtype == state[k].dtype for k in state)
    kinds = [type(m).__name__ for m in reference.modules()]
    assert [type(m).__name__ for m in rebuilt.modules()] == kinds
    ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.inference_mode():
        assert torch.equal(rebuilt(ids), reference(ids))
    assert rebuilt.dtype == reference.dtype  # the activation dtype is read from the stored scales


def test_the_builder_casts_a_float_state_or_keeps_its_dtypes(tiny_dir):
    checkpoint = loader.read_checkpoint(tiny_dir)
    state = {k: (v.to(torch.bfloat16) if "norm" not in k else v) for k, v in checkpoint.state.items()}
    kept = loader.build_model(checkpoint.config, state, None, "mixed")
    assert kept.model.norm.weight.dtype == torch.float32
    assert kept.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    cast = loader.build_model(checkpoint.config, state, torch.float32, "mixed")
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    assert isinstance(cast.model.layers[0].mlp.up_proj, nn.Linear)


def test_the_builder_names_the_file_and_tensor_of_a_broken_quantised_state(tiny_dir):
    module = loader.quantized_module(loader.read_checkpoint(tiny_dir), "int8")
    state = module.state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("model.layers.1.mlp.up_proj.")}
    with pytest.raises(FormatError, match=r"q8\.safetensors.*model\.layers\.1\.mlp\.up_proj"):
        loader.build_model(module.config, broken, None, "q8.safetensors")
    extra = dict(state, **{"model.layers.0.mlp.surplus": torch.zeros(1)})
    with pytest.raises(FormatError, match="unexpected.*surplus"):
        loader.build_model(module.config, extra, None, "q8.safetensors")
    with pytest.raises(InputError, match="CPU only"):
        loader.build_model(module.config, state, None, "q8.safetensors", device="cuda")
    with pytest.raises(InputError, match="dtype=None"):
        loader.build_model(module.config, state, torch.float32, "q8.safetensors")
    assert quant.is_quantized_state(state) and not quant.is_quantized_state(hf.read_state_dict(tiny_dir))
