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
from gemmakit.decoding import DecoderChoice, Request, Sampling, Scheduler, choose_decoder
from gemmakit.errors import InputError
from gemmakit.loader import load_model
from gemmakit.model import Transformer
from gemmakit.tokenizer import Tokenizer


class Gemma:
    """A loaded Gemma model: `.config`, `.tokenizer`, `.module` and text-level methods."""

    def __init__(self, module: Transformer, tokenizer: Tokenizer, source: Path | None = None,
                 tensor_types: dict[str, str] | None = None, decoder: DecoderChoice | None = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.tensor_types = tensor_types or {}
        self._decoder = decoder

    @property
    def decoder_choice(self) -> DecoderChoice:
        """Which step decoder generation uses, and why (`gemmakit.decoding.choice`): chosen at first use unless
        `load()` (or `use_decoder`) chose."""
        if self._decoder is None:
            self._decoder = choose_decoder(self.module)
        return self._decoder

    @property
    def decoder(self):
        return self.decoder_choice.decoder

    def use_decoder(self, choice: DecoderChoice) -> None:
        self._decoder = choice

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
    def _requests(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: bool,
                  sampling: dict[str, Any]) -> tuple[Scheduler, list[Request]]:
        """A one-off scheduler for these prompts (no prefix cache) and their requests. With a seed, prompt i
        samples with seed + i, so each prompt's tokens are the same alone or in a list."""
        stop_ids = self.tokenizer.stop_ids if stop else frozenset()
        base = Sampling(**sampling)
        requests = []
        for i, prompt in enumerate(prompts):
            row = base if base.seed is None else Sampling(**{**sampling, "seed": base.seed + i})
            requests.append(Request(list(prompt), row, max_new_tokens, stop_ids))
        longest = max((len(p) for p in prompts), default=1)
        scheduler = Scheduler(self, slots=max(1, min(len(prompts), 16)), prefix_cache_bytes=0,
                              context=min(longest + max_new_tokens, self.config.max_position))
        return scheduler, requests

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, stop: bool = True,
                     **sampling: Any) -> list[list[int]]:
        """New token ids for each prompt, stop token excluded. The prompts run through the same continuous-
        batching scheduler as a server's requests (each prompt gets its own row and positions), so a prompt's
        tokens do not depend on the others."""
        if not prompts:
            return []
        scheduler, requests = self._requests(prompts, max_new_tokens, stop, sampling)
        handles = [scheduler.submit(r) for r in requests]
        scheduler.run_until_done(handles)
        return [h.tokens for h in handles]

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
        scheduler, (request,) = self._requests([prompt_ids], max_new_tokens, True, sampling)
        handle = scheduler.submit(request)
        seen = 0
        while not handle.done:
            scheduler.step()
            for token in handle.tokens[seen:]:
                piece = decoder.feed(token)
                if piece:
                    yield piece
            seen = len(handle.tokens)
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
    - The step decoder is chosen in one place, `gemmakit.decoding.choose_decoder` (`model.decoder_choice` says
      which and why): int8 models on CPU (the default GGUF path included) decode through gemmakit's native
      step (all layers in one C++ call, compiled on first use in a few seconds; `GEMMAKIT_NATIVE=0` turns it
      off); `compile=True` decodes through torch.compile'd layers (less per-token overhead, for a compilation
      the first time each batch size and cache bucket is decoded); anything else through the module's forward.
    """
    model = _load(path_or_name, dtype, device, force_fp16, quant, cache)
    model.use_decoder(choose_decoder(model.module, compile=compile))
    return model


def _load(path_or_name: str | Path, dtype: str | torch.dtype | None, device: str, force_fp16: bool,
          quant: str | None, cache: bool) -> Gemma:
    """The model `load` returns, before its decoder is chosen: `loader.load_model` resolves, reads and builds."""
    loaded = load_model(path_or_name, dtype, device, force_fp16, quant, cache)
    return Gemma(loaded.module, loaded.tokenizer, loaded.source, loaded.tensor_types)
