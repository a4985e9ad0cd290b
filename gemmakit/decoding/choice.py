"""The one place that decides which step decoder runs a model, and says why.

The rule, in order:
1. `compile=True` asked for: the compiled decoder (any model, any device; it compiles once per shape), except a
   model with GGUF-block layers: their products are native kernel calls that torch.compile cannot trace, so it
   gets the native decoder (rule 2), and the reason says so (`quant="int8"` gives a model that compiles).
2. Every layer linear int8 or a GGUF file's own blocks on CPU (the default load of a GGUF or an HF directory,
   `quant="int8..."` and "gguf-rescore" schemes) and the native library available: the native decoder
   (`GEMMAKIT_NATIVE=0` turns it off).
3. Otherwise the eager decoder, the module's own forward.
A decoder may still decline a step it cannot run (hooks registered, a batch wider than it serves): the engine
and the scheduler then run that step eagerly (`usable`), so hooks always see every token.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemmakit.decoding.protocol import EagerDecoder, StepDecoder
from gemmakit.model import Transformer


@dataclass(frozen=True)
class DecoderChoice:
    """The chosen decoder and a one-line reason, for `gemmakit info`, logs and the server's /health."""

    decoder: StepDecoder
    reason: str

    @property
    def name(self) -> str:
        return self.decoder.name


def choose_decoder(model: Transformer, compile: bool = False) -> DecoderChoice:
    """The step decoder for `model` (see the module docstring for the rule)."""
    from gemmakit.blocks import BlockLinear

    declined = ""
    if compile and any(isinstance(m, BlockLinear) for m in model.modules()):
        declined = ("compile=True declined: GGUF-block layers run native kernels torch.compile cannot trace "
                    "(quant='int8' compiles); ")
    elif compile:
        from gemmakit.decoding.compiled import CompiledDecoder

        return DecoderChoice(CompiledDecoder(model), "compile=True: torch.compile'd layers")
    from gemmakit.decoding import native

    if not native.supports(model):
        why = "not all layers are int8 or GGUF blocks" if model.device.type == "cpu" else f"device {model.device}"
        return DecoderChoice(EagerDecoder(model), f"{declined}module forward ({why}; the native step needs int8 or "
                                                  "GGUF-block layers on CPU)")
    lib = native.library()
    if lib is None:
        return DecoderChoice(EagerDecoder(model), f"{declined}module forward (native step unavailable: "
                                                  f"{native.unavailable_reason()})")
    return DecoderChoice(native.NativeDecoder(model, lib),
                         f"{declined}{native.layer_formats(model)} layers on CPU: all layers in one C++ call")
