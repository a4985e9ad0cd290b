"""Building and loading the native library: compiled on first use with the system's C++ compiler, cached.

`g++ -O3 -march=native -fopenmp` over the sources in this folder (a few seconds) writes
`$GEMMAKIT_CACHE/native/gemmakit-<key>.so`, keyed by the sources, the compiler's version, the flags and the CPU's
flags, so an edit, a new compiler or another machine builds anew. The file appears atomically (parallel builds
are safe). Without a compiler, or with `GEMMAKIT_NATIVE=0`, `library()` returns None and says why once.
One source per concern: `layers.cpp` (the decode step), `head.cpp` (LM heads, ranker, argmax), `abi.cpp`
(struct layouts), `blocks.cpp` (matrix-vector products over a GGUF file's own blocks, whose kernels are in
`blocks.h` for the decode step to inline); a kernel for another weight format gets a file of its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from gemmakit.decoding.native import abi

HERE = Path(__file__).parent
SOURCES = (HERE / "layers.cpp", HERE / "head.cpp", HERE / "abi.cpp", HERE / "blocks.cpp", HERE / "dequant.cpp",
           HERE / "prompt.cpp", HERE / "gemm.cpp")
HEADERS = (HERE / "common.h", HERE / "blocks.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off")


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def library_path(cxx: str) -> Path:
    """Where the library built from these sources by this compiler for this CPU lives."""
    from gemmakit.weights.converted import cache_root

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.name.encode() + path.read_bytes())
    key.update(version.encode() + " ".join(FLAGS).encode() + _cpu_flags().encode())
    return cache_root() / "native" / f"gemmakit-{key.hexdigest()[:16]}.so"


def build(cxx: str) -> Path:
    """Compile the library unless it is cached."""
    target = library_path(cxx)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    print(f"[gemmakit: building the native decode step with {Path(cxx).name} (once, a few seconds)]",
          file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {HERE}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_LIBRARY: ctypes.CDLL | None = None
_UNAVAILABLE: str | None = None


def library() -> ctypes.CDLL | None:
    """The loaded, layout-checked library, built the first time; None (with one warning) when it cannot be had."""
    global _LIBRARY, _UNAVAILABLE
    if _LIBRARY is not None or _UNAVAILABLE is not None:
        return _LIBRARY
    cxx = compiler()
    try:
        if os.environ.get("GEMMAKIT_NATIVE", "1") == "0":
            raise RuntimeError("GEMMAKIT_NATIVE=0")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        lib = ctypes.CDLL(str(build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _UNAVAILABLE = str(err)
        if os.environ.get("GEMMAKIT_NATIVE") != "0":
            warnings.warn(f"gemmakit's native decode step is unavailable, decoding stays eager: {err}", stacklevel=2)
        return None
    abi.check(lib)  # a layout mismatch is a bug in gemmakit: raise, never run with it
    abi.bind_functions(lib)
    _LIBRARY = lib
    return lib


def unavailable_reason() -> str | None:
    """Why `library()` returned None (after it was called), else None."""
    return _UNAVAILABLE
