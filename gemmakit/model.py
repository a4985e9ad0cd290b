"""The Gemma 1/2/3 decoder as one readable `nn.Module`, parameter names identical to transformers'.

Numerics follow the references exactly: RMSNorm multiplies by (1 + w) in fp32 before casting back; the
embedding normaliser sqrt(d) is cast to the activation dtype first; GeGLU uses tanh-GELU on the gate; rope
is rotate-half in fp32; Gemma 2 soft-caps attention scores before the mask and the final logits; Gemma 3
normalises q and k before rope. The module never reads files or samples tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.cache import KVCache, StepPlan, attention_mask
from gemmakit.config import GemmaConfig
from gemmakit.cpu_attention import blocked_attention, decode_attention


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in fp32 and cast back only at the end (Gemma's order, not Llama's)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self._multiplier: tuple[tuple, torch.Tensor] | None = None

    def multiplier(self) -> torch.Tensor:
        """1 + w in fp32. Without autograd it is kept between calls (decoding calls each norm once per token)
        and rebuilt when the weight changes (its version counter, storage or device) or the mode does."""
        w = self.weight
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return 1.0 + w.float()
        inference = torch.is_inference_mode_enabled()
        key = (w._version if not w.is_inference() else -1, w.data_ptr(), w.device, inference)
        if self._multiplier is None or self._multiplier[0] != key:
            self._multiplier = (key, 1.0 + w.detach().float())
        return self._multiplier[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # a bf16 prompt on the CPU: one native pass (kernels.bf16_rms_norm)
            from gemmakit.decoding.native import kernels

            if kernels.fused_bf16_usable(x, self.weight):
                return kernels.bf16_rms_norm(x, self.multiplier(), self.eps)
        # torch's rms_norm computes x * rsqrt(mean(x^2) + eps) * weight: the same function in the same order
        # as the written-out form (bit-identical, checked by test_model), in far fewer ops
        y = F.rms_norm(x if x.dtype == torch.float32 else x.float(), (x.shape[-1],), self.multiplier(), self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class Site(nn.Module):
    """A named point in the forward pass (resid_post, attn_out, mlp_out) where hooks may read or change x.

    It is only called when hooks are registered on it, so an unhooked model pays nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HookWatch:
    """Tells whether any forward (pre-)hook is registered on a module tree or globally.

    Step decoders that bypass the modules (compiled, native) must fall back to the eager forward while hooks
    are present, and check before every token. torch keeps hooks in dicts created with each module, whose
    contents change but which are never replaced, so they are gathered once: a check is then ~2 len() calls
    a module instead of a walk over the modules (which cost 0.25 ms a token).
    """

    def __init__(self, module: nn.Module) -> None:
        self._dicts = [hooks for m in module.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)]
        self._dicts += [torch.nn.modules.module._global_forward_hooks,
                        torch.nn.modules.module._global_forward_pre_hooks]

    def any(self) -> bool:
        return any(map(len, self._dicts))


def _through(site: Site, x: torch.Tensor) -> torch.Tensor:
    return site(x) if site._forward_hooks or site._forward_pre_hooks else x


