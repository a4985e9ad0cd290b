"""gemmakit's own C++ decode step: build (`build`), struct layouts (`abi`), the step decoder (`decoder`).

The C++ lives beside this file, one source per concern: `layers.cpp` (all layers of a token), `head.cpp` (LM
heads, the 3-bit ranker's pass, argmax), `abi.cpp` (struct layouts for the load-time check), `common.h`.
"""

from gemmakit.decoding.native.build import library, unavailable_reason
from gemmakit.decoding.native.decoder import MAX_BATCH, NativeDecoder, layer_formats, supports

__all__ = ["MAX_BATCH", "NativeDecoder", "layer_formats", "library", "supports", "unavailable_reason"]
