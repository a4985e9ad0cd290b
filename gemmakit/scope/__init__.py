"""gemmakit.scope: look inside a Gemma model with sparse autoencoders, Gemma Scope style.

    from gemmakit import scope
    sae = scope.load_sae(path)                     # Gemma Scope 1, Gemma Scope 2 or SAELens folder
    with scope.capture(model, ["layers.9.resid_post"]) as acts:
        model.logits(ids)
    f = sae.encode(acts["layers.9.resid_post"])

Modules: sites (capture, hooks, steering, splicing), sae (JumpReLU, TopK), formats, store (activations on
disk), train, kernels (the sparse training step), metrics, explore, dashboard, cli.
"""

from gemmakit.scope.formats import FORMATS, detect_format, load_sae, save_sae
from gemmakit.scope.metrics import SAEMetrics, evaluate
from gemmakit.scope.sae import SAE, JumpReLUSAE, SAEInfo, TopKSAE, make_sae
from gemmakit.scope.sites import KINDS, activations, capture, hook, parse_site, site_module, splice, steer
from gemmakit.scope.store import ActivationStore, build_store
from gemmakit.scope.train import TrainConfig, Trainer, train_saes

__all__ = [
    "FORMATS", "KINDS", "SAE", "ActivationStore", "JumpReLUSAE", "SAEInfo", "SAEMetrics", "TopKSAE", "TrainConfig",
    "Trainer", "activations", "build_store", "capture", "detect_format", "evaluate", "hook", "load_sae",
    "make_sae", "parse_site", "save_sae", "site_module", "splice", "steer", "train_saes",
]
