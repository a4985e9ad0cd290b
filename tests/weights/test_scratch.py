"""The per-thread weight buffer (gemmakit/scratch.py) that prompt products decode into."""

from __future__ import annotations

import torch

from gemmakit.scratch import weight_buffer


def test_buffer_is_writable_inside_and_outside_inference_mode():
    """A buffer first made under torch.inference_mode is written by a later product outside it (a training run's
    prompt after a generation), and the other way round."""
    with torch.inference_mode():
        weight_buffer(8, 16, torch.float32).copy_(torch.ones(8, 16))
    outside = weight_buffer(4, 16, torch.float32).copy_(torch.full((4, 16), 2.0))
    assert torch.equal(outside, torch.full((4, 16), 2.0))
    with torch.inference_mode():
        inside = weight_buffer(8, 16, torch.float32).copy_(torch.full((8, 16), 3.0))
        assert torch.equal(inside, torch.full((8, 16), 3.0))


def test_buffer_grows_to_the_largest_request_and_keeps_one_per_dtype():
    small = weight_buffer(2, 3, torch.bfloat16)
    large = weight_buffer(64, 64, torch.bfloat16)
    assert small.shape == (2, 3) and large.shape == (64, 64)
    assert weight_buffer(2, 3, torch.bfloat16).data_ptr() == large.data_ptr()  # reused, not reallocated
    assert weight_buffer(2, 3, torch.float32).dtype == torch.float32
