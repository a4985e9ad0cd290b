"""Training on synthetic sparse data: the true dictionary is recovered at the target L0; several targets in
one pass; the input scale folds into the saved weights; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from gemmakit import scope
from gemmakit.scope.train import TensorSource, TrainConfig, Trainer
from support.scope_support import one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def synthetic(d: int = 24, n_true: int = 64, l0: float = 3, n: int = 20000, seed: int = 0, scale: float = 7.0):
    """x = f @ D with unit-norm true directions D and ~l0 active latents per row; scaled to test folding."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    f = (torch.rand(n, n_true, generator=g) < l0 / n_true) * (torch.rand(n, n_true, generator=g) * 2 + 0.5)
    return dictionary, scale * (f @ dictionary)


def recovery(dictionary: torch.Tensor, sae: scope.SAE) -> torch.Tensor:
    """For each true direction, the best cosine similarity among the learned decoder rows."""
    dec = sae.W_dec.detach()
    return (dictionary @ (dec / dec.norm(dim=1, keepdim=True)).t()).max(1).values


@pytest.mark.parametrize("arch,steps", [("jumprelu", 400), ("topk", 300)])
def test_training_recovers_the_true_dictionary_at_the_target_l0(arch, steps):
    dictionary, x = synthetic()
    config = TrainConfig(architecture=arch, width=64, targets=(3,), batch_size=256, steps=steps, lr=3e-3,
                         bandwidth=0.01, sparsity_warmup_steps=50, lr_warmup_steps=20, log_every=100)
    (sae,) = scope.train_saes(x, config, quiet=True)
    cos = recovery(dictionary, sae)
    assert float(cos.mean()) > 0.95 and float((cos > 0.9).float().mean()) > 0.9, cos
    f = sae.encode(x[:4000])  # raw inputs: the training scale is folded into the weights
    l0 = float((f > 0).sum(1).float().mean())
    assert 2.5 < l0 < 3.5, l0
    with torch.no_grad():
        fvu = float((sae(x[:4000]) - x[:4000]).pow(2).sum() / (x[:4000] - x[:4000].mean(0)).pow(2).sum())
    assert fvu < 0.3, fvu


def test_several_targets_in_one_pass_land_near_each_target():
    _, x = synthetic(l0=6)
    config = TrainConfig(width=64, targets=(3, 12), batch_size=256, steps=250, lr=3e-3, bandwidth=0.01,
                         sparsity_warmup_steps=50, lr_warmup_steps=20, log_every=50)
    low, high = scope.train_saes(x, config, quiet=True)
    l0s = [float((s.encode(x[:4000]) > 0).sum(1).float().mean()) for s in (low, high)]
    assert abs(l0s[0] - 3) < 1.0 and abs(l0s[1] - 12) < 3.0, l0s


def test_input_scale_is_folded_into_the_exported_weights():
    _, x = synthetic()
    trainer = Trainer(TensorSource(x), TrainConfig(width=64, targets=(3,), batch_size=256, steps=20), log=print)
    for _ in range(20):
        trainer.train_step()
    (exported,) = trainer.export()
    s = trainer.scale
    assert s == pytest.approx(float(x.pow(2).sum(1).mean().sqrt()), rel=0.05)
    with torch.no_grad():
        assert torch.allclose(exported(x[:100]), trainer.saes[0](x[:100] / s) * s, atol=1e-4)
        assert torch.equal(exported.encode(x[:100]) > 0, trainer.saes[0].encode(x[:100] / s) > 0)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    _, x = synthetic(n=4000)
    config = TrainConfig(width=32, targets=(3, 5), batch_size=128, steps=40, lr=3e-3, checkpoint_every=20,
                         log_every=10)
    whole = scope.train_saes(x, config, tmp_path / "whole", quiet=True)
    part = Trainer(TensorSource(x), config, tmp_path / "part", log=lambda m: None)
    for _ in range(20):  # "crash" after the first checkpoint
        part.train_step()
    part.save_checkpoint()
    resumed = Trainer(TensorSource(x), config, tmp_path / "part", log=lambda m: None)
    assert resumed.step == 20
    for a, b in zip(whole, resumed.run(), strict=True):
        for name, t in a.tensors().items():
            assert torch.allclose(b.tensors()[name], t, atol=1e-6), name
    loaded = scope.load_sae(tmp_path / "part" / config.name(3))
    assert loaded.info.extra["training"]["steps"] == 40 and loaded.info.target_l0 == 3
    with pytest.raises(scope.train.InputError, match="width"):
        Trainer(TensorSource(x), TrainConfig(width=16, targets=(3, 5), batch_size=128), tmp_path / "part")
