"""A safe, bounded reader for GGUF files (llama.cpp's single-file model format, v2 and v3).

Why our own: a GGUF header is untrusted input. Every count and length in it is checked
against the bytes that remain in the file *before* anything is allocated or read, so a
corrupted or hostile file gives a ``FormatError`` naming the file and the offending field
(never a MemoryError, a hang or a bare struct/Unicode error). Tensor data is not read at
open time: the file is memory-mapped and ``raw()`` hands out zero-copy views.

Layout (all little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 kv count,
the key/value metadata, the tensor infos (name, u32 n_dims, u64 ne[n_dims], u32 ggml type,
u64 offset relative to the data section), padding up to ``general.alignment``, tensor data.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gemmakit.errors import FormatError, InputError
from gemmakit.weights.gguf_quants import BLOCK_SIZES, GGML_TYPES, dequantize, type_name

__all__ = ["GGML_TYPES", "GGUFFile", "GGUFTensorInfo"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
MAX_ARRAY_NESTING = 8  # nested metadata arrays deeper than this are refused (recursion bound)

# GGUF metadata value types (gguf spec `gguf_metadata_value_type`).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12
VALUE_TYPE_NAMES = {
    UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", UINT32: "uint32",
    INT32: "int32", FLOAT32: "float32", BOOL: "bool", STRING: "string", ARRAY: "array",
    UINT64: "uint64", INT64: "int64", FLOAT64: "float64",
}
# Fixed-size value types: struct format (scalars) and numpy dtype (arrays), little-endian.
_SCALAR_FORMATS = {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
    FLOAT32: "<f", BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d",
}
_ARRAY_DTYPES = {
    UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4",
    FLOAT32: "<f4", BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8",
}
# Smallest encoding of one value of each type, used to bound counts before looping.
_MIN_VALUE_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}
_MIN_VALUE_SIZE |= {STRING: 8, ARRAY: 12}
_MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (n_dims may be 0)


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how to decode it."""

    name: str
    shape: tuple[int, ...]  # torch order: ggml's ne reversed, e.g. attn_q -> (1024, 640)
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int


