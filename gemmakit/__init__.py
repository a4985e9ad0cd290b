"""gemmakit: Gemma text models end to end, faithful to the reference implementations.

    import gemmakit
    m = gemmakit.load("default")            # or an HF directory, a .gguf, a gemma_pytorch .ckpt
    m.generate("The capital of France is", max_new_tokens=16)
"""

import os

# OpenMP threads that finish a parallel region spin before they sleep (libgomp: 300,000 spins by default). On a
# small machine serving requests, that spinning takes the cores from the server's own Python threads after every
# decode step: `gemmakit serve` on 2 cores made 34 tok/s for one stream and 40 for eight (ITL 26 and 192 ms);
# with 10,000 spins, 91 and 195 (bench/serve_bench.py), while a decode alone in one process is unchanged (the
# native step's barriers inside its one region still meet within the spin). libgomp reads this when it loads,
# so it is set before torch is imported, and never over a value the user chose.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from gemmakit.api import Gemma, load  # noqa: E402
from gemmakit.config import PRESETS, GemmaConfig  # noqa: E402
from gemmakit.errors import ConfigError, FormatError, GemmaKitError, InputError, TokenizerError  # noqa: E402
from gemmakit.model import Transformer  # noqa: E402

__all__ = [
    "PRESETS", "ConfigError", "FormatError", "Gemma", "GemmaConfig", "GemmaKitError", "InputError",
    "TokenizerError", "Transformer", "load",
]
__version__ = "0.1.0"
