"""gemmakit: Gemma text models end to end, faithful to the reference implementations.

    import gemmakit
    m = gemmakit.load("default")            # or an HF directory, a .gguf, a gemma_pytorch .ckpt
    m.generate("The capital of France is", max_new_tokens=16)
"""

from gemmakit.api import Gemma, load
from gemmakit.config import PRESETS, GemmaConfig
from gemmakit.errors import ConfigError, FormatError, GemmaKitError, InputError, TokenizerError
from gemmakit.model import Transformer

__all__ = [
    "PRESETS", "ConfigError", "FormatError", "Gemma", "GemmaConfig", "GemmaKitError", "InputError",
    "TokenizerError", "Transformer", "load",
]
__version__ = "0.1.0"
