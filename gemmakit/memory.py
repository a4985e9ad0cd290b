"""Will it fit? Refuse a load early, with the figures, instead of swapping or being killed half-way.

Why: converting or building a model that does not fit ends badly and late on Linux: the machine swaps for
minutes, or the OOM killer ends the process (and maybe another) without a word, after the user has waited for
most of the conversion. The kernel's own estimate of what can still be allocated without swapping is
`MemAvailable` in /proc/meminfo (free memory + the page cache and slab that can be reclaimed), so that is the
figure a load is checked against, once, before it starts. Where it is unknown (not Linux) nothing is refused.
`GEMMAKIT_SKIP_MEMORY_CHECK=1` turns the check off (a machine with swap the user wants to use, or an estimate
that is wrong for a case we did not foresee).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

from gemmakit.errors import InputError

GB = 1e9
SKIP_ENV = "GEMMAKIT_SKIP_MEMORY_CHECK"


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(need_bytes: int, what: str, where: str) -> None:
    """Raise `InputError` when `need_bytes` (an estimate of the memory `what` takes, for the file `where`) exceed
    the memory available now. Does nothing when the availability is unknown or `GEMMAKIT_SKIP_MEMORY_CHECK=1`."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    available = available_bytes()
    if available is None or need_bytes <= available:
        return
    raise InputError(
        f"{where}: {what} needs ~{need_bytes / GB:.1f} GB, this machine has {available / GB:.1f} GB available; "
        "free memory, or choose a smaller model or a scheme that keeps fewer bytes a weight (a GGUF file's "
        f"layers as stored, int4), or set {SKIP_ENV}=1 to try anyway (it may swap or be killed)")


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_freed() -> None:
    """Hand the C heap's freed pages back to the system (glibc's `malloc_trim(0)`), where there is one.

    Why: glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so after the first
    decoded tensor is dropped, later tensors of that size come from the heap, and the heap keeps their pages
    when they are freed between the converted buffers that outlive them. Measured on a 130M-parameter model
    with 16 MB tensors: streaming conversion grew anonymous memory by 525-590 MB (its fp32 size) without this,
    ~180 MB (the converted 130 MB + one tensor) with it. A streaming conversion calls it after each tensor.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
