"""Train JumpReLU (Gemma Scope recipe) or TopK SAEs from stored activations; several sparsity targets per pass.

Recipe and why:
- Inputs are divided by one scalar s so that E||x||^2 = 1: bandwidth, threshold init and learning rate then
  mean the same at every layer and site. s is folded back into b_enc, b_dec and theta on save.
- JumpReLU gradients use straight-through estimators with a rectangle kernel of bandwidth eps (see kernels.py).
- Sparsity: Gemma Scope 2's quadratic penalty around a target L0, lambda*(L0/target - 1)^2, so each SAE lands
  near the L0 it was asked for; the linear lambda*L0 of Gemma Scope 1 is available too. lambda is warmed up.
- The threshold is trained directly, not as log(theta): Adam moves a parameter by ~lr per step, which for
  log(theta) is a factor (1 +- lr) and stalls L0 in short runs. theta stays float32 and positive.
- Decoder rows have unit norm: the gradient's component along each row is removed before the step and rows
  are renormalised after it.
- theta starts per latent at the quantile of its pre-activation that gives the target firing rate, so short
  CPU runs neither begin with half the latents firing (slow, dense) nor with dead latents.
- Every SAE of one run sees the same batches; checkpoints hold weights, optimiser states and the step, and the
  batch order is a pure function of (seed, step), so a resumed run continues exactly.

Dead latents (two remedies; a latent is dead at step S when it has not fired in the `window` steps before S):
- AuxK (TopK SAEs, Gao et al. 2024 "Scaling and evaluating sparse autoencoders", on by default): with
  e = x - x_hat (the main reconstruction's residual, held fixed), the k_aux largest pre-activations among the dead
  latents (ReLU'd, the others zero) decode without b_dec to e_hat, and L + auxk_coeff * ||e - e_hat||^2 is
  minimised, auxk_coeff = 1/32 and k_aux = d_in // 2 by default (the paper: a power of two near d_model / 2). The
  paper's dead window is 10M tokens; here it is that many steps' worth, capped at a tenth of the run so that
  short runs use it too (`dead_window` sets it in steps).
- Resampling (both architectures, off by default; Anthropic 2023 "Towards Monosemanticity"): every
  `resample_every` steps, latents that have not fired in the last `resample_every` steps are re-initialised
  towards inputs the SAE reconstructs badly: `resample_rows` rows (a pure function of seed and step) are scored
  by their squared error err = ||x - x_hat||^2 and drawn with probability proportional to err^2 (without
  replacement while possible); each dead latent gets its drawn input's direction v = (x - b_dec) / ||x - b_dec||
  as its decoder row and 0.2 * (mean encoder-column norm of the live latents) * v as its encoder column, b_enc
  that makes its pre-activation (x - b_dec) . W_enc (zero bias relative to b_dec, as in the paper), for JumpReLU
  a threshold of half its pre-activation on that input (so it fires there), and its Adam moments are zeroed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from gemmakit.errors import InputError
from gemmakit.scope.formats import save_sae, width_label
from gemmakit.scope.kernels import sae_step
from gemmakit.scope.sae import SAE, JumpReLUSAE, SAEInfo, TopKSAE


class ActivationSource(Protocol):
    """Rows of activations: an in-memory tensor or an on-disk `ActivationStore`."""

    d: int

    def __len__(self) -> int: ...

    def rows(self, index: torch.Tensor) -> torch.Tensor: ...


class TensorSource:
    """Activations already in memory [N, d]."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.float()
        self.d = x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.x[index]


