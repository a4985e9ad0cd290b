"""Write a `Transformer` back to files: an HF directory transformers loads, or a GGUF file llama.cpp loads.

An exporter is a loader run backwards: the state dict is already in transformers' names, so the HF writer
only adds a `config.json` in the exact shape of transformers' config class for the family; the GGUF writer
renames through `weights.gguf.gguf_name`, adds the +1 llama.cpp stores in every norm weight, and writes the
metadata keys llama.cpp (and our reader) take the architecture and the tokenizer from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from gemmakit.config import GemmaConfig
from gemmakit.errors import InputError

if TYPE_CHECKING:
    from gemmakit.tokenizer import Tokenizer

_ARCHITECTURES = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                  "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def export_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters under canonical names; refuses unmerged LoRA wrappers (merge them first)."""
    state = module.state_dict()
    lora = [k for k in state if ".lora_" in k]
    if lora:
        raise InputError(f"the model still holds LoRA adapters ({lora[0]}, ...); call "
                         "gemmakit.train.merge_lora(module) before exporting, or save_adapter() for the adapter alone")
    from gemmakit.model import Transformer

    with torch.device("meta"):
        expected = set(Transformer(module.config).state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise InputError(f"the model's tensors differ from a plain {module.config.family} Transformer ({odd[:3]}...); "
                         "a quantised model cannot be exported: load it with dtype='float32' or 'bfloat16'")
    return {k: v.detach() for k, v in state.items()}


# --- Hugging Face ----------------------------------------------------------------------------------------------------
def hf_config_dict(config: GemmaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """`config.json` for transformers' GemmaConfig / Gemma2Config / Gemma3TextConfig (v5 key layout, plus the
    v4 rope keys so older transformers read the same numbers)."""
    model_type, arch = _ARCHITECTURES[config.family]
    d: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position, "rms_norm_eps": config.rms_norm_eps,
        "bos_token_id": config.bos_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id,
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
        "dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
    if config.family == "gemma":
        d["hidden_act"] = "gelu_pytorch_tanh"
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta_global}
        d["rope_theta"] = config.rope_theta_global
        return d
    types = ["sliding_attention" if config.is_sliding(i) else "full_attention" for i in range(config.num_layers)]
    d.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar),
             sliding_window=config.sliding_window, layer_types=types,
             attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap)
    if config.family == "gemma2":
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta_global}
        d["rope_theta"] = config.rope_theta_global
        return d
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta_global}
    if config.rope_scale_global != 1.0:
        full = {"rope_type": "linear", "factor": config.rope_scale_global, "rope_theta": config.rope_theta_global}
    d["rope_parameters"] = {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_theta_local}}
    d["use_bidirectional_attention"] = False
    return d


def _int_if_whole(x: float) -> float | int:
    """transformers 5 validates `query_pre_attn_scalar` as an int; released values are whole numbers."""
    return int(x) if float(x).is_integer() else x


def write_hf_config(config: GemmaConfig, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


class ShardWriter:
    """Collects tensors and writes `model-0000i-of-0000n.safetensors` files of about `shard_size` bytes plus
    the index (a single shard is `model.safetensors`, as transformers names it). Shards are written under a
    temporary name and renamed at `close()`, so a crash never leaves a directory that looks complete."""

    def __init__(self, directory: Path, shard_size: int = 2 ** 30) -> None:
        self.directory, self.shard_size = Path(directory), shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_size:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total += size
        if self.pending_bytes >= self.shard_size:  # a full (or one oversized) shard goes to disk at once
            self._flush()

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, tensors), name in zip(self.files, names, strict=True):
            tmp.replace(self.directory / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.directory / name for name in names]


