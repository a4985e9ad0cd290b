"""LoRA: adapters move both ways between gemmakit and PEFT with the same logits; merge/unmerge/remove are exact."""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit.errors import FormatError, InputError
from gemmakit.loader import build_model
from gemmakit.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from gemmakit.weights import hf
from support.tiny_models import VOCAB, hf_model, save_hf_model
from support.train_helpers import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma3")
    save_hf_model("gemma3", directory)
    return directory


def ours(directory):
    return build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32, directory)


def ids(seed=0):
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))


def randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_peft_adapter_loads_into_gemmakit_with_same_logits(base_dir, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             layers_to_transform=[0, 2, 5], rank_pattern={"down_proj": 2},
                             alpha_pattern={"v_proj": 3}, task_type="CAUSAL_LM")
    reference = peft.get_peft_model(hf_model("gemma3"), config)
    randomise([p for n, p in reference.named_parameters() if "lora_" in n])
    reference.save_pretrained(tmp_path)
    model = ours(base_dir)
    names = load_adapter(model, tmp_path)
    assert len(names) == 9 and "model.layers.2.mlp.down_proj" in names
    assert model.get_submodule("model.layers.2.mlp.down_proj").r == 2
    assert model.get_submodule("model.layers.2.self_attn.v_proj").alpha == 3
    with torch.no_grad():
        expected = reference(input_ids=ids()).logits
        got = model(ids())
        base = ours(base_dir)(ids())
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_gemmakit_adapter_loads_into_peft_with_same_logits(base_dir, tmp_path):
    model = ours(base_dir)
    config = LoraConfig(r=4, alpha=16, use_rslora=True)
    names = apply_lora(model, config)
    assert len(names) == 7 * 7
    randomise(lora_parameters(model))
    save_adapter(model, tmp_path, base_model_name="tiny-gemma3")  # the config apply_lora used
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-gemma3"
    reference = peft.PeftModel.from_pretrained(hf_model("gemma3"), tmp_path)
    with torch.no_grad():
        expected = reference(input_ids=ids(1)).logits
        got = model(ids(1))
    assert (expected - ours(base_dir)(ids(1))).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fresh_adapter_is_identity_and_only_adapters_train(base_dir):
    model = ours(base_dir)
    before = model(ids())
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"], dropout=0.1))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    model.eval()
    torch.testing.assert_close(model(ids()).detach(), before, atol=0, rtol=0)
    model(ids()).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    assert model.model.embed_tokens.weight.grad is None


def test_merge_unmerge_remove(base_dir):
    model = ours(base_dir)
    base = model(ids())
    apply_lora(model, LoraConfig(r=3, alpha=6))
    randomise(lora_parameters(model))
    adapted = model(ids())
    merge_lora(model, unload=False)
    assert all(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    torch.testing.assert_close(model(ids()), adapted, atol=1e-4, rtol=1e-4)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids()), adapted, atol=1e-4, rtol=1e-4)
    remove_lora(model)
    torch.testing.assert_close(model(ids()), base, atol=1e-5, rtol=1e-5)

    apply_lora(model, LoraConfig(r=3, alpha=6))
    randomise(lora_parameters(model), seed=5)
    adapted = model(ids())
    merge_lora(model)  # unload: plain nn.Linear again, canonical names only
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(ours(base_dir).state_dict())
    torch.testing.assert_close(model(ids()), adapted, atol=1e-4, rtol=1e-4)


def test_errors_name_the_problem(base_dir, tmp_path):
    model = ours(base_dir)
    with pytest.raises(InputError, match="matches no"):
        apply_lora(model, LoraConfig(target_modules=["nope"]))
    with pytest.raises(FormatError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, LoraConfig(r=2))
