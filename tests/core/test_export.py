"""Export: HF directories load in transformers with identical logits; GGUF files (F32/F16/BF16/Q8_0) reload in
gemmakit with matching logits (exact for F32, same top-1 for the rest)."""

from __future__ import annotations

import pytest
import torch

from gemmakit.errors import InputError
from gemmakit.export import save_gguf, save_hf
from gemmakit.loader import build_model, read_checkpoint
from gemmakit.train.lora import LoraConfig, apply_lora
from gemmakit.weights import hf
from support.tiny_models import VOCAB, save_hf_model
from support.train_helpers import one_thread, tiny_tokenizer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

FAMILIES = ["gemma", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, directory)
    return build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory)


def ids(seed=0):
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_hf_export_loads_in_transformers_with_identical_logits(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf(tiny, tmp_path / "out", shard_size=50_000)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        expected = tiny(ids())
        torch.testing.assert_close(reference.eval()(ids()).logits, expected, atol=1e-4, rtol=1e-4)
    again = build_model(hf.read_config(tmp_path / "out"), hf.read_state_dict(tmp_path / "out"), torch.float32, "x")
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), expected, atol=0, rtol=0)


def gguf_ready(model):
    """llama.cpp has no key for query_pre_attn_scalar (it assumes head_dim), so use a model that follows the rule."""
    config = model.config.replace(query_pre_attn_scalar=float(model.config.head_dim))
    return build_model(config, model.state_dict(), torch.float32, "tiny")


@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16", "Q8_0"])
def test_gguf_export_reloads_with_matching_logits(tiny, tmp_path, file_type):
    model = gguf_ready(tiny)
    path = save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer(), file_type)
    checkpoint = read_checkpoint(path)
    assert checkpoint.config.layer_types == model.config.layer_types
    assert checkpoint.config.final_softcap == model.config.final_softcap
    assert checkpoint.tokenizer.vocab_size == VOCAB
    again = build_model(checkpoint.config, checkpoint.state, torch.float32, path)
    with torch.no_grad():
        expected, got = model(ids(1)), again(ids(1))
    if file_type == "F32":
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
        assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_export_refuses_what_it_cannot_write(tiny, tmp_path):
    if tiny.config.family != "gemma3":
        pytest.skip("one family is enough")
    with pytest.raises(InputError, match="query_pre_attn_scalar"):
        save_gguf(tiny, tmp_path / "x.gguf", tiny_tokenizer())
    with pytest.raises(InputError, match="Q4_K"):
        save_gguf(gguf_ready(tiny), tmp_path / "x.gguf", tiny_tokenizer(), "Q4_K")
    model = gguf_ready(tiny)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InputError, match="merge_lora"):
        save_hf(model, tmp_path / "y")


def test_cli_exports_model_with_merged_adapter(tmp_path):
    """`gemmakit export MODEL OUT --adapter DIR`: the adapter is merged and the tokenizer files travel along."""
    import gemmakit
    from gemmakit.cli import main
    from gemmakit.train.lora import lora_parameters, save_adapter
    from support.train_helpers import save_tiny_model

    source = save_tiny_model("gemma", tmp_path / "src")
    adapted = gemmakit.load(source, dtype="float32")
    config = LoraConfig(r=2, target_modules=["v_proj", "up_proj"])
    apply_lora(adapted.module, config)
    with torch.no_grad():
        for p in lora_parameters(adapted.module):
            p.normal_(0, 0.1)
    save_adapter(adapted.module, tmp_path / "adapter", config)
    assert main(["export", str(source), str(tmp_path / "out"), "--adapter", str(tmp_path / "adapter")]) == 0
    exported = gemmakit.load(tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "tokenizer.model").exists()
    with torch.no_grad():
        torch.testing.assert_close(exported.module(ids(2)), adapted.module(ids(2)), atol=1e-5, rtol=1e-5)