_U64 = struct.Struct("<Q")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Cursor:
    """Little-endian reads from a buffer; every read is checked against the buffer's end."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, where: str) -> None:
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.where}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated: {what} needs bytes {self.pos}..{self.pos + n} "
                f"but the file has {self.size}"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def count(self, what: str, item_size: int) -> int:
        """A u64 element count, refused if that many items could not fit in the rest."""
        n = self.u64(f"{what} count")
        if n * item_size > self.size - self.pos:
            raise self.fail(
                f"{what} count {n} needs at least {n * item_size} bytes at offset {self.pos} "
                f"but only {self.size - self.pos} remain (corrupted length?)"
            )
        return n

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, f"{what} ({n} bytes)")
        data = self.buf[self.pos : self.pos + n]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} at offset {self.pos} is not valid UTF-8 ({err.reason})") from None
        self.pos += n
        return text

    def strings(self, n: int, what: str) -> list[str]:
        """``n`` strings in a row: the same checks as ``string()`` in one tight loop, because a
        tokenizer vocabulary is 262,144 of them and per-call overhead would dominate parsing."""
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        items: list[bytes] = []
        for _ in range(n):
            if size - pos < 8:
                break
            (length,) = unpack(buf, pos)
            if length > size - pos - 8:
                break
            items.append(buf[pos + 8 : pos + 8 + length])
            pos += 8 + length
        else:
            self.pos = pos
            return self._decode_all(items, what)
        self.pos = pos
        self.string(f"{what} item {len(items)}")  # this string does not fit: raises the message
        raise AssertionError("unreachable")

    def _decode_all(self, items: list[bytes], what: str) -> list[str]:
        try:
            return [item.decode("utf-8") for item in items]
        except UnicodeDecodeError as err:
            j = next(j for j, item in enumerate(items) if not _is_utf8(item))
            raise self.fail(f"{what} item {j} is not valid UTF-8 ({err.reason})") from None

    def array(self, dtype: str, n: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        self.need(n * itemsize, what)
        values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += n * itemsize
        return values


class GGUFFile:
    """An open GGUF file: parsed metadata and tensor infos over a memory map of the data.

    Use as a context manager, or call ``close()``. Arrays returned by ``raw()`` keep the
    mapping alive until they are garbage collected, even after ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str], header_only: bool = False) -> None:
        """`header_only`: metadata and tensor infos are parsed and checked as always, but a tensor whose data would
        lie past the end of the file is recorded in `missing_data` instead of refused, and no tensor data can be
        read (for `gemmakit info`, which describes a file without its weights)."""
        self.path = pathlib.Path(path)
        self._where = str(self.path)
        self._header_only = header_only
        self.missing_data: dict[str, int] = {}  # header_only: tensor name -> the file size its data would need
        self._mmap: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4:
                raise FormatError(
                    f"{self._where}: not a GGUF file: it has {size} bytes, "
                    f"expected at least a 24-byte header starting with {GGUF_MAGIC!r}"
                )
            # ACCESS_COPY (private, copy-on-write) so internal views are writable for torch;
            # nothing ever writes to them, and the file itself can never change through us.
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = size
        try:
            self._parse(_Cursor(self._mmap, size, self._where))
        except BaseException:
            self.close()
            raise
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)

    # ------------------------------------------------------------ parsing

    def _parse(self, cur: _Cursor) -> None:
        magic = cur.buf[0:4]
        if magic != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file: expected magic {GGUF_MAGIC!r} at byte 0, found {magic!r}")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version & 0xFFFF == 0 and self.version >> 16:
                raise cur.fail(
                    f"big-endian GGUF (version reads {self.version:#010x}); only "
                    "little-endian files are supported"
                )
            raise cur.fail(f"unsupported GGUF version {self.version}; expected one of {SUPPORTED_VERSIONS}")
        n_tensors = cur.count("tensor", _MIN_TENSOR_INFO_SIZE)
        n_kv = cur.count("metadata key/value", _MIN_KV_SIZE)

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[int, ...]] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            vtype = cur.u32(f"type of metadata {key!r}")
            value, types = self._read_value(cur, vtype, f"metadata {key!r}", depth=0)
            self.metadata[key] = value
            self.metadata_types[key] = types

        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        self.alignment = self._alignment(cur)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, rel_offset in infos:
            if name in self.tensors:
                raise cur.fail(f"duplicate tensor name {name!r}")
            self.tensors[name] = self._locate(name, shape, ggml_type, rel_offset)

    def _read_value(self, cur: _Cursor, vtype: int, what: str, depth: int) -> tuple[Any, tuple[int, ...]]:
        """One metadata value of type ``vtype``; returns it and its type path, e.g. (ARRAY, STRING)."""
        if vtype in _SCALAR_FORMATS:
            value = cur.scalar(_SCALAR_FORMATS[vtype], what)
            return (value != 0 if vtype == BOOL else value), (vtype,)
        if vtype == STRING:
            return cur.string(what), (vtype,)
        if vtype != ARRAY:
            raise cur.fail(f"{what} has unknown value type {vtype}; expected 0..12")
        if depth >= MAX_ARRAY_NESTING:
            raise cur.fail(f"{what} nests arrays deeper than {MAX_ARRAY_NESTING} levels")
        itype = cur.u32(f"{what} element type")
        if itype not in VALUE_TYPE_NAMES:
            raise cur.fail(f"{what} has unknown array element type {itype}; expected 0..12")
        n = cur.count(f"{what} element", _MIN_VALUE_SIZE[itype])
        if itype in _ARRAY_DTYPES:
            values = cur.array(_ARRAY_DTYPES[itype], n, what)
            return (values != 0 if itype == BOOL else values), (ARRAY, itype)
        if itype == STRING:
            return cur.strings(n, what), (ARRAY, STRING)
        items, sub = [], (itype,)
        for j in range(n):
            item, sub = self._read_value(cur, ARRAY, f"{what} item {j}", depth + 1)
            items.append(item)
        return items, (ARRAY, *sub)

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"n_dims of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGML allows at most {GGML_MAX_DIMS}")
        ne = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        ggml_type = cur.u32(f"type of tensor {name!r}")
        rel_offset = cur.u64(f"offset of tensor {name!r}")
        if ggml_type not in BLOCK_SIZES:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        block = BLOCK_SIZES[ggml_type][0]
        if ne and ne[0] % block:
            raise cur.fail(
                f"tensor {name!r} ({type_name(ggml_type)}) has rows of {ne[0]} values, "
                f"not a multiple of the block size {block}"
            )
        return name, tuple(reversed(ne)), ggml_type, rel_offset

    def _alignment(self, cur: _Cursor) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise cur.fail(f"general.alignment must be a positive power of two, found {align!r}")
        return align

    def _locate(self, name: str, shape: tuple[int, ...], ggml_type: int, rel_offset: int) -> GGUFTensorInfo:
        block, type_size = BLOCK_SIZES[ggml_type]
        n_values = 1
        for dim in shape:
            n_values *= dim
        if n_values % block:
            raise FormatError(
                f"{self._where}: tensor {name!r} has {n_values} values, not a multiple of "
                f"the {type_name(ggml_type)} block size {block}"
            )
        nbytes = n_values // block * type_size
        start = self.data_offset + rel_offset
        if start + nbytes > self.size and self._header_only:
            self.missing_data[name] = start + nbytes
        elif start + nbytes > self.size:
            raise FormatError(
                f"{self._where}: truncated: tensor {name!r} needs bytes {start}..{start + nbytes} "
                f"but the file has {self.size}"
            )
        return GGUFTensorInfo(name, shape, ggml_type, type_name(ggml_type), start, nbytes)

    # ------------------------------------------------------------ data access

    def _info(self, name: str) -> GGUFTensorInfo:
        if self._bytes is None:
            raise InputError(f"{self._where}: the file is closed")
        if self._header_only:
            raise InputError(f"{self._where}: opened with header_only=True; tensor data cannot be read")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self._where}: no tensor named {name!r}") from None

    def _view(self, info: GGUFTensorInfo) -> np.ndarray:
        assert self._bytes is not None
        return self._bytes[info.offset : info.offset + info.nbytes]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array, zero-copy from the memory map."""
        view = self._view(self._info(name))
        view.flags.writeable = False
        return view

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantised to float32, then cast to ``dtype``; shape is ``info.shape``."""
        info = self._info(name)
        try:
            values = dequantize(self._view(info), info.ggml_type, info.shape)
        except FormatError as err:
            raise FormatError(f"{self._where}: tensor {name!r}: {err}") from None
        return values if dtype == torch.float32 else values.to(dtype)

    def close(self) -> None:
        """Release the memory map (deferred to garbage collection while raw() views live)."""
        self._bytes = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # arrays from raw() still point into it; it closes when they are freed
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self._where!r}, v{self.version}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"