def copy_tokenizer_files(source: str | Path, out: str | Path) -> list[str]:
    """Copy an HF directory's tokenizer files (those present) into `out`."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copyfile(Path(source) / name, Path(out) / name)
            copied.append(name)
    return copied


def save_hf(module: nn.Module, directory: str | Path, dtype: torch.dtype | None = None,
            tokenizer_dir: str | Path | None = None, shard_size: int = 2 ** 30) -> Path:
    """An HF model directory (config.json, generation_config.json, safetensors) that
    `AutoModelForCausalLM.from_pretrained` loads with the same logits; tokenizer files are copied from
    `tokenizer_dir` when given (e.g. the directory the base model came from)."""
    config: GemmaConfig = module.config
    state = export_state_dict(module)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(iter(state.values())).dtype
    writer = ShardWriter(directory, shard_size)
    for name, tensor in state.items():
        writer.add(name, tensor.to(dtype))
    writer.close()
    write_hf_config(config, directory, dtype)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


# --- GGUF ------------------------------------------------------------------------------------------------------------
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")


def _expected_query_scalar(config: GemmaConfig) -> float:
    """What llama.cpp assumes, having no key for it: d_model / heads for the 27B models, head_dim otherwise."""
    is_27b = (config.family == "gemma2" and config.num_layers == 46) or (config.family == "gemma3"
                                                                         and config.num_layers == 62)
    return config.hidden_size / config.num_heads if is_27b else float(config.head_dim)


def _tokenizer_arrays(tokenizer: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Pieces, SentencePiece scores and piece types, as `tokenizer.ggml.*` wants them."""
    n = tokenizer.vocab_size
    pieces = [tokenizer.piece(i) for i in range(n)]
    types = [tokenizer.piece_type(i) for i in range(n)]
    rank = getattr(tokenizer, "_rank", None)  # negated SentencePiece scores of mergeable pieces
    if rank is not None:
        scores = [-rank[p] if p in rank else 0.0 for p in pieces]
    else:  # built from merges (tokenizer.json): a piece made by an earlier merge gets a higher score
        merge_rank = getattr(tokenizer, "_merge_rank", None) or {}
        made = {a + b: r for (a, b), r in sorted(merge_rank.items(), key=lambda kv: -kv[1])}
        scores = [-float(made[p]) if p in made else 0.0 for p in pieces]
    return pieces, scores, types


def save_gguf(module: nn.Module, path: str | Path, tokenizer: Tokenizer, file_type: str = "F16",
              name: str | None = None) -> Path:
    """A GGUF file with weights in `file_type` (F32, F16, BF16 or Q8_0; norms and other 1-D tensors stay F32,
    as llama.cpp's converter keeps them) and the metadata llama.cpp needs for this family. The module's
    tensors go through `write_gguf`, so a module and a stream of the same tensors give the same bytes."""
    config: GemmaConfig = module.config
    _check_gguf_export(config, tokenizer, file_type)  # before export_state_dict, which may refuse for other reasons
    state = export_state_dict(module)
    return write_gguf(path, config, tokenizer, ((hf, state[hf]) for hf, _ in gguf_tensor_plan(config)),
                      file_type, name)


