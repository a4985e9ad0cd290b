"""One exception family for gemmakit, so callers can catch everything we raise on purpose.

Messages name the file or argument, what was expected, what was found, and the fix when there is one.
"""

from __future__ import annotations


class GemmaKitError(Exception):
    """Base class of every error gemmakit raises deliberately."""


class FormatError(GemmaKitError):
    """A weight, tokenizer or SAE file is malformed, truncated or of an unsupported kind."""


class ConfigError(GemmaKitError):
    """A model configuration is missing, inconsistent or names an unknown architecture."""


class TokenizerError(GemmaKitError):
    """A tokenizer cannot be built from the files given, or cannot encode/decode the input."""


class InputError(GemmaKitError):
    """A caller's argument is invalid: prompt too long, bad sampling value, wrong shape."""
