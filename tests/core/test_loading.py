"""load() on every format, and clear errors naming the file for every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmakit
from gemmakit.errors import ConfigError, FormatError, GemmaKitError, InputError
from support.tiny_gguf import write_tiny_gguf
from support.tiny_models import VOCAB, save_hf_model, save_tiny_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3")
    reference = save_hf_model("gemma3", directory)
    save_tiny_tokenizer(directory)
    return directory, reference


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """A GGUF's default load converts into the cache: keep test files out of the user's."""
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))


def test_load_hf_directory_matches_transformers(hf_dir):
    directory, reference = hf_dir
    model = gemmakit.load(directory, dtype="float32")  # the exact reference (the default is the int8 fast path)
    ids = model.tokenizer.encode("hello world the sea ship")
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    assert (model.logits(ids) - expected).abs().max().item() <= 1e-4
    assert isinstance(model.generate("hello", max_new_tokens=5, stop=False), str)


def test_gemma_pytorch_checkpoint_with_fused_qkv(hf_dir, tmp_path):
    """A .ckpt in gemma_pytorch's layout (embedder, fused qkv_proj, query/key_norm) loads to the same logits."""
    directory, reference = hf_dir
    state = load_file(directory / "model.safetensors")
    fused = {}
    for name, tensor in state.items():
        name = name.replace("model.embed_tokens.weight", "embedder.weight")
        name = name.replace(".q_norm.", ".query_norm.").replace(".k_norm.", ".key_norm.")
        if ".k_proj." in name or ".v_proj." in name:
            continue
        if ".q_proj." in name:
            k, v = (state[name.replace("q_proj", p)] for p in ("k_proj", "v_proj"))
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat([tensor, k, v])
            continue
        fused[name] = tensor
    torch.save({"model_state_dict": fused}, tmp_path / "model.ckpt")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    shutil.copy(directory / "tokenizer.model", tmp_path / "tokenizer.model")
    model = gemmakit.load(tmp_path / "model.ckpt")
    ids = [2, 10, 20, 30, 40]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    assert (model.logits(ids) - expected).abs().max().item() <= 1e-4


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": Evil()}, path)
    with pytest.raises(FormatError, match="evil.ckpt"):
        gemmakit.load(path)


def test_safetensors_with_a_wrong_shape_names_the_tensor_and_file(hf_dir, tmp_path):
    directory, _ = hf_dir
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(directory / name, tmp_path / name)
    state = load_file(directory / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match=r"up_proj.*\[7, 64\]") as err:
        gemmakit.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_unknown_architecture(hf_dir, tmp_path):
    directory, _ = hf_dir
    shutil.copytree(directory, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="llama") as err:
        gemmakit.load(tmp_path / "m")
    assert "config.json" in str(err.value)


def test_prompt_longer_than_the_context(hf_dir):
    directory, _ = hf_dir
    model = gemmakit.load(directory)
    too_long = [2] + [10] * model.config.max_position
    with pytest.raises(InputError, match="context"):
        model.generate_ids([too_long], max_new_tokens=1)
    with pytest.raises(InputError, match="context"):
        model.logits(too_long)
    with pytest.raises(InputError, match="token ids"):
        model.logits([VOCAB + 5])


def test_fp16_is_refused_for_gemma3_unless_forced(hf_dir):
    directory, _ = hf_dir
    with pytest.raises(InputError, match="bfloat16"):
        gemmakit.load(directory, dtype="float16")
    assert gemmakit.load(directory, dtype="float16", force_fp16=True).module.dtype == torch.float16


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="nope"):
        gemmakit.load(tmp_path / "nope")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(FormatError, match="junk.bin"):
        gemmakit.load(junk)


def _tiny_gguf(tmp_path):
    """A small but complete gemma3 GGUF written with llama.cpp's own gguf package."""
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_small_gguf_loads_and_undoes_the_norm_offset(tmp_path):
    from gemmakit.weights.gguf_reader import GGUFFile

    path = _tiny_gguf(tmp_path)
    model = gemmakit.load(path)
    stored = GGUFFile(path).tensor("blk.0.attn_norm.weight")
    assert torch.equal(model.module.model.layers[0].input_layernorm.weight, stored - 1.0)
    assert model.logits([2, 261, 262]).shape == (1, 3, len(model.tokenizer))


@pytest.mark.parametrize("cut", [10, 100, 2000, -100])
def test_truncated_gguf_names_the_file(tmp_path, cut):
    data = _tiny_gguf(tmp_path).read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GemmaKitError, match="truncated.gguf"):
        gemmakit.load(bad)


def test_gguf_with_a_corrupted_length_names_the_file(tmp_path):
    data = bytearray(_tiny_gguf(tmp_path).read_bytes())
    # the first metadata key's length is the u64 after magic, version, tensor count and kv count
    data[24:32] = (2**60).to_bytes(8, "little")
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt.gguf"):
        gemmakit.load(bad)