@dataclass
class TrainConfig:
    architecture: str = "jumprelu"  # or "topk"
    width: int = 16384
    targets: Sequence[float] = (60.0,)  # target L0 per SAE (k for TopK)
    batch_size: int = 4096
    steps: int = 2000
    lr: float = 5e-4
    lr_warmup_steps: int = 100  # from 0.1 lr, as Gemma Scope
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last part of the run
    sparsity: str = "quadratic"  # "quadratic" (target L0, Gemma Scope 2) or "linear" (lambda*L0, Gemma Scope 1)
    sparsity_coeff: float = 1.0
    sparsity_warmup_steps: int = 200
    bandwidth: float = 1e-3  # in normalised units
    threshold_init: float | None = None  # None: per-latent quantile for the target rate (see module docstring)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    scale_sample: int = 32768
    auxk_coeff: float = 1 / 32  # TopK only: weight of the AuxK loss on dead latents; 0 turns it off
    auxk_k: int | None = None  # dead latents AuxK may use per row; None = d_in // 2
    dead_window: int | None = None  # steps without firing that make a latent dead for AuxK; None: see docstring
    resample_every: int = 0  # steps between resamplings of dead latents; 0 = never
    resample_rows: int = 16384  # inputs scored when resampling

    def __post_init__(self) -> None:
        if self.architecture not in ("jumprelu", "topk"):
            raise InputError(f"architecture must be 'jumprelu' or 'topk', got {self.architecture!r}")
        if not self.targets or any(t <= 0 or t >= self.width for t in self.targets):
            raise InputError(f"sparsity targets must lie in (0, width={self.width}), got {list(self.targets)}")
        if self.sparsity not in ("quadratic", "linear"):
            raise InputError(f"sparsity must be 'quadratic' or 'linear', got {self.sparsity!r}")
        if self.batch_size < 1 or self.steps < 1:
            raise InputError("batch_size and steps must be >= 1")
        if self.auxk_coeff < 0 or (self.auxk_k is not None and self.auxk_k < 1):
            raise InputError(f"auxk_coeff must be >= 0 and auxk_k >= 1, got {self.auxk_coeff}, {self.auxk_k}")
        if self.resample_every < 0 or self.resample_rows < 1 or (self.dead_window is not None and self.dead_window < 1):
            raise InputError("resample_every must be >= 0, resample_rows >= 1 and dead_window >= 1")
        self.targets = tuple(float(t) for t in self.targets)

    def name(self, target: float) -> str:
        return f"{self.architecture}_w{width_label(self.width)}_l0_{target:g}"

    def auxk_window(self) -> int:
        """Steps without firing after which AuxK treats a latent as dead (see the module docstring)."""
        if self.dead_window is not None:
            return self.dead_window
        return max(1, min(math.ceil(10_000_000 / self.batch_size), self.steps // 10))


@dataclass
class TrainState:
    """Running statistics of one SAE, logged and saved with it."""

    last_fired: torch.Tensor  # the step each latent last fired at, -1 for never
    history: list[dict] = field(default_factory=list)
    resampled: list[list[int]] = field(default_factory=list)  # [step, latents resampled] per resampling

    def dead(self, step: int, window: int) -> torch.Tensor:
        """Mask of latents that have not fired in the `window` steps before `step`."""
        return step - self.last_fired > window


class BatchOrder:
    """Shuffled row indices per step, a pure function of (seed, step): resuming needs no saved iterator."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise InputError(f"{n} activation rows is fewer than one batch of {batch_size}; store more tokens "
                             "or lower the batch size")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        return idx.sort().values  # sorted reads from a memory map are sequential-ish; order is irrelevant


def input_scale(source: ActivationSource, sample: int, seed: int) -> tuple[float, torch.Tensor]:
    """s with E||x/s||^2 = 1, and the mean of x/s (b_dec's start), from a deterministic sample of rows."""
    n = len(source)
    g = torch.Generator().manual_seed(seed + 17)
    idx = torch.randperm(n, generator=g)[: min(n, sample)].sort().values
    x = source.rows(idx).float()
    s = float(x.pow(2).sum(1).mean().sqrt())
    if not math.isfinite(s) or s == 0:
        raise InputError(f"activations have mean squared norm {s ** 2}; cannot normalise")
    return s, (x / s).mean(0)


def init_sae(config: TrainConfig, target: float, d: int, mean: torch.Tensor, x: torch.Tensor, info: SAEInfo,
             generator: torch.Generator) -> SAE:
    """Unit-norm random decoder rows, encoder = decoder transpose, b_dec = data mean, theta per latent."""
    info = SAEInfo(site=info.site, model_name=info.model_name, target_l0=target, extra=dict(info.extra))
    if config.architecture == "topk":
        sae: SAE = TopKSAE(d, config.width, int(round(target)), info)
    else:
        sae = JumpReLUSAE(d, config.width, info)
    with torch.no_grad():
        w = torch.randn(config.width, d, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.t())
        sae.b_dec.copy_(mean)
        if isinstance(sae, JumpReLUSAE):
            if config.threshold_init is not None:
                sae.threshold.fill_(config.threshold_init)
            else:
                pre = (x - mean) @ sae.W_enc  # b_enc = 0
                rank = max(1, min(x.shape[0] - 1, round(x.shape[0] * (1 - target / config.width))))
                theta = pre.kthvalue(rank, dim=0).values
                sae.threshold.copy_(theta.clamp(min=1e-4))
        sae.b_enc.copy_(-(mean @ sae.W_enc))  # centre: pre = (x - mean) @ W_enc at the start
    return sae


def lr_at(config: TrainConfig, step: int) -> float:
    if step < config.lr_warmup_steps:
        return config.lr * (0.1 + 0.9 * step / config.lr_warmup_steps)
    decay_start = int(config.steps * (1 - config.lr_decay_fraction))
    if config.lr_decay_fraction > 0 and step >= decay_start:
        return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - decay_start))
    return config.lr


class Trainer:
    """Trains one SAE per target on the same batches. `run()` returns the SAEs with the input scale folded in."""

    def __init__(self, source: ActivationSource, config: TrainConfig, out_dir: str | Path | None = None,
                 info: SAEInfo | None = None, log=print) -> None:
        self.source, self.config = source, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.info = info or SAEInfo()
        self.log = log
        self.order = BatchOrder(len(source), config.batch_size, config.seed)
        self.scale, mean = input_scale(source, config.scale_sample, config.seed)
        g = torch.Generator().manual_seed(config.seed)
        x0 = source.rows(self.order(0)).float() / self.scale
        self.saes = [init_sae(config, t, source.d, mean, x0, self.info, g) for t in config.targets]
        betas = (0.0, 0.999) if config.architecture == "jumprelu" else (0.9, 0.999)
        self.opts = [torch.optim.Adam(sae.parameters(), lr=config.lr, betas=betas, eps=1e-8) for sae in self.saes]
        self.states = [TrainState(torch.full((config.width,), -1, dtype=torch.long)) for _ in self.saes]
        self.step = 0
        self.tokens_per_s = 0.0
        if self.out_dir is not None and (self.out_dir / "checkpoint.pt").exists():
            self._load_checkpoint()

    # --- one step -------------------------------------------------------------------------------------------
    def _loss(self, sae: SAE, target: float, x: torch.Tensor, step: int, state: TrainState) -> dict[str, float]:
        c = self.config
        threshold = sae.threshold if isinstance(sae, JumpReLUSAE) else None
        k = sae.k if isinstance(sae, TopKSAE) else 0
        x_hat, l0, fired = sae_step(x, sae.W_enc, sae.b_enc, threshold, sae.W_dec, sae.b_dec, k, c.bandwidth)
        err = (x_hat - x).pow(2).sum(1)
        loss = err.mean()
        mean_l0 = l0.mean()
        extra = {}
        if k == 0:
            lam = c.sparsity_coeff * min(1.0, step / max(1, c.sparsity_warmup_steps))
            if c.sparsity == "quadratic":
                loss = loss + lam * (mean_l0 / target - 1).pow(2)
            else:
                loss = loss + lam * mean_l0
        elif c.auxk_coeff > 0:
            aux = auxk_loss(sae, x, x_hat, state.dead(step, c.auxk_window()), c.auxk_k)
            loss = loss + c.auxk_coeff * aux
            extra["auxk"] = aux.item()
        loss.backward()
        state.last_fired[fired > 0] = step
        with torch.no_grad():
            fvu = float(err.sum() / (x - x.mean(0)).pow(2).sum())
        return {"loss": loss.item(), "mse": err.mean().item(), "fvu": fvu, "l0": mean_l0.item(), **extra}

    # --- resampling dead latents ------------------------------------------------------------------------------
    def resample(self, i: int) -> int:
        """Re-initialise SAE i's dead latents towards badly reconstructed inputs (rule: module docstring)."""
        c, sae, opt, state = self.config, self.saes[i], self.opts[i], self.states[i]
        dead = torch.nonzero(state.dead(self.step, c.resample_every)).flatten()
        if dead.numel() == 0:
            return 0
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + 7919 * self.step + i + 1)
        n = len(self.source)
        idx = torch.randperm(n, generator=g)[: min(n, c.resample_rows)].sort().values
        x = self.source.rows(idx).float() / self.scale
        with torch.no_grad():
            weight = (sae(x) - x).pow(2).sum(1).pow(2)
        if not bool((weight > 0).any()):
            return 0
        picks = torch.multinomial(weight, dead.numel(), replacement=int((weight > 0).sum()) < dead.numel(),
                                  generator=g)
        resample_latents(sae, opt, dead, x[picks])
        state.last_fired[dead] = self.step  # a fresh window to learn in before counting as dead again
        state.resampled.append([self.step, int(dead.numel())])
        return int(dead.numel())

    @staticmethod
    def _constrain_grad(sae: SAE) -> None:
        """Remove each decoder row's gradient component along the row (keeps the unit norm to first order)."""
        w, g = sae.W_dec.data, sae.W_dec.grad
        if g is not None:
            g -= (g * w).sum(1, keepdim=True) * w

    @staticmethod
    def _constrain_weights(sae: SAE) -> None:
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
            if isinstance(sae, JumpReLUSAE):
                sae.threshold.clamp_(min=1e-6)

    def train_step(self) -> list[dict[str, float]]:
        step = self.step
        if self.config.resample_every and step > 0 and step % self.config.resample_every == 0:
            counts = [self.resample(i) for i in range(len(self.saes))]
            if any(counts):
                self.log(f"step {step}: resampled {counts} dead latents")
        x = self.source.rows(self.order(step)).float() / self.scale
        stats = []
        for sae, opt, target, state in zip(self.saes, self.opts, self.config.targets, self.states, strict=True):
            for group in opt.param_groups:
                group["lr"] = lr_at(self.config, step)
            opt.zero_grad(set_to_none=True)
            stats.append(self._loss(sae, target, x, step, state))
            self._constrain_grad(sae)
            opt.step()
            self._constrain_weights(sae)
        self.step += 1
        return stats

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self) -> list[SAE]:
        c = self.config
        window: list[list[dict[str, float]]] = []
        start, start_step = time.perf_counter(), self.step
        while self.step < c.steps:
            window.append(self.train_step())
            if self.step % c.log_every == 0 or self.step == c.steps:
                elapsed = time.perf_counter() - start
                self.tokens_per_s = (self.step - start_step) * c.batch_size / max(elapsed, 1e-9)
                self._log(window)
                window = []
            if self.out_dir is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()
        if self.out_dir is not None:
            self.save_checkpoint()
        return self.export()

    def _log(self, window: list[list[dict[str, float]]]) -> None:
        parts = []
        for i, target in enumerate(self.config.targets):
            keys = [k for k in window[-1][i] if all(k in s[i] for s in window)]  # auxk appears once on
            avg = {k: sum(s[i][k] for s in window) / len(window) for k in keys}
            dead = self.dead_fraction(i)
            avg.update(step=self.step, dead=dead)
            self.states[i].history.append(avg)
            parts.append(f"[L0 target {target:g}] l0 {avg['l0']:.1f} fvu {avg['fvu']:.3f} dead {dead:.1%}")
        self.log(f"step {self.step}/{self.config.steps}  {self.tokens_per_s:,.0f} tok/s  " + "  ".join(parts))

    def dead_fraction(self, i: int, window: int = 1000) -> float:
        """Latents that have not fired in the last `window` steps (all steps so far early on)."""
        if self.step < window:
            return float((self.states[i].last_fired < 0).float().mean()) if self.step > 0 else 0.0
        return float((self.states[i].last_fired < self.step - window).float().mean())

    def export(self) -> list[SAE]:
        """Copies of the SAEs that take raw activations (scale folded in), saved under out_dir/<name>."""
        out = []
        for sae, target, state in zip(self.saes, self.config.targets, self.states, strict=True):
            copy = type(sae)(**_ctor_args(sae))
            copy.load_state_dict(sae.state_dict())
            copy.scale_inputs(self.scale)
            copy.info.extra.update(training=dict(
                steps=self.step, tokens=self.step * self.config.batch_size, input_scale=self.scale,
                final=state.history[-1] if state.history else None,
                config={k: v for k, v in asdict(self.config).items() if k != "targets"}))
            if self.out_dir is not None:
                save_sae(copy, self.out_dir / self.config.name(target))
            out.append(copy.eval())
        return out

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        blob = {"step": self.step, "scale": self.scale, "config": json.dumps(asdict(self.config)),
                "saes": [sae.state_dict() for sae in self.saes], "opts": [o.state_dict() for o in self.opts],
                "last_fired": [s.last_fired for s in self.states],
                "history": json.dumps([s.history for s in self.states]),
                "resampled": json.dumps([s.resampled for s in self.states])}
        tmp = self.out_dir / "checkpoint.pt.tmp"
        torch.save(blob, tmp)
        tmp.replace(self.out_dir / "checkpoint.pt")

    def _load_checkpoint(self) -> None:
        assert self.out_dir is not None
        path = self.out_dir / "checkpoint.pt"
        blob = torch.load(path, weights_only=True)
        saved = json.loads(blob["config"])
        now = asdict(self.config)
        for key in ("architecture", "width", "targets", "batch_size", "seed"):
            a, b = saved[key], now[key]
            if key == "targets":
                a, b = [float(v) for v in a], [float(v) for v in b]
            if a != b:
                raise InputError(f"{path}: checkpoint was made with {key}={a}, this run has {b}; use another "
                                 "output folder or the same settings")
        self.step, self.scale = int(blob["step"]), float(blob["scale"])
        for sae, opt, sd, od in zip(self.saes, self.opts, blob["saes"], blob["opts"], strict=True):
            sae.load_state_dict(sd)
            opt.load_state_dict(od)
        resampled = json.loads(blob.get("resampled", "null")) or [[] for _ in self.states]
        for state, lf, hist, rs in zip(self.states, blob["last_fired"], json.loads(blob["history"]), resampled,
                                       strict=True):
            state.last_fired, state.history, state.resampled = lf, hist, rs
        self.log(f"resumed from {path} at step {self.step}")


