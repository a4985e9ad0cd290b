"""What a model file says about itself, read from headers only: `gemmakit info` without loading the weights.

Loading the embedded 270M to print its metadata took 5-8 s (dequantising and converting every tensor); all that
`info` prints is in the headers. Per format:
- GGUF: metadata and tensor infos (`GGUFFile(header_only=True)`: the data region is never read, and a file whose
  data is cut short is still described, with a warning that loading it would fail);
- HF directory: `config.json`, each safetensors file's JSON header, and the tokenizer files;
- converted `.safetensors`: its gemmakit header (config, scheme, the source's tensor types, tokenizer keys);
- gemma_pytorch `.ckpt`: the pickled index with tensor storage memory-mapped, not read (`torch.load(mmap=True)`).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gemmakit.config import GemmaConfig
from gemmakit.errors import FormatError
from gemmakit.weights.source import Source, resolve_source

# safetensors' dtype names -> torch's, which the loaded model's `tensor_types` use for float files
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass
class ModelSummary:
    """A model described from its headers: config, vocabulary, the tensors' types and sizes."""

    source: Source
    config: GemmaConfig
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    tensor_types: Counter[str]
    tensor_count: int
    data_bytes: int
    scheme: str | None = None
    converted_from: str | None = None
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report `gemmakit info` prints, one "label: value" per line."""
        c = self.config
        kinds = Counter(c.layer_types)
        out = [f"source:        {self.source.path}",
               f"format:        {self.source.kind}, {self.tensor_count} tensors, "
               f"{_size(self.data_bytes)} of tensor data"]
        if self.scheme is not None:
            out.append(f"conversion:    {self.scheme}, from {self.converted_from}")
        out += [
            f"architecture:  {c.family} ({c.name or 'unnamed'})",
            f"parameters:    {c.num_parameters() / 1e6:.1f} M",
            f"layers:        {c.num_layers} ({kinds.get('sliding', 0)} sliding, {kinds.get('global', 0)} global)",
            f"d_model:       {c.hidden_size}   ffn: {c.intermediate_size}",
            f"attention:     {c.num_heads} heads, {c.num_kv_heads} kv heads, head_dim {c.head_dim}, "
            f"query scale 1/sqrt({c.query_pre_attn_scalar:g})",
            f"window:        {c.sliding_window or '-'}   context: {c.max_position}",
            f"rope:          local {c.rope_theta_local:g}, global {c.rope_theta_global:g} (x{c.rope_scale_global:g})",
            f"soft-caps:     attention {c.attn_softcap or '-'}, final {c.final_softcap or '-'}   "
            f"qk-norm: {c.use_qk_norm}",
            f"vocabulary:    {self.vocab_size} (bos {_id(self.bos_id)}, eos {_id(self.eos_id)})",
            "tensor types:  " + ", ".join(f"{name} x{count}" for name, count in self.tensor_types.most_common()),
        ]
        out += [f"warning:       {w}" for w in self.warnings]
        return out


def load_plan(source: Source, dtype: str | None = None) -> str:
    """What `gemmakit.load(source, dtype=dtype)` would run on this machine's CPU, decided as `load` decides."""
    from gemmakit.loader import default_scheme

    if source.kind == "converted":
        scheme = (source.header or {}).get("gemmakit.scheme", "?")
        return f"the converted weights as stored ({scheme}), CPU"
    if dtype is not None:
        return f"{dtype} weights and activations, unquantised (dtype={dtype!r})"
    scheme = default_scheme(source, None, "cpu")
    if scheme == "gguf-rescore":
        return (f"the file's own quantised layers (Q4_K, Q6_K, ...) and an int8 head ({scheme}: the default for a GGUF "
                "on a CPU with bf16, converted once into the cache; dtype='float32' is the exact reference path)")
    if scheme is not None:
        return (f"int8 weights, bf16 activations ({scheme}: the default for {source.kind.upper()} weights on a CPU "
                "with bf16, converted once into the cache; dtype='float32' is the exact reference path)")
    return "float32 weights and activations, unquantised (the default for this format on this CPU)"


def summarize(path_or_name: str | Path | Source) -> ModelSummary:
    """The `ModelSummary` of a model argument (a path, "default", or a resolved `Source`), reading headers only."""
    source = resolve_source(path_or_name)
    if source.kind == "gguf":
        return _gguf(source)
    if source.kind == "hf":
        return _hf(source)
    if source.kind == "converted":
        return _converted(source)
    return _gemma_pytorch(source)


