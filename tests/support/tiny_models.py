"""Tiny random Gemma 1/2/3 models built and saved by transformers itself: the reference for our forward pass.

Every parameter (norm weights included) is drawn at random with a large enough scale that soft-caps, norm
offsets and rope details change the logits measurably, so a wrong detail fails the comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 8
VOCAB = 512


def hf_config(family: str, **overrides):
    """A transformers config for a tiny model of one generation (sequences of 40 tokens pass the window);
    `overrides` change its fields (e.g. head_dim and head counts, for kernels that only take some shapes)."""
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gemma":
        fields = dict(common, num_hidden_layers=3, num_key_value_heads=1)
        return GemmaConfig(**(fields | overrides))
    if family == "gemma2":
        fields = dict(common, num_hidden_layers=4, num_key_value_heads=2, sliding_window=WINDOW,
                      query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
        return Gemma2Config(**(fields | overrides))
    fields = dict(
        common, num_hidden_layers=7, num_key_value_heads=2, sliding_window=WINDOW, query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
    )
    return Gemma3TextConfig(**(fields | overrides))


def hf_model(family: str, seed: int = 0, **overrides):
    """A transformers causal LM with random weights, eager attention, fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith("norm.weight") else 0.15
            p.copy_(torch.randn_like(p) * scale)
    return model


def save_hf_model(family: str, directory: Path, seed: int = 0, **overrides):
    model = hf_model(family, seed, **overrides)
    model.save_pretrained(directory)
    return model


def save_tiny_tokenizer(directory: Path) -> Path:
    """Train a SentencePiece BPE model of exactly VOCAB pieces with Gemma's special ids, as tokenizer.model."""
    import io

    import sentencepiece as spm

    words = ("the of and to in is was for on that with as by at from his her it an are be this which or had "
             "not but they were one all their has been have who more will would there when into time only new "
             "some could these two may first then do any like other than now people my made over did down way "
             "sea ship river city king queen hello world gemma model token cache window").split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=gen))
             for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