def gguf_tensor_plan(config: GemmaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The canonical names and shapes of a model's tensors, in the order `write_gguf` takes and stores them.

    A GGUF header lists every tensor's shape, type and offset before the first byte of data, so a streaming
    writer must know them all up front: they come from the config (a model built on the meta device, no memory),
    not from the tensors."""
    from gemmakit.model import Transformer

    with torch.device("meta"):
        return [(k, tuple(v.shape)) for k, v in Transformer(config).state_dict().items()]


def write_gguf(path: str | Path, config: GemmaConfig, tokenizer: Tokenizer,
               tensors: Iterable[tuple[str, torch.Tensor]], file_type: str = "F16", name: str | None = None,
               *, progress: bool = False, chunk_bytes: int = 64 << 20) -> Path:
    """Stream a model into a GGUF file: `tensors` yields (canonical name, tensor) pairs one at a time, in
    `gguf_tensor_plan(config)`'s order, and each is converted and written before the next is asked for.

    Why: a 9B model in fp32 is ~37 GB; written this way the writer holds one tensor plus its converted copy
    (none when the tensor is already in the file's dtype), so a caller that makes tensors lazily (random weights,
    a shard reader) writes any size in little memory. Rows are converted `chunk_bytes` at a time (F16, BF16 and
    Q8_0 are row-wise formats, so the bytes equal a whole-tensor conversion). The file appears under its name
    only when complete."""
    import gguf

    from gemmakit.weights.gguf import gguf_name

    _check_gguf_export(config, tokenizer, file_type)
    path = Path(path)
    arch = config.family
    qtype = gguf.GGMLQuantizationType[file_type]
    plan = [(hf, shape, _gguf_kind(shape, qtype)) for hf, shape in gguf_tensor_plan(config)]
    tmp = Path(str(path) + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_metadata(writer, config, name or config.name or f"{arch}-export", file_type)
        _write_tokenizer(writer, tokenizer)
        for hf, shape, kind in plan:
            nbytes = _gguf_nbytes(shape, kind)
            writer.add_tensor_info(gguf_name(hf, arch), shape, np.dtype(np.float32), nbytes,
                                   raw_dtype=None if kind == gguf.GGMLQuantizationType.F32 else kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(_gguf_nbytes(s, k) for _, s, k in plan), unit="B", unit_scale=True,
                       desc=f"writing {path.name}")
        stream = iter(tensors)
        for i, (hf, shape, kind) in enumerate(plan):
            item = next(stream, None)
            if item is None:
                raise InputError(f"{path}: the tensor stream ended after {i} of {len(plan)} tensors; "
                                 f"{hf} and later are missing")
            got, tensor = item
            if got != hf or tuple(tensor.shape) != shape:
                raise InputError(f"{path}: tensor #{i} is {got} {tuple(tensor.shape)}, expected {hf} {shape}; "
                                 "write_gguf takes tensors in gguf_tensor_plan(config)'s order")
            array = _gguf_array(tensor, kind, hf.endswith("norm.weight"), chunk_bytes)
            del item, tensor
            writer.write_tensor_data(array)
            if bar is not None:
                bar.update(array.nbytes)
            del array
        if next(stream, None) is not None:
            raise InputError(f"{path}: the tensor stream has more than the model's {len(plan)} tensors")
        if bar is not None:
            bar.close()
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_gguf_export(config: GemmaConfig, tokenizer: Tokenizer, file_type: str) -> None:
    if file_type not in GGUF_TYPES:
        raise InputError(f"GGUF file type {file_type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    expected = _expected_query_scalar(config)
    if abs(config.query_pre_attn_scalar - expected) > 1e-6:
        raise InputError(f"GGUF has no key for query_pre_attn_scalar={config.query_pre_attn_scalar:g}; llama.cpp "
                         f"assumes {expected:g} for this shape, so the exported file would compute other logits")
    if tokenizer.vocab_size != config.vocab_size:
        raise InputError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                         f"{config.vocab_size}; GGUF readers take the vocabulary size from the token list")


def _gguf_kind(shape: tuple[int, ...], qtype: Any) -> Any:
    """Matrices in the file's type; norms and other 1-D tensors F32; Q8_0 rows not a multiple of 32 in F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) != 2:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % 32:
        return Q.F16
    return qtype


def _gguf_nbytes(shape: tuple[int, ...], kind: Any) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * type_size


def _gguf_array(tensor: torch.Tensor, kind: Any, is_norm: bool, chunk_bytes: int) -> np.ndarray:
    """The tensor as the bytes (or the float array) the file stores, converted a block of rows at a time."""
    import gguf

    Q = gguf.GGMLQuantizationType
    tensor = tensor.detach().cpu()
    if is_norm:  # llama.cpp stores the effective multiplier (1 + w); 1-D, so small
        tensor = tensor.float() + 1.0
    same = {Q.F32: torch.float32, Q.F16: torch.float16}.get(kind)
    if same is not None and tensor.dtype == same:
        return tensor.contiguous().numpy()  # already what the file stores: no copy
    if tensor.dim() < 2:
        return _convert_rows(tensor.float().numpy(), kind)
    rows, cols = tensor.shape
    step = max(1, chunk_bytes // (4 * cols))
    first = _convert_rows(tensor[:step].float().numpy(), kind)
    out = np.empty((rows, first.shape[1]), dtype=first.dtype)
    out[:step] = first
    for r in range(step, rows, step):
        out[r:r + step] = _convert_rows(tensor[r:r + step].float().numpy(), kind)
    return out


def _convert_rows(array: np.ndarray, kind: Any) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if kind == Q.F32:
        return array.astype(np.float32)
    if kind == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind)


def _write_metadata(writer: Any, config: GemmaConfig, name: str, file_type: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta_global)
    ftype = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}[file_type]
    writer.add_file_type(gguf.LlamaFileType[ftype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if config.family == "gemma2":
        writer.add_sliding_window(config.sliding_window)
        writer.add_attn_logit_softcapping(config.attn_softcap or 0.0)
        writer.add_final_logit_softcapping(config.final_softcap or 0.0)
    elif config.family == "gemma3":
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base_swa(config.rope_theta_local)
        if config.rope_scale_global != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(config.rope_scale_global)
        if config.final_softcap:
            writer.add_final_logit_softcapping(config.final_softcap)
        pattern = _sliding_pattern(config)
        if pattern != 6:
            writer.add_sliding_window_pattern(pattern)


def _sliding_pattern(config: GemmaConfig) -> int:
    """Gemma 3's period of global layers (every 6th); GGUF cannot express an irregular layout."""
    globals_ = [i for i in range(config.num_layers) if not config.is_sliding(i)]
    period = globals_[0] + 1 if globals_ else config.num_layers + 1
    expected = tuple((i + 1) % period != 0 for i in range(config.num_layers))
    if expected != tuple(config.is_sliding(i) for i in range(config.num_layers)):
        raise InputError(f"layer types {config.layer_types} are not a regular sliding/global pattern; GGUF stores "
                         "only a period")
    return period


def _write_tokenizer(writer: Any, tokenizer: Tokenizer) -> None:
    pieces, scores, types = _tokenizer_arrays(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.unk_id >= 0:
        writer.add_unk_token_id(tokenizer.unk_id)
    if tokenizer.pad_id >= 0:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
