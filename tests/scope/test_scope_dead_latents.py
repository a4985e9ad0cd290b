"""Dead latents: the AuxK loss of TopK SAEs (Gao et al. 2024) and resampling (Anthropic 2023), rules in
gemmakit/scope/train.py's docstring. AuxK is checked against the paper's formula written out row by row, and on a
synthetic dictionary it must leave fewer dead latents than the same run (same seed, same data) without it."""

from __future__ import annotations

import pytest
import torch

from gemmakit import scope
from gemmakit.scope.sae import TopKSAE
from gemmakit.scope.train import TensorSource, TrainConfig, Trainer, auxk_loss
from support.scope_support import one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def subspace_dictionary(d: int = 64, rank: int = 16, n_true: int = 128, l0: int = 4, n: int = 20000, seed: int = 0):
    """x = f @ D with n_true unit directions inside a rank-dim subspace of R^d (activations have low effective
    rank, which is where TopK latents die: many start pointing mostly outside the data) and ~l0 active per row."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
    dictionary = torch.randn(n_true, rank, generator=g) @ basis.t()
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    f = (torch.rand(n, n_true, generator=g) < l0 / n_true) * (torch.rand(n, n_true, generator=g) * 2 + 0.5)
    return dictionary, 7.0 * (f @ dictionary)


def dead_count(sae: scope.SAE, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(((sae.encode(x) > 0).sum(0) == 0).sum())


def random_topk(d: int = 12, width: int = 20, k: int = 3, seed: int = 0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, width, k)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def test_auxk_loss_is_the_papers_formula_and_reaches_only_dead_latents():
    sae = random_topk()
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    x_hat = sae(x).detach()
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 4, 5, 9, 13, 17]] = True
    got = auxk_loss(sae, x, x_hat, dead, k_aux=2)
    expected = 0.0
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        for row in range(7):  # the top-2 dead pre-activations, ReLU'd, decoded without b_dec, against x - x_hat
            cands = sorted(((float(pre[row, j]), j) for j in torch.nonzero(dead).flatten().tolist()), reverse=True)[:2]
            e_hat = sum(max(v, 0.0) * sae.W_dec[j] for v, j in cands)
            expected += float((e_hat - (x[row] - x_hat[row])).pow(2).sum()) / 7
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    live = ~dead
    assert float(sae.W_enc.grad[:, dead].abs().sum()) > 0 and float(sae.W_dec.grad[dead].abs().sum()) > 0
    assert float(sae.W_enc.grad[:, live].abs().sum()) == 0 and float(sae.W_dec.grad[live].abs().sum()) == 0
    assert sae.b_dec.grad is None or float(sae.b_dec.grad.abs().sum()) == 0
    assert float(auxk_loss(sae, x, x_hat, torch.zeros(20, dtype=torch.bool))) == 0.0


def test_auxk_leaves_fewer_dead_latents_than_the_same_run_without_it():
    """Same data, seed and batches; only auxk_coeff differs (0 against the paper's 1/32), over two seeds."""
    for seed in (0, 1):
        _, x = subspace_dictionary(seed=seed)
        counts = []
        for coeff in (0.0, 1 / 32):
            config = TrainConfig(architecture="topk", width=128, targets=(4,), batch_size=256, steps=600, lr=3e-3,
                                 lr_warmup_steps=20, log_every=1000, auxk_coeff=coeff, seed=seed)
            (sae,) = scope.train_saes(x, config, quiet=True)
            counts.append(dead_count(sae, x[:8000]))
        without, with_auxk = counts
        assert without > 0 and with_auxk < without, (seed, counts)


def test_resampling_follows_the_stated_rule(tmp_path):
    """Dead latents point at the inputs the SAE reconstructs worst (drawn with p ~ err^2), scaled encoders,
    centred biases, JumpReLU thresholds at half the new pre-activation, and zeroed Adam moments."""
    _, bulk = subspace_dictionary(d=32, rank=8, n_true=16, l0=2, n=4000)
    u = torch.zeros(32)
    u[0] = 1.0
    u -= (bulk[:500].t() @ torch.linalg.lstsq(bulk[:500].t(), u[:, None]).solution)[:, 0]  # off the data's span
    u /= u.norm()
    x = bulk.clone()
    x[::100] = 60.0 * u  # 1% of the rows lie where no latent points
    config = TrainConfig(width=24, targets=(2,), batch_size=200, steps=100, lr=3e-3, resample_every=50,
                         resample_rows=4000, log_every=1000)
    trainer = Trainer(TensorSource(x), config, log=lambda m: None)
    for _ in range(50):
        trainer.train_step()
    sae, opt, state = trainer.saes[0], trainer.opts[0], trainer.states[0]
    dead = torch.tensor([2, 7, 11, 19])
    state.last_fired.fill_(49)
    state.last_fired[dead] = -1  # these have never fired
    before = {name: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for name, p in sae.named_parameters()}
    live = torch.ones(24, dtype=torch.bool)
    live[dead] = False
    live_norm = sae.W_enc[:, live].norm(dim=0).mean().item()
    assert trainer.resample(0) == 4 and state.resampled == [[50, 4]]
    with torch.no_grad():
        # every new direction is some input's (x - b_dec); the 1% of rows along u carry nearly all the error
        assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(4), atol=1e-5)
        v = sae.W_dec[dead]
        assert torch.allclose(sae.W_enc[:, dead].t(), 0.2 * live_norm * v, atol=1e-5)
        assert torch.allclose(sae.b_enc[dead], -(sae.b_dec @ sae.W_enc[:, dead]), atol=1e-5)
        rows = x / trainer.scale - sae.b_dec
        rows = rows / rows.norm(dim=1, keepdim=True)
        match = (v @ rows.t()).max(1)  # each new decoder row is the direction of one input row
        assert bool((match.values > 1 - 1e-5).all()), match.values
        assert int((match.indices % 100 == 0).sum()) >= 3  # 1% of the data, nearly all of the squared error
        chosen = x[match.indices] / trainer.scale
        pre = (chosen * sae.W_enc[:, dead].t()).sum(1) + sae.b_enc[dead]
        assert bool((pre > 0).all()) and torch.allclose(sae.threshold[dead], 0.5 * pre, atol=1e-5)
        assert bool((sae.encode(chosen)[torch.arange(4), dead] > 0).all())  # each fires on its own input
    for name, p in sae.named_parameters():
        old, moments = before[name]
        for key in ("exp_avg", "exp_avg_sq"):
            new = opt.state[p][key]
            if name == "W_enc":
                assert float(new[:, dead].abs().sum()) == 0 and torch.equal(new[:, live], moments[key][:, live])
            elif name == "b_dec":
                assert torch.equal(new, moments[key]) and torch.equal(p.detach(), old)
            else:
                assert float(new[dead].abs().sum()) == 0 and torch.equal(new[live], moments[key][live])
        if name != "b_dec":
            live_part = p.detach()[:, live] if name == "W_enc" else p.detach()[live]
            assert torch.equal(live_part, old[:, live] if name == "W_enc" else old[live]), name
    assert bool((state.last_fired[dead] == 50).all())


def test_resampling_and_auxk_runs_resume_exactly(tmp_path):
    _, x = subspace_dictionary(d=32, rank=4, n_true=16, l0=2, n=4000)
    config = TrainConfig(architecture="topk", width=64, targets=(3,), batch_size=128, steps=40, lr=3e-3,
                         checkpoint_every=20, log_every=10, resample_every=10, resample_rows=1000, dead_window=5)
    (whole,) = scope.train_saes(x, config, tmp_path / "whole", quiet=True)
    part = Trainer(TensorSource(x), config, tmp_path / "part", log=lambda m: None)
    for _ in range(20):
        part.train_step()
    part.save_checkpoint()
    resumed = Trainer(TensorSource(x), config, tmp_path / "part", log=lambda m: None)
    assert resumed.states[0].resampled == part.states[0].resampled != []  # resampling happened before the crash
    (again,) = resumed.run()
    for name, t in whole.tensors().items():
        assert torch.allclose(again.tensors()[name], t, atol=1e-6), name
    assert "auxk" in whole.info.extra["training"]["final"]
