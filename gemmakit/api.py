"""The public face of gemmakit: `load()` and the `Gemma` object it returns.

`Gemma` ties a `Transformer`, its tokenizer and the generation engine together behind text-in/text-out
methods; everything it does is also reachable piecewise (`.module`, `.tokenizer`, `gemmakit.engine`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gemmakit.chat import render_chat
from gemmakit.config import GemmaConfig
from gemmakit.engine import Sampling, generate_tokens
from gemmakit.errors import InputError
from gemmakit.loader import DTYPES, build_model, check_dtype, read_checkpoint
from gemmakit.model import Transformer
from gemmakit.tokenizer import Tokenizer


class Gemma:
    """A loaded Gemma model: `.config`, `.tokenizer`, `.module` and text-level methods."""

    def __init__(self, module: Transformer, tokenizer: Tokenizer, source: Path | None = None,
                 tensor_types: dict[str, str] | None = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.tensor_types = tensor_types or {}

    @property
    def config(self) -> GemmaConfig:
        return self.module.config

    def __repr__(self) -> str:
        return (f"Gemma({self.config.name or self.config.family}, layers={self.config.num_layers}, "
                f"d={self.config.hidden_size}, dtype={str(self.module.dtype).removeprefix('torch.')}, "
                f"source={self.source})")

    # --- token-level -----------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokenise a prompt; a prompt that spells out `<bos>` itself does not get a second one."""
        ids = self.tokenizer.encode(text, add_bos=add_bos)
        bos = self.tokenizer.bos_id
        while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def _as_batch(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        batch = ids if isinstance(ids, torch.Tensor) else torch.tensor([list(ids)], dtype=torch.long)
        if batch.dim() == 1:
            batch = batch.unsqueeze(0)
        if batch.dim() != 2 or batch.shape[1] == 0:
            raise InputError(f"ids must be a non-empty list of ints or a LongTensor [B, T], got shape "
                             f"{list(batch.shape)}")
        if batch.shape[1] > self.config.max_position:
            raise InputError(f"{batch.shape[1]} tokens exceed the model's context of {self.config.max_position}")
        if int(batch.min()) < 0 or int(batch.max()) >= self.config.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.config.vocab_size}), got {int(batch.min())}.."
                             f"{int(batch.max())}")
        return batch.to(self.module.device)

    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A plain full forward: logits [B, T, vocab] (B = 1 for a list)."""
        with torch.inference_mode():
            return self.module(self._as_batch(ids))

    def score(self, text: str | Sequence[int], add_bos: bool = True) -> torch.Tensor:
        """Log-probability of each token given the ones before it: [T - 1] for a text of T tokens."""
        ids = self.encode(text, add_bos) if isinstance(text, str) else list(text)
        logits = self.logits(ids)[0, :-1].float()
        targets = torch.tensor(ids[1:], device=logits.device)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)

    # --- text generation ---------------------------------------------------------------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, stop: bool = True,
                     **sampling: Any) -> list[list[int]]:
        """New token ids for each prompt (a batch, left-padded), stop token excluded."""
        stop_ids = self.tokenizer.stop_ids if stop else frozenset()
        outputs: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for step in generate_tokens(self.module, prompts, max_new_tokens, Sampling(**sampling), stop_ids):
            for row, token in enumerate(step.tolist()):
                if finished[row]:
                    continue
                if token in stop_ids:
                    finished[row] = True
                else:
                    outputs[row].append(token)
        return outputs

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 128, **sampling: Any) -> str | list[str]:
        """Continue a prompt (or each of a list of prompts, batched). Sampling: temperature (0 = greedy), top_k,
        top_p, min_p, seed. Stops at `<eos>` or `<end_of_turn>`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        outputs = self.generate_ids([self.encode(p) for p in prompts], max_new_tokens, **sampling)
        texts = [self.tokenizer.decode(ids) for ids in outputs]
        return texts[0] if isinstance(prompt, str) else texts

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, **sampling: Any) -> Iterator[str]:
        """Text pieces as tokens are produced, each complete UTF-8 (multi-byte characters are held back)."""
        decoder = self.tokenizer.decode_stream()
        stop_ids = self.tokenizer.stop_ids
        for step in generate_tokens(self.module, [prompt_ids], max_new_tokens, Sampling(**sampling), stop_ids):
            token = int(step[0])
            if token in stop_ids:
                break
            piece = decoder.feed(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def stream(self, prompt: str, max_new_tokens: int = 128, **sampling: Any) -> Iterator[str]:
        return self.stream_ids(self.encode(prompt), max_new_tokens, **sampling)

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, **sampling: Any) -> str:
        """The model's reply to a conversation, rendered with its own chat template."""
        return "".join(self.chat_stream(messages, max_new_tokens, **sampling))

    def chat_stream(self, messages: list[dict[str, str]], max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        return self.stream_ids(render_chat(messages, self.tokenizer), max_new_tokens, **sampling)


def load(path_or_name: str | Path = "default", dtype: str | torch.dtype | None = None, device: str = "cpu",
         force_fp16: bool = False, quant: str | None = "auto", cache: bool = True, compile: bool = False) -> Gemma:
    """Load a Gemma model from an HF directory, a GGUF file, a gemma_pytorch `.ckpt`, a converted `.safetensors`
    (`gemmakit quantize`), or "default" (the embedded Gemma 3 270M).

    - `load(path)` of a GGUF (an already-quantised release file): the fastest path that keeps perplexity
      within 1% of the fp32 dequantised reference. On a CPU with AVX512-BF16 that is `quant="int8-rescore"`:
      int8 weights, bf16 activations (+0.2% perplexity on the 270M), and for decoding an int4 copy of the
      LM head that picks 128 candidates whose logits are then recomputed in int8 (int4 everywhere would cost
      +18% perplexity, so it is never chosen for you). Everything else (HF directories, .ckpt files, other
      devices, CPUs without bf16) loads as stored in fp32, so training and export code that loads a
      checkpoint keeps plain `nn.Linear` layers.
    - `load(path, dtype=...)`: giving a dtype means "this dtype, unquantised" (quant "auto" becomes None), so
      `load(path, dtype="float32")` is the exact reference path, as is `load(path, dtype="float32", quant=None)`.
    - `quant=` one of `gemmakit.quant.SCHEMES` ("int8", "int4", "int8-head4", ...): weight-only quantisation
      on CPU with bf16 activations. The conversion is cached under `$GEMMAKIT_CACHE` (default
      ~/.cache/gemmakit) keyed by the file's fingerprint, so only the first load pays for it (`cache=False`
      converts in memory and writes nothing).
    - Int8 models on CPU (the default GGUF path included) decode through gemmakit's native step
      (`gemmakit.native_decode`: all layers in one C++ call, compiled on first use in a few seconds;
      `GEMMAKIT_NATIVE=0` turns it off).
    - `compile=True`: generation decodes through a torch.compile'd step (`gemmakit.compiled_decode`): less
      per-token overhead, for a compilation the first time each batch size and cache bucket is decoded.
    """
    model = _load(path_or_name, dtype, device, force_fp16, quant, cache)
    if compile:
        from gemmakit import compiled_decode

        compiled_decode.enable(model.module)
    else:
        from gemmakit import native_decode

        native_decode.enable(model.module)  # int8 models on CPU only; the others keep the eager step
    return model


def _load(path_or_name: str | Path, dtype: str | torch.dtype | None, device: str, force_fp16: bool,
          quant: str | None, cache: bool) -> Gemma:
    from gemmakit.quant import has_fast_bf16
    from gemmakit.weights import converted

    if quant == "auto":
        fast_cpu = device == "cpu" and has_fast_bf16()
        quant = "int8-rescore" if dtype is None and fast_cpu and _is_gguf(path_or_name) else None
    if dtype is None:
        dtype = "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if str(path_or_name) != "default" and converted.is_converted(path_or_name):
        return _load_converted(Path(path_or_name), device)
    if quant is not None:
        from gemmakit.loader import resolve
        from gemmakit.quant import scheme

        scheme(quant)
        if device != "cpu":
            raise InputError(f"quant={quant!r} uses torch's CPU kernels; use device='cpu', or quant=None with "
                             "dtype='bfloat16' on a GPU")
        if dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"quant={quant!r} runs with bf16 activations; dtype={dtype} cannot be combined with it")
        source = resolve(path_or_name)
        if cache:
            return _load_converted(converted.cached(source, quant), device)
        return _quantize_in_memory(source, quant)
    checkpoint = read_checkpoint(path_or_name)
    check_dtype(checkpoint.config, dtype, force_fp16)
    module = build_model(checkpoint.config, checkpoint.state, dtype, checkpoint.source, device)
    return Gemma(module, checkpoint.tokenizer, checkpoint.source, checkpoint.tensor_types)


def _load_converted(path: Path, device: str) -> Gemma:
    from gemmakit.weights import converted

    if device != "cpu":
        raise InputError(f"{path}: a converted (quantised) model runs on CPU only; got device={device!r}")
    module, tokenizer, source, types = converted.load(path)
    return Gemma(module, tokenizer, source, types)


def _quantize_in_memory(source: Path, quant: str) -> Gemma:
    from gemmakit.quant import quantize_model

    checkpoint = read_checkpoint(source)
    module = build_model(checkpoint.config, checkpoint.state, torch.float32, checkpoint.source)
    del checkpoint.state
    return Gemma(quantize_model(module, quant), checkpoint.tokenizer, checkpoint.source, checkpoint.tensor_types)


def _is_gguf(path_or_name: str | Path) -> bool:
    from gemmakit.loader import resolve

    path = resolve(path_or_name)
    if path.is_dir():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
