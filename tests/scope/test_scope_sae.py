"""SAE maths and file formats: JumpReLU/TopK against hand computations, three formats round-trip exactly,
the sparse training kernel's gradients equal the plain straight-through reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import support.scope_support  # noqa: F401 - silences torch's sparse-beta warnings
from gemmakit import FormatError, scope
from gemmakit.errors import InputError
from gemmakit.scope import kernels
from gemmakit.scope.formats import gs1_info


def random_sae(arch: str = "jumprelu", d_in: int = 6, d_sae: int = 10, seed: int = 0) -> scope.SAE:
    g = torch.Generator().manual_seed(seed)
    sae = scope.make_sae(arch, d_in, d_sae, k=3 if arch == "topk" else None,
                         info=scope.SAEInfo(site="layers.2.resid_post", model_name="tiny", target_l0=3.0))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g))
    return sae


def test_jumprelu_forward_equals_hand_computation():
    sae = scope.JumpReLUSAE(2, 3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, -1.0]))
        sae.threshold.copy_(torch.tensor([1.0, 0.2, 2.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.1]))
    x = torch.tensor([[2.0, 2.0]])
    # pre = [2+1, -2+2+0.5, 4-1] = [3, 0.5, 3]; all above their thresholds [1, 0.2, 2.5]
    assert sae.encode(x).tolist() == [[3.0, 0.5, 3.0]]
    # x_hat = 3*[1,0] + 0.5*[0,1] + 3*[1,1] + [0.1,-0.1] = [6.1, 3.4]
    assert torch.allclose(sae(x), torch.tensor([[6.1, 3.4]]))
    x = torch.tensor([[1.0, 0.0]])  # pre = [1, -0.5, 1]: 1 is not > 1, -0.5 < 0.2, 1 < 2.5 -> all zero
    assert sae.encode(x).tolist() == [[0.0, 0.0, 0.0]]
    assert torch.allclose(sae(x), sae.b_dec)


def test_topk_keeps_k_largest_through_relu():
    sae = scope.TopKSAE(2, 4, k=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 2.0, -3.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    assert sae.encode(torch.tensor([[1.0, 0.0]])).tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert sae.encode(torch.tensor([[-1.0, 0.0]])).tolist() == [[0.0, 0.0, 3.0, 0.0]]  # second largest is < 0


@pytest.mark.parametrize("fmt,arch", [("gemma_scope_1", "jumprelu"), ("gemma_scope_2", "jumprelu"),
                                      ("saelens", "jumprelu"), ("saelens", "topk")])
def test_formats_round_trip_identically(tmp_path, fmt, arch):
    sae = random_sae(arch)
    folder = scope.save_sae(sae, tmp_path / "sae", fmt)
    assert scope.detect_format(folder)[0] == fmt
    back = scope.load_sae(folder)
    assert type(back) is type(sae)
    for name, t in sae.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    x = torch.randn(5, 6)
    assert torch.equal(back(x), sae(x))
    if fmt != "gemma_scope_1":  # GS1 keeps the site only in folder names
        assert back.info.site == "layers.2.resid_post"
    # saving again gives identical bytes of weights
    again = scope.save_sae(back, tmp_path / "again", fmt)
    assert all(torch.equal(a, b) for a, b in zip(scope.load_sae(again).tensors().values(),
                                                   back.tensors().values(), strict=True))


def test_gemma_scope_1_folder_names_give_layer_site_width_l0(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    scope.save_sae(random_sae(), folder, "gemma_scope_1")
    sae = scope.load_sae(folder / "params.npz")
    assert sae.info.site == "layers.12.resid_post" and sae.info.target_l0 == 82
    assert gs1_info(folder / "params.npz").extra["width_label"] == "16k"
    assert gs1_info(tmp_path / "gemma-scope-9b-pt-att/layer_3/width_16k/average_l0_9/params.npz").site == \
        "layers.3.attn_out"


def test_gemma_scope_2_config_uses_hf_hook_names(tmp_path):
    sae = random_sae()
    sae.info.site = "layers.5.mlp_out"
    folder = scope.save_sae(sae, tmp_path / "gs2", "gemma_scope_2")
    config = json.loads((folder / "config.json").read_text())
    assert config["hf_hook_point_in"] == "model.layers.5.post_feedforward_layernorm.output"
    assert config["architecture"] == "jump_relu" and config["width"] == 10
    config["hf_hook_point_out"] = "model.layers.6.output"  # a transcoder: refused, naming the file
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="config.json"):
        scope.load_sae(folder)


def test_saelens_config_names_transformerlens_hooks(tmp_path):
    sae = random_sae()
    sae.info.site = "layers.3.attn_out"
    cfg = json.loads((scope.save_sae(sae, tmp_path / "s") / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.attn.hook_z" and cfg["reshape_activations"] == "hook_z"
    del cfg["gemmakit"]  # a plain SAELens folder: the site comes from the TransformerLens hook name
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    assert scope.load_sae(tmp_path / "s").info.site == "layers.3.attn_out"


def test_bad_files_raise_format_errors_naming_the_file(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="bad.npz"):
        scope.load_sae(tmp_path / "bad.npz")
    obj = tmp_path / "obj" / "params.npz"
    obj.parent.mkdir()
    np.savez(obj, W_enc=np.array([{"a": 1}], dtype=object))  # pickled objects are never loaded
    with pytest.raises(FormatError, match="params.npz"):
        scope.load_sae(obj)
    short = tmp_path / "short"
    scope.save_sae(random_sae(), short, "gemma_scope_1")
    with np.load(short / "params.npz") as d:
        arrays = {k: d[k] for k in d.files if k != "threshold"}
    np.savez(short / "params.npz", **arrays)
    with pytest.raises(FormatError, match="threshold"):
        scope.load_sae(short)
    with pytest.raises(FormatError, match="not an SAE"):
        scope.load_sae(tmp_path / "obj" / "..")  # a folder with no SAE file directly in it
    with pytest.raises(InputError, match="JumpReLU"):
        scope.save_sae(random_sae("topk"), tmp_path / "x", "gemma_scope_2")


@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("dense", [True, False])
def test_sparse_training_kernel_matches_reference_gradients(k, dense, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_FRACTION", 1.0 if not dense else 0.0)
    torch.manual_seed(0)
    x = torch.randn(48, 12)
    params = [torch.randn(12, 64), torch.randn(64) * 0.1, torch.rand(64) * 2 + 0.5, torch.randn(64, 12),
              torch.randn(12)]
    params = [p.requires_grad_() for p in params]
    threshold = params[2] if k == 0 else None
    x_hat, l0, fired = kernels.sae_step(x, params[0], params[1], threshold, params[3], params[4], k, eps=0.5)
    ref_hat, ref_l0 = kernels.reference_step(x, params[0], params[1], threshold, params[3], params[4], k, eps=0.5)
    assert torch.allclose(x_hat, ref_hat, atol=1e-4) and torch.equal(l0, ref_l0)
    assert int(fired.sum()) == int(l0.sum())
    wrt = [p for i, p in enumerate(params) if k == 0 or i != 2]
    ours = torch.autograd.grad(x_hat.pow(2).sum() + 0.3 * l0.pow(2).sum(), wrt)
    ref = torch.autograd.grad(ref_hat.pow(2).sum() + 0.3 * ref_l0.pow(2).sum(), wrt)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))
    if k == 0:
        assert float(ours[2].abs().sum()) > 0  # the threshold does get straight-through gradient
