"""The streaming GGUF writer (`export.write_gguf`): tensors made one at a time give the same file as
`save_gguf` of the whole module, the writer lets each tensor go before it asks for the next (so a 9B model
is written in about one tensor's memory), and a stream in the wrong order or of the wrong length is refused
without leaving a file behind."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import InputError
from gemmakit.export import gguf_tensor_plan, save_gguf, write_gguf
from gemmakit.loader import build_model, read_checkpoint
from support.tiny_models import VOCAB
from support.train_helpers import one_thread, tiny_tokenizer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

# Gemma 2 (soft caps, sandwich norms) with rows of 40 columns: not a multiple of Q8_0's 32-wide block, so the
# writer's F16 fallback is exercised too (o_proj's input width 4 * 16 = 64 is).
CONFIG = GemmaConfig(family="gemma2", vocab_size=VOCAB, hidden_size=40, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=96, sliding_window=8, query_pre_attn_scalar=16.0,
                     attn_softcap=50.0, final_softcap=30.0, max_position=256, name="tiny-stream")


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (0.1 if name.endswith("norm.weight") else 0.5)


@pytest.fixture(scope="module")
def module():
    state = {name: random_tensor(name, shape, i) for i, (name, shape) in enumerate(gguf_tensor_plan(CONFIG))}
    return build_model(CONFIG, state, torch.float32, "tiny")


def stream(config: GemmaConfig, dtype: torch.dtype = torch.float32):
    """The same tensors as `module`, each made only when asked for."""
    for i, (name, shape) in enumerate(gguf_tensor_plan(config)):
        yield name, random_tensor(name, shape, i).to(dtype)


def ids():
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16", "Q8_0"])
def test_stream_writes_the_bytes_save_gguf_writes(module, tmp_path, file_type):
    whole = save_gguf(module, tmp_path / "whole.gguf", tiny_tokenizer(), file_type)
    # a tiny chunk converts the larger tensors a few rows at a time: the bytes must not change
    streamed = write_gguf(tmp_path / "stream.gguf", CONFIG, tiny_tokenizer(), stream(CONFIG), file_type,
                          chunk_bytes=1000)
    assert streamed.read_bytes() == whole.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_f16_tensors_pass_through_and_the_file_reloads_with_equal_logits(module, tmp_path):
    """fp16 tensors into an F16 file are written as they are (the no-copy path) and equal the fp32 path's bytes."""
    rounded = ((name, t.half().float()) for name, t in stream(CONFIG))  # same values, given as fp32
    a = write_gguf(tmp_path / "a.gguf", CONFIG, tiny_tokenizer(), rounded, "F16")
    b = write_gguf(tmp_path / "b.gguf", CONFIG, tiny_tokenizer(), stream(CONFIG, torch.float16), "F16")
    assert a.read_bytes() == b.read_bytes()
    exact = write_gguf(tmp_path / "c.gguf", CONFIG, tiny_tokenizer(), stream(CONFIG), "F32")
    checkpoint = read_checkpoint(exact)
    assert checkpoint.config.final_softcap == CONFIG.final_softcap
    again = build_model(checkpoint.config, checkpoint.state, torch.float32, exact)
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), module(ids()), atol=1e-5, rtol=1e-5)


def test_each_tensor_is_released_before_the_next_is_made(tmp_path):
    """The writer keeps no reference to a written tensor: what bounds a big model's memory to one tensor."""
    alive: list[weakref.ref] = []

    def watched():
        for name, tensor in stream(CONFIG):
            gc.collect()
            still = [r for r in alive if r() is not None]
            assert not still, f"{len(still)} earlier tensor(s) still referenced when {name} is made"
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    write_gguf(tmp_path / "w.gguf", CONFIG, tiny_tokenizer(), watched(), "Q8_0")
    assert len(alive) == len(gguf_tensor_plan(CONFIG))


def test_a_wrong_stream_is_refused_and_leaves_no_file(tmp_path):
    tensors = list(stream(CONFIG))
    out = tmp_path / "bad.gguf"
    swapped = [tensors[1], tensors[0], *tensors[2:]]
    with pytest.raises(InputError, match="expected model.embed_tokens.weight"):
        write_gguf(out, CONFIG, tiny_tokenizer(), iter(swapped))
    with pytest.raises(InputError, match="ended after"):
        write_gguf(out, CONFIG, tiny_tokenizer(), iter(tensors[:-1]))
    with pytest.raises(InputError, match="more than"):
        write_gguf(out, CONFIG, tiny_tokenizer(), iter([*tensors, tensors[-1]]))
    reshaped = [(tensors[0][0], tensors[0][1][:-1]), *tensors[1:]]
    with pytest.raises(InputError, match=r"\(511, 40\)"):
        write_gguf(out, CONFIG, tiny_tokenizer(), iter(reshaped))
    assert not list(tmp_path.iterdir())


def test_plan_matches_the_file_tensor_for_tensor(tmp_path):
    """The header written before any data (from the config) describes the data that follows."""
    import gguf

    path = write_gguf(tmp_path / "p.gguf", CONFIG, tiny_tokenizer(), stream(CONFIG), "F32")
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(gguf_tensor_plan(CONFIG))
    for (name, shape), t in zip(gguf_tensor_plan(CONFIG), reader.tensors, strict=True):
        assert tuple(int(d) for d in reversed(t.shape)) == shape, name
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(embed.data), random_tensor("e", (VOCAB, 40), 0).numpy())
