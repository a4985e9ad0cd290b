"""`gemmakit sae ...` end to end on a tiny model's activation store: train, info, convert."""

from __future__ import annotations

import json

import pytest
import torch

from gemmakit import scope
from gemmakit.cli import main
from support.scope_support import one_thread, tiny_gemma

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_sae_train_info_convert(tmp_path, capsys):
    model = tiny_gemma("gemma2", tmp_path)
    store = scope.build_store(model, "some words for the store to hold " * 30, tmp_path / "store",
                              ["layers.1.mlp_out"], context=32, progress=False)
    assert main(["sae", "train", "--store", str(store.folder), "--site", "layers.1.mlp_out", "--width", "48",
                 "--l0", "4", "8", "--steps", "30", "--batch-size", "64", "--log-every", "10",
                 "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "jumprelu_w48_l0_8"
    sae = scope.load_sae(out)
    assert sae.d_sae == 48 and sae.info.site == "layers.1.mlp_out" and sae.info.target_l0 == 8
    capsys.readouterr()
    assert main(["sae", "info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "saelens" in shown and "layers.1.mlp_out" in shown
    assert main(["sae", "convert", str(out), str(tmp_path / "gs2"), "--format", "gemma_scope_2"]) == 0
    config = json.loads((tmp_path / "gs2" / "config.json").read_text())
    assert config["hf_hook_point_in"] == "model.layers.1.post_feedforward_layernorm.output"
    assert torch.equal(scope.load_sae(tmp_path / "gs2").W_enc, sae.W_enc)
    assert main(["sae", "info", str(tmp_path / "missing")]) == 2  # a GemmaKitError, reported, not a traceback


def test_sae_train_passes_the_dead_latent_options(tmp_path, capsys):
    """--arch topk --auxk-coeff/--auxk-k/--dead-window/--resample-every reach the trainer (recorded with the SAE)."""
    model = tiny_gemma("gemma2", tmp_path)
    store = scope.build_store(model, "other words for a second store " * 30, tmp_path / "store",
                              ["layers.1.mlp_out"], context=32, progress=False)
    assert main(["sae", "train", "--store", str(store.folder), "--site", "layers.1.mlp_out", "--width", "48",
                 "--arch", "topk", "--l0", "4", "--steps", "12", "--batch-size", "64", "--log-every", "6",
                 "--auxk-coeff", "0.5", "--auxk-k", "8", "--dead-window", "3", "--resample-every", "6",
                 "--out", str(tmp_path / "run")]) == 0
    training = scope.load_sae(tmp_path / "run" / "topk_w48_l0_4").info.extra["training"]
    assert {k: training["config"][k] for k in ("auxk_coeff", "auxk_k", "dead_window", "resample_every")} == {
        "auxk_coeff": 0.5, "auxk_k": 8, "dead_window": 3, "resample_every": 6}
    assert "auxk" in training["final"]