def _gguf(source: Source) -> ModelSummary:
    from gemmakit.weights.gguf import hf_name
    from gemmakit.weights.gguf_reader import GGUFFile

    with GGUFFile(source.path, header_only=True) as f:
        meta, infos, size = f.metadata, f.tensors, f.size
        missing = max(f.missing_data.values(), default=0)
    config = GemmaConfig.from_gguf_metadata(meta, source=str(source.path))
    # the loader's tensor types: canonical tensors only (an untied `output.weight` copy is skipped)
    types = Counter(info.type_name for name, info in infos.items() if hf_name(name, config.family) is not None)
    summary = ModelSummary(source, config, len(meta.get("tokenizer.ggml.tokens", ())),
                           _opt_int(meta.get("tokenizer.ggml.bos_token_id")),
                           _opt_int(meta.get("tokenizer.ggml.eos_token_id")), types, len(infos),
                           sum(info.nbytes for info in infos.values()))
    if missing:
        summary.warnings.append(f"the file is truncated: its tensor data needs {missing} bytes, the file has {size}; "
                                "loading it will fail")
    return summary


def _hf(source: Source) -> ModelSummary:
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.weights.hf import canonical_name, read_config, shard_files

    config = read_config(source.path)
    types: Counter[str] = Counter()
    count = data = 0
    warnings = []
    for shard in shard_files(source.path):
        header, data_start = safetensors_header(shard)
        last = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or "data_offsets" not in entry or "dtype" not in entry:
                raise FormatError(f"{shard}: safetensors header entry {name!r} has no dtype or data_offsets")
            count += 1
            begin, end = entry["data_offsets"]
            data += end - begin
            last = max(last, end)
            canon = canonical_name(name)
            if canon is not None and canon != "lm_head.weight":  # the reader drops the tied head
                types[_ST_DTYPES.get(entry["dtype"], entry["dtype"].lower())] += 1
        if data_start + last > shard.stat().st_size:
            warnings.append(f"{shard.name} is truncated: its tensor data needs {data_start + last} bytes, the file "
                            f"has {shard.stat().st_size}; loading it will fail")
    tok = Tokenizer.from_dir(source.path)
    return ModelSummary(source, config, tok.vocab_size, tok.bos_id, tok.eos_id, types, count, data,
                        warnings=warnings)


def _converted(source: Source) -> ModelSummary:
    from gemmakit.weights import converted
    from gemmakit.weights.aligned_safetensors import PAD_PREFIX

    meta = source.header if source.header is not None else converted.read_header(source.path)
    index = {k: v for k, v in safetensors_header(source.path)[0].items()
             if k != "__metadata__" and not k.startswith(PAD_PREFIX)}
    data = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in index.values())
    tok = json.loads(meta["gemmakit.tokenizer"]) if meta["gemmakit.tokenizer"] else {}
    if tok:
        vocab = len(tok.get("tokenizer.ggml.tokens", ()))
        bos, eos = _opt_int(tok.get("tokenizer.ggml.bos_token_id")), _opt_int(tok.get("tokenizer.ggml.eos_token_id"))
    else:  # the tokenizer lives beside the source (an HF directory or a .ckpt's folder)
        from gemmakit.tokenizer import Tokenizer

        origin = Path(meta["gemmakit.source"])
        tokenizer = Tokenizer.from_dir(origin if origin.is_dir() else origin.parent)
        vocab, bos, eos = tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id
    types = Counter(json.loads(meta["gemmakit.tensor_types"]).values())
    return ModelSummary(source, converted.read_config(meta), vocab, bos, eos, types, len(index), data,
                        scheme=meta["gemmakit.scheme"], converted_from=meta["gemmakit.source"])


def _gemma_pytorch(source: Source) -> ModelSummary:
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.weights.gemma_pytorch import infer_config, load_raw

    raw = load_raw(source.path)  # torch.load(mmap=True): the tensors are mapped, their data is not read
    beside = source.path.parent / "config.json"
    config = GemmaConfig.from_hf_config(beside) if beside.exists() else infer_config(raw, source.path)
    types = Counter(str(t.dtype).removeprefix("torch.") for t in raw.values())
    data = sum(t.numel() * t.element_size() for t in raw.values())
    tok = Tokenizer.from_dir(source.path.parent)
    return ModelSummary(source, config, tok.vocab_size, tok.bos_id, tok.eos_id, types, len(raw), data)


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data offsets; `__metadata__`) and the
    byte where its data starts, read with two bounded reads and nothing of the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: not a safetensors file: {len(head)} bytes, expected an 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > min(_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes) or "
                              f"{_MAX_HEADER} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: the safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _opt_int(value: object) -> int | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    return int(value[0] if isinstance(value, list) else value)


def _id(value: int | None) -> str:
    return "-" if value is None or value < 0 else str(value)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