def auxk_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: int | None = None
              ) -> torch.Tensor:
    """Gao et al.'s auxiliary loss: ||e - e_hat||^2 (mean over rows), e = x - x_hat held fixed, e_hat decoded
    (without b_dec) from the k_aux largest ReLU'd pre-activations among the `dead` latents; 0 when none is dead."""
    index = torch.nonzero(dead).flatten()
    if index.numel() == 0:
        return x.new_zeros(())
    k_aux = min(k_aux or max(1, sae.d_in // 2), index.numel())
    pre = x @ sae.W_enc[:, index] + sae.b_enc[index]
    values, top = pre.topk(k_aux, dim=1)
    z = torch.zeros_like(pre).scatter(1, top, torch.relu(values))
    e_hat = z @ sae.W_dec[index]
    return (e_hat - (x - x_hat).detach()).pow(2).sum(1).mean()


def resample_latents(sae: SAE, opt: torch.optim.Optimizer, latents: torch.Tensor, inputs: torch.Tensor) -> None:
    """Point `latents` at `inputs` (one row each, in training units) as Anthropic's resampling does, and zero their
    Adam moments: decoder row v = (x - b_dec)/||x - b_dec||, encoder column 0.2 * mean live encoder norm * v,
    bias so that pre = (x - b_dec) . W_enc, JumpReLU threshold half the pre-activation on its input."""
    with torch.no_grad():
        v = inputs - sae.b_dec
        v /= v.norm(dim=1, keepdim=True).clamp(min=1e-8)
        live = torch.ones(sae.d_sae, dtype=torch.bool)
        live[latents] = False
        norm = float(sae.W_enc[:, live].norm(dim=0).mean()) if bool(live.any()) else 1.0
        sae.W_dec[latents] = v
        sae.W_enc[:, latents] = (0.2 * norm * v).t()
        sae.b_enc[latents] = -(sae.b_dec @ sae.W_enc[:, latents])
        if isinstance(sae, JumpReLUSAE):
            pre = ((inputs - sae.b_dec) * sae.W_enc[:, latents].t()).sum(1)
            sae.threshold[latents] = (0.5 * pre).clamp(min=1e-6)
    for name, param in sae.named_parameters():
        state = opt.state.get(param)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if name == "W_enc":
                    state[key][:, latents] = 0
                elif name in ("W_dec", "b_enc", "threshold"):
                    state[key][latents] = 0


def _ctor_args(sae: SAE) -> dict:
    args = dict(d_in=sae.d_in, d_sae=sae.d_sae,
                info=SAEInfo(sae.info.site, sae.info.model_name, sae.info.target_l0, sae.info.apply_b_dec_to_input,
                             dict(sae.info.extra)))
    if isinstance(sae, TopKSAE):
        args["k"] = sae.k
    return args


def train_saes(source: ActivationSource | torch.Tensor, config: TrainConfig, out_dir: str | Path | None = None,
               info: SAEInfo | None = None, quiet: bool = False) -> list[SAE]:
    """Train one SAE per target in `config.targets` from `source`; resumes from out_dir/checkpoint.pt."""
    if isinstance(source, torch.Tensor):
        source = TensorSource(source)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return Trainer(source, config, out_dir, info, log).run()
