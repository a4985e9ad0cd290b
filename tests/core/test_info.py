"""`gemmakit info` reads headers only: it describes files whose tensor data is not there at all.

The large case: a GGUF whose header declares a 3.9B-parameter Gemma 3 in fp32 (15.5 GB of tensors) and whose file
stops where the data should begin. `gemmakit.load` of it fails (the data cannot be read), so `info` succeeding on
it, with the architecture, sizes and tensor types, shows that it read none of it. The small cases check that
what `info` reads from headers agrees with what a full load reads.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest

import gemmakit
from gemmakit.cli import main as cli_main
from gemmakit.errors import FormatError
from gemmakit.weights.summary import summarize
from support.tiny_gguf import write_gguf_without_data, write_tiny_gguf
from support.tiny_models import save_hf_model, save_tiny_tokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def big_gguf_without_data(tmp_path_factory):
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("big") / "big.gguf"
    declared = write_gguf_without_data(path, hidden=2560, layers=34, ffn=10240, heads=8, kv_heads=4, head_dim=256,
                                       n_tokens=262144)
    header_end = _gguf_data_offset(path)
    os.truncate(path, header_end)  # cut the file where the tensor data begins: not one byte of it exists
    return path, declared


def _gguf_data_offset(path) -> int:
    from gemmakit.weights.gguf_reader import GGUFFile

    with GGUFFile(path) as g:
        return g.data_offset


def test_info_on_a_large_gguf_reads_no_tensor_data(big_gguf_without_data, capsys):
    path, declared = big_gguf_without_data
    with pytest.raises(FormatError, match="truncated"):
        gemmakit.load(path, dtype="float32")  # a full load cannot even start: the data is not in the file
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture:  gemma3 (big-test-model)" in out
    assert "layers:        34 (29 sliding, 5 global)" in out
    assert "d_model:       2560   ffn: 10240" in out
    assert "attention:     8 heads, 4 kv heads, head_dim 256" in out
    assert "vocabulary:    262144 (bos 2, eos 1)" in out
    assert "tensor types:  F32 x444" in out
    assert f"444 tensors, {declared / 1e9:.2f} GB of tensor data" in out
    assert "truncated" in out and "loading it will fail" in out
    parameters = float(out.split("parameters:")[1].split("M")[0])
    assert abs(parameters * 1e6 * 4 - declared) / declared < 0.01  # fp32: 4 bytes a parameter, as the header says


def test_info_on_an_hf_directory_with_its_data_cut_off(tmp_path, capsys):
    directory = tmp_path / "hf"
    save_hf_model("gemma3", directory)
    save_tiny_tokenizer(directory)
    full = summarize(directory)
    loaded = gemmakit.load(directory, dtype="float32")
    assert full.tensor_types == Counter(loaded.tensor_types.values())  # headers agree with a full read
    assert (full.vocab_size, full.bos_id, full.eos_id) == (loaded.tokenizer.vocab_size, loaded.tokenizer.bos_id,
                                                           loaded.tokenizer.eos_id)
    assert full.config == loaded.config and not full.warnings
    weights = directory / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 4)  # most of the data gone
    with pytest.raises(FormatError):
        gemmakit.load(directory, dtype="float32")
    assert cli_main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"d_model:       {loaded.config.hidden_size}" in out and "model.safetensors is truncated" in out
    assert "tensor types:  float32 x" in out


def test_info_agrees_with_a_load_of_a_gguf_and_of_its_conversion(tmp_path, capsys):
    pytest.importorskip("gguf")
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = gemmakit.load(path, dtype="float32")
    header = summarize(path)
    assert header.config == loaded.config
    assert header.tensor_types == Counter(loaded.tensor_types.values())
    assert (header.vocab_size, header.bos_id, header.eos_id) == (loaded.tokenizer.vocab_size,
                                                                 loaded.tokenizer.bos_id, loaded.tokenizer.eos_id)
    out_file = tmp_path / "tiny-int8.safetensors"
    assert cli_main(["quantize", str(path), str(out_file), "--quant", "int8", "-q"]) == 0
    capsys.readouterr()
    converted = summarize(out_file)
    assert converted.scheme == "int8" and converted.converted_from == str(path.resolve())
    assert converted.config == loaded.config and converted.tensor_types == header.tensor_types
    assert converted.vocab_size == header.vocab_size
    assert cli_main(["info", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "conversion:    int8, from" in out and "load():        the converted weights as stored (int8)" in out


def test_info_states_what_load_would_run(tmp_path, capsys):
    directory = tmp_path / "hf"
    save_hf_model("gemma", directory)
    save_tiny_tokenizer(directory)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    from gemmakit.quant import has_fast_bf16

    assert cli_main(["info", str(directory)]) == 0
    default = ("int8 weights, bf16 activations (int8-rescore" if has_fast_bf16()
               else "float32 weights and activations, unquantised")
    assert f"load():        {default}" in capsys.readouterr().out
    assert cli_main(["info", str(directory), "--dtype", "bfloat16"]) == 0
    assert "load():        bfloat16 weights and activations, unquantised" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # describing converts nothing


def test_header_only_gguf_records_missing_data_and_refuses_reads(big_gguf_without_data):
    from gemmakit.errors import InputError
    from gemmakit.weights.gguf_reader import GGUFFile

    path, declared = big_gguf_without_data
    with GGUFFile(path, header_only=True) as f:
        assert len(f.missing_data) == 444 and max(f.missing_data.values()) == f.data_offset + declared
        with pytest.raises(InputError, match="header_only"):
            f.tensor("token_embd.weight")
