"""GemmaConfig presets and constructors: HF config.json (old and new rope keys) and GGUF metadata."""

from __future__ import annotations

import json

import pytest

from gemmakit.config import GLOBAL, PRESETS, SLIDING, GemmaConfig
from gemmakit.errors import ConfigError
from support.tiny_models import hf_config


def test_gemma3_270m_parameter_count_matches_the_reference():
    # reference: 262144 x 640 embedding + 18 layers ~ 268M parameters
    assert 265e6 < PRESETS["gemma3-270m"].num_parameters() < 270e6


@pytest.mark.parametrize("name,low,high", [("gemma-2b", 2.4e9, 2.6e9), ("gemma-7b", 8.4e9, 8.6e9),
                                           ("gemma2-2b", 2.5e9, 2.7e9), ("gemma2-9b", 9.1e9, 9.3e9),
                                           ("gemma2-27b", 27.1e9, 27.3e9), ("gemma3-1b", 0.99e9, 1.01e9)])
def test_released_sizes_have_their_advertised_parameter_counts(name, low, high):
    assert low < PRESETS[name].num_parameters() < high


def test_layer_patterns():
    g2 = PRESETS["gemma2-9b"]
    assert g2.layer_types[:3] == (SLIDING, GLOBAL, SLIDING)  # layer 0 is local
    g3 = PRESETS["gemma3-4b"]
    assert [i for i, t in enumerate(g3.layer_types) if t == GLOBAL] == [5, 11, 17, 23, 29]
    assert g3.rope_scale(5) == 8.0 and g3.rope_scale(4) == 1.0
    assert PRESETS["gemma3-1b"].rope_scale(5) == 1.0
    assert set(PRESETS["gemma-7b"].layer_types) == {GLOBAL}


def test_query_scale_and_caps():
    assert PRESETS["gemma2-27b"].query_pre_attn_scalar == 144
    assert PRESETS["gemma3-27b"].query_pre_attn_scalar == 168
    assert PRESETS["gemma2-2b"].attn_softcap == 50 and PRESETS["gemma2-2b"].final_softcap == 30
    assert PRESETS["gemma3-12b"].attn_softcap is None and PRESETS["gemma3-12b"].final_softcap is None


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_from_transformers_config_objects(family):
    hf = hf_config(family)
    ours = GemmaConfig.from_hf_config(hf.to_dict())
    assert ours.family == family
    assert ours.num_layers == hf.num_hidden_layers and ours.head_dim == hf.head_dim
    expected_types = getattr(hf, "layer_types", None)
    if expected_types:
        assert [t == SLIDING for t in ours.layer_types] == [t == "sliding_attention" for t in expected_types]


def test_old_style_rope_keys_equal_new_style(tmp_path):
    old = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 2560, "intermediate_size": 10240,
           "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
           "query_pre_attn_scalar": 256, "sliding_window": 1024, "rope_theta": 1_000_000.0,
           "rope_local_base_freq": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "max_position_embeddings": 131072}
    new = {k: v for k, v in old.items() if not k.startswith("rope")}
    new["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    a, b = GemmaConfig.from_hf_config(tmp_path), GemmaConfig.from_hf_config(new)
    assert a == b
    assert a.rope_scale_global == 8.0 and a.rope_theta_local == 1e4
    assert a.replace(vocab_size=262208, name="gemma3-4b") == PRESETS["gemma3-4b"].replace(max_position=131072)


def test_multimodal_wrapper_reads_text_config():
    wrapper = {"model_type": "gemma3", "text_config": {
        "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 1024,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}
    assert GemmaConfig.from_hf_config(wrapper).rope_scale_global == 8.0


def test_unknown_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="llama"):
        GemmaConfig.from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="config.json"):
        GemmaConfig.from_hf_config(tmp_path / "missing")


# Metadata of the real gemma-3-270m GGUF as dumped in the reference (models.md section 2.2).
GEMMA3_270M_GGUF = {
    "general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.embedding_length": 640,
    "gemma3.block_count": 18, "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256, "gemma3.rope.freq_base": 1_000_000.0,
    "gemma3.attention.sliding_window": 512, "gemma3.attention.head_count_kv": 1,
    "tokenizer.ggml.tokens": ["x"] * 262144, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
}


def test_gguf_metadata_fills_in_llama_cpp_implicit_values():
    config = GemmaConfig.from_gguf_metadata(GEMMA3_270M_GGUF)
    assert config == PRESETS["gemma3-270m"].replace(name="")


def test_gguf_gemma2_27b_query_scale_is_derived_from_the_size():
    meta = {"general.architecture": "gemma2", "gemma2.context_length": 8192, "gemma2.embedding_length": 4608,
            "gemma2.block_count": 46, "gemma2.feed_forward_length": 36864, "gemma2.attention.head_count": 32,
            "gemma2.attention.head_count_kv": 16, "gemma2.attention.key_length": 128,
            "gemma2.attention.value_length": 128, "gemma2.attn_logit_softcapping": 50.0,
            "gemma2.final_logit_softcapping": 30.0, "gemma2.attention.sliding_window": 4096,
            "tokenizer.ggml.tokens": ["x"] * 256000}
    assert GemmaConfig.from_gguf_metadata(meta) == PRESETS["gemma2-27b"].replace(name="")


def test_gguf_unknown_architecture():
    with pytest.raises(ConfigError, match="llama"):
        GemmaConfig.from_gguf_metadata({"general.architecture": "llama"}, source="x.gguf")
