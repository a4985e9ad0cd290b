"""Aligned safetensors: any safetensors reader opens them, and every tensor sits on a 64-byte boundary."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gemmakit.weights.aligned_safetensors import ALIGN, PAD_PREFIX, save_aligned, without_padding


def test_tensors_round_trip_aligned_and_padding_is_dropped(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {  # odd sizes, so that most tensors need padding before the next one
        "a.int8": torch.randint(-128, 127, (3, 7), dtype=torch.int8, generator=gen),
        "b.bf16": torch.randn(5, generator=gen).bfloat16(),
        "c.f32": torch.randn(2, 3, 5, generator=gen),
        "d.u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=gen),
        "e.scalar": torch.tensor(7, dtype=torch.int64),
        "f.strided": torch.randn(6, 4, generator=gen).t(),  # not contiguous: written as its values
    }
    path = tmp_path / "x.safetensors"
    save_aligned(tensors, path, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:  # the reference reader validates the layout
        assert f.metadata() == {"k": "v"}
        assert any(name.startswith(PAD_PREFIX) for name in f.keys())
    loaded = load_file(str(path))
    state = without_padding(loaded)
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor)
        assert state[name].data_ptr() % ALIGN == 0


def test_reserved_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_aligned({PAD_PREFIX + "1": torch.zeros(1)}, tmp_path / "x.safetensors", {})
