"""Which classifier scores `/v1/moderations` and the guard, decided once at start-up from the options.

- default: `ShieldClassifier` over the served model (any Gemma can be prompted this way; the embedded base 270M
  is no trained safety classifier, so its scores say little: use a ShieldGemma checkpoint for real screening);
- `--moderation-model PATH`: a second model, e.g. ShieldGemma 2B, loaded next to the served one;
- `--moderation-adapter DIR`: an agile classifier from `gemmakit safety train-agile`, applied to its own copy of
  the base model (`--moderation-model` or the served checkpoint), because loading an adapter changes a module in
  place and the served model must stay as it is.
The guard screens with the same model and its own policies (`--guard`), or with the agile classifier.
"""

from __future__ import annotations

import threading
from typing import Any

from gemmakit.serve.guard import ServeGuard
from gemmakit.serve.moderation import Moderator
from gemmakit.serve.options import ServeOptions


def build_moderator(gemma: Any, options: ServeOptions, moderation_model: Any | None,
                    lock: threading.Lock) -> Moderator | str:
    """The moderator, or why there is none (a vocabulary without single-token Yes/No cannot be prompted the
    ShieldGemma way): the server then runs without /v1/moderations, which answers with that reason."""
    from gemmakit.errors import GemmaKitError
    from gemmakit.safety import ShieldClassifier

    model = moderation_model if moderation_model is not None else gemma
    if options.moderation_adapter:
        from gemmakit import load
        from gemmakit.safety.agile import AgileClassifier

        base = model if moderation_model is not None else load(gemma.source, dtype="float32")  # LoRA needs float layers
        classifier = AgileClassifier.load(base, options.moderation_adapter)
        return Moderator(classifier, classifier.config.name, None, lock)
    try:
        classifier = ShieldClassifier(model, policies=options.moderation_policies,
                                      threshold=options.moderation_threshold)
    except GemmaKitError as e:
        if options.guard or options.moderation_model:  # asked for explicitly: refuse to start without it
            raise
        return f"moderation is not available with this model: {e}"
    name = options.moderation_model or options.model_name
    return Moderator(classifier, str(name), model, lock)


def build_guard(moderator: Moderator, options: ServeOptions, lock: threading.Lock) -> ServeGuard | None:
    if not options.guard:
        return None
    from gemmakit.safety import Guard, ShieldClassifier

    if moderator.model is None:  # an agile classifier: its one policy
        classifier = moderator.classifier
    else:
        classifier = ShieldClassifier(moderator.model, policies=options.guard, threshold=options.guard_threshold)
    guard = Guard(moderator.model, classifier=classifier, action=options.guard_action,
                  chunk_chars=options.guard_chunk_chars)
    return ServeGuard(guard, lock)
