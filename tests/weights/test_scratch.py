"""The per-thread weight buffer (gemmakit/scratch.py) that prompt products decode into."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from gemmakit.scratch import weight_buffer


def in_new_thread(body: Callable[[], None]) -> None:
    """Run `body` where no buffer exists yet (buffers are per thread), re-raising what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as e:  # noqa: BLE001 - handed back to the test's thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def test_buffer_is_writable_inside_and_outside_inference_mode():
    """A buffer first made under torch.inference_mode is written by a later product outside it (a training run's
    prompt after a generation), and the other way round."""
    def body() -> None:
        with torch.inference_mode():
            weight_buffer(8, 16, torch.float32).copy_(torch.ones(8, 16))
        outside = weight_buffer(4, 16, torch.float32).copy_(torch.full((4, 16), 2.0))
        assert torch.equal(outside, torch.full((4, 16), 2.0))
        with torch.inference_mode():
            inside = weight_buffer(8, 16, torch.float32).copy_(torch.full((8, 16), 3.0))
            assert torch.equal(inside, torch.full((8, 16), 3.0))

    in_new_thread(body)


def test_buffer_grows_to_the_largest_request_and_keeps_one_per_dtype():
    def body() -> None:
        small = weight_buffer(2, 3, torch.bfloat16)
        large = weight_buffer(64, 64, torch.bfloat16)
        assert small.shape == (2, 3) and large.shape == (64, 64)
        assert weight_buffer(2, 3, torch.bfloat16).data_ptr() == large.data_ptr()  # reused, not reallocated
        other = weight_buffer(2, 3, torch.float32)
        assert other.dtype == torch.float32 and weight_buffer(2, 3, torch.bfloat16).data_ptr() == large.data_ptr()

    in_new_thread(body)