def rope_inv_freq(head_dim: int, theta: float, scale: float = 1.0) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) over the full head_dim, divided by the linear scaling factor."""
    # computed on the CPU, then moved to the default device: an arange on the meta device (where loading builds
    # every model) runs torch's Python reference ops, whose first use imports torch._dynamo (~1.5 s of a load)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
    return (inv / scale).to(torch.get_default_device())


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, 1, T, D] in fp32 for integer positions [B, T].

    The signed sin has its first half negated (-sin, +sin), the sign that rotate-half puts on the rolled x, so
    that `apply_rope` needs no negation (an exact change: IEEE negation commutes with the product).
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    sin = emb.sin()
    half = sin.shape[-1] // 2
    return emb.cos(), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope (x[i] pairs with x[i + d/2]) in fp32 whatever the activation dtype.

    x * cos + rotate_half(x) * sin, with rotate_half(x) * sin written as roll(x, d/2) * signed_sin.
    """
    xf = x.float()
    return (xf * cos + torch.roll(xf, xf.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


@dataclass
class LayerInputs:
    """What every layer of one kind (sliding or global) shares during one forward: rope tables and mask."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    mask: torch.Tensor


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_softcap
        d = config.hidden_size
        self.q_proj = nn.Linear(d, config.q_dim, bias=False)
        self.k_proj = nn.Linear(d, config.kv_dim, bias=False)
        self.v_proj = nn.Linear(d, config.kv_dim, bias=False)
        self.o_proj = nn.Linear(config.q_dim, d, bias=False)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn_out = Site()

    def forward(self, x: torch.Tensor, inputs: LayerInputs, cache: KVCache | None,
                plan: StepPlan | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._norm_rope(self.q_proj(x), self.num_heads, self.q_norm, inputs)
        k = self._norm_rope(self.k_proj(x), self.num_kv_heads, self.k_norm, inputs)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, plan)
        out = self._attend(q, k, v, inputs.mask)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(_through(self.attn_out, out))

    def _norm_rope(self, x: torch.Tensor, heads: int, norm: RMSNorm | None, inputs: LayerInputs) -> torch.Tensor:
        """A projection's output [B, T, heads * head_dim] -> [B, heads, T, head_dim], q/k-normed (Gemma 3) and
        roped. A bf16 prompt on the CPU takes one native pass (kernels.bf16_norm_rope) for torch's ten."""
        b, t, _ = x.shape
        if inputs.cos.shape[0] == b and inputs.cos.shape[2] == t:
            from gemmakit.decoding.native import kernels

            if kernels.fused_bf16_usable(x, None if norm is None else norm.weight):
                mult = None if norm is None else norm.multiplier()
                eps = 0.0 if norm is None else norm.eps
                y = kernels.bf16_norm_rope(x, heads, mult, eps, inputs.cos, inputs.signed_sin)
                return y.view(b, t, heads, self.head_dim).transpose(1, 2)
        y = x.view(b, t, heads, self.head_dim).transpose(1, 2)
        if norm is not None:
            y = norm(y)
        return apply_rope(y, inputs.cos, inputs.signed_sin)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        reduced_cpu = q.dtype != torch.float32 and q.device.type == "cpu"  # see gemmakit.cpu_attention for why
        if reduced_cpu and q.shape[2] == 1:
            return decode_attention(q, k, v, mask, self.scale, self.softcap)
        if k.dtype != q.dtype:  # a CPU cache keeps a bf16 model's k/v in fp32 (exact values, see KVCache)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if reduced_cpu:
            return blocked_attention(q, k, v, mask, self.scale, self.softcap)
        if self.softcap is None:  # Gemma 1/3: no cap, so the fused kernel computes the same function
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap  # Gemma 2: cap before the mask
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        from gemmakit.decoding.native import kernels

        if kernels.fused_bf16_usable(gate) and up.shape == gate.shape:  # one native pass for a bf16 CPU prompt
            return self.down_proj(kernels.bf16_geglu(gate, up))
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    """Gemma 1: pre-norm residual block. Gemma 2/3: sandwich norms around attention and MLP.

    HF's `post_attention_layernorm` is the pre-MLP norm in Gemma 1 and the post-attention norm in Gemma 2/3;
    the names are kept so that state dicts load unchanged.
    """

    def __init__(self, config: GemmaConfig, layer: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.sliding = config.is_sliding(layer)
        self.sandwich = config.sandwich_norms
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp_out = Site()
        self.resid_post = Site()

    def forward(self, x: torch.Tensor, inputs: LayerInputs, cache: KVCache | None,
                plan: StepPlan | None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), inputs, cache, plan)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            mlp = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + attn
            mlp = self.mlp(self.post_attention_layernorm(x))
        x = x + _through(self.mlp_out, mlp)
        return _through(self.resid_post, x)


class Decoder(nn.Module):
    """Holds the parameters under HF's `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        # the table is passed in (uninitialised) instead of drawn: a normal_ on the meta device, where loading
        # builds every model, imports torch's Python decompositions, 1.2-2 s of a warm load
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)  # a model built for training from scratch: nn.Embedding's own init
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """A Gemma causal LM with tied embeddings. `state_dict()` keys are transformers' canonical names."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.register_buffer("inv_freq_local", rope_inv_freq(config.head_dim, config.rope_theta_local),
                             persistent=False)
        self.register_buffer(
            "inv_freq_global",
            rope_inv_freq(config.head_dim, config.rope_theta_global, config.rope_scale_global),
            persistent=False,
        )

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (a quantised embedding, see `gemmakit.quant`, says its own)."""
        emb = self.model.embed_tokens
        return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype

    @property
    def device(self) -> torch.device:
        emb = self.model.embed_tokens
        return emb.weight.device if isinstance(emb, nn.Embedding) else emb.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] * sqrt(d), with the normaliser rounded to the activation dtype as the references do."""
        h = self.model.embed_tokens(ids)
        return h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)

    def unembed(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm, tied projection onto the vocabulary (or only onto `rows`, token ids), Gemma 2's soft-cap.

        Reading a few rows (e.g. a classifier's Yes/No) costs a few dot products instead of the whole vocabulary.
        """
        emb = self.model.embed_tokens
        if isinstance(emb, nn.Embedding):
            weight = emb.weight if rows is None else emb.weight[rows]
            logits = F.linear(self.model.norm(h), weight)
        else:  # quantised head (gemmakit.quant.QuantEmbedding)
            logits = emb.project(self.model.norm(h), rows)
        return self.cap_logits(logits)

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final soft-cap, cap * tanh(logits / cap); the identity for Gemma 1 and 3."""
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        pad: torch.Tensor | None = None,
        last_only: bool = False,
        stop_after_layer: int | None = None,
    ) -> torch.Tensor | None:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`) for ids [B, T].

        With a cache, the ids continue the cached sequence and their k/v are stored. `pad` gives each row's
        count of left padding (taken from the cache when one is given). With `stop_after_layer`, the layers
        after it are skipped and None is returned: used when only activations (read by hooks) are wanted.
        """
        h = self.hidden_states(ids, cache, pad, stop_after_layer)
        if stop_after_layer is not None:
            return None
        return self.unembed(h[:, -1:] if last_only else h)

    def _rope_lookup(self, positions: torch.Tensor, sliding: bool, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/signed sin [B, 1, T, D] for `positions`, read from `rope_table(sliding, need)`."""
        cos, signed_sin = self.rope_table(sliding, need)
        return cos[positions].unsqueeze(1), signed_sin[positions].unsqueeze(1)

    def rope_table(self, sliding: bool, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/signed sin [S, D] for positions 0..S-1, S >= `need`, from a table grown on demand (doubling).

        The table holds exactly what `rope_cos_sin` computes (same fp32 product, same cos/sin), so this only
        saves the per-step trigonometry of decoding, never changes a value. `need` bounds the positions (a
        Python int, so that no device value is read back on GPUs).
        """
        inv = self.inv_freq_local if sliding else self.inv_freq_global
        tables = self.__dict__.setdefault("_rope_tables", {})
        table = tables.get(sliding)
        if table is None or table[0].shape[0] < need or table[0].device != inv.device:
            size = 1 << max(need - 1, 63).bit_length()
            cos, sin = rope_cos_sin(torch.arange(size, device=inv.device).view(1, -1), inv)
            table = tables[sliding] = (cos[0, 0], sin[0, 0])
        return table

    def hidden_states(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        pad: torch.Tensor | None = None,
        stop_after_layer: int | None = None,
    ) -> torch.Tensor:
        """The residual stream [B, T, d] after the last layer (or after `stop_after_layer`), before the norm."""
        b, t = ids.shape
        if cache is not None:
            plan = cache.plan(t)
            pad = cache.pad
            q_times, global_k, sliding_k = plan.q_times, plan.global_k_times, plan.sliding_k_times
        else:
            plan = None
            pad = torch.zeros(b, dtype=torch.long, device=ids.device) if pad is None else pad.to(ids.device)
            q_times = global_k = sliding_k = torch.arange(t, device=ids.device)
        positions = (q_times.view(1, -1) - pad.view(-1, 1)).clamp(min=0)
        per_kind = {}
        for sliding in {self.config.is_sliding(i) for i in range(self.config.num_layers)}:
            cos, sin = self._rope_lookup(positions, sliding, t if plan is None else plan.start + plan.length)
            window = self.config.sliding_window if sliding else None
            mask = attention_mask(q_times, sliding_k if sliding else global_k, pad, window)
            per_kind[sliding] = LayerInputs(cos, sin, mask)
        h = self.embed(ids)
        last = self.config.num_layers - 1 if stop_after_layer is None else stop_after_layer
        for layer in self.model.layers[: last + 1]:
            h = layer(h, per_kind[layer.sliding], cache, plan)
        if cache is not None:
            cache.finish(plan)
        return h
