"""Continuous batching: a request's tokens do not depend on what else runs with it.

Requests arrive at staggered steps, with different lengths, stop tokens, sampling and a cancellation, and each
must yield exactly the tokens it yields alone (greedy, and seeded sampling), on the eager decoder (fp32 tiny
Gemma 1/2/3) and on the native one (the rows of one native call at different positions). A cancelled request's
row serves the next request; a prefix-cache hit gives bit-identical log-probabilities to a cold run, and the
cache's byte budget is never exceeded.
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.decoding import EagerDecoder, Request, Sampling, Scheduler, choose_decoder, generate_tokens, native
from gemmakit.loader import build_model
from gemmakit.quant import quantize_model
from gemmakit.weights import hf
from support.tiny_models import VOCAB, WINDOW, save_hf_model
from support.train_helpers import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, torch.nn.Module]:
    out = {}
    for family in ("gemma", "gemma2", "gemma3"):
        directory = tmp_path_factory.mktemp(family)
        save_hf_model(family, directory)
        out[family] = build_model(hf.read_config(directory), hf.read_state_dict(directory), torch.float32,
                                  directory).eval()
    return out


def prompt(seed: int, length: int) -> list[int]:
    return [2] + torch.randint(3, VOCAB, (length - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, request: Request, decoder=None, **options) -> list[int]:
    scheduler = Scheduler(model, slots=1, decoder=decoder, **options)
    handle = scheduler.submit(request)
    scheduler.run_until_done([handle])
    return handle.tokens


REQUESTS = [  # prompts that pass the window (8), several chunks of 8, stop ids, sampling with seeds
    Request(prompt(1, 21), max_new_tokens=2 * WINDOW + 3),
    Request(prompt(2, 5), Sampling(temperature=0.9, top_k=50, seed=7), max_new_tokens=20),
    Request(prompt(3, 13), max_new_tokens=30, stop_ids=frozenset({11, 12, 13, 14, 15})),
    Request(prompt(4, 9), Sampling(temperature=1.2, top_p=0.9, min_p=0.02, seed=3), max_new_tokens=25),
    Request(prompt(5, 30), max_new_tokens=12),
]


def staggered(model, decoder=None, cancel: int | None = 2) -> list:
    """Submit REQUESTS one every two steps into 3 slots (so some wait), cancelling one after its 4th token."""
    scheduler = Scheduler(model, slots=3, prefill_chunk=8, decoder=decoder)
    handles = []
    pending = list(REQUESTS)
    while pending or not all(h.done for h in handles):
        if pending and scheduler.steps % 2 == 0:
            handles.append(scheduler.submit(pending.pop(0)))
        if cancel is not None and len(handles) > cancel and len(handles[cancel].tokens) >= 4:
            handles[cancel].cancel()
        scheduler.step()
    return handles


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_staggered_requests_yield_what_each_yields_alone(models, family):
    model = models[family]
    handles = staggered(model, cancel=2)
    for i, (handle, request) in enumerate(zip(handles, REQUESTS, strict=True)):
        expected = alone(model, request, prefill_chunk=8)
        if i == 2:
            assert handle.finish_reason == "cancelled"
            assert 4 <= len(handle.tokens) < len(expected) or expected[:4] == handle.tokens[:4]
            assert handle.tokens == expected[:len(handle.tokens)]
        else:
            assert handle.tokens == expected, (i, handle.finish_reason)
            assert handle.finish_reason in ("stop", "length")
    assert any(h.finish_reason == "length" for h in handles)
    assert len({t for h in handles for t in h.tokens}) > 10  # real sequences, not one token repeated


def test_greedy_matches_the_one_batch_engine(models):
    """The scheduler's chunked, per-row generation gives the greedy tokens of the left-padded batch engine."""
    model = models["gemma3"]
    prompts = [prompt(8, 11), prompt(9, 4)]
    batch = torch.stack(list(generate_tokens(model, prompts, 2 * WINDOW))).T.tolist()
    for p, expected in zip(prompts, batch, strict=True):
        assert alone(model, Request(p, max_new_tokens=2 * WINDOW)) == expected


def test_a_cancelled_request_frees_its_row_for_the_next(models):
    model = models["gemma2"]
    scheduler = Scheduler(model, slots=1)
    first = scheduler.submit(Request(prompt(10, 6), max_new_tokens=50))
    second = scheduler.submit(Request(prompt(11, 7), max_new_tokens=10))
    while len(first.tokens) < 3:
        scheduler.step()
    assert scheduler.stats()["queue_length"] == 1  # the second waits for the only row
    first.cancel()
    scheduler.run_until_done([second])
    assert first.finish_reason == "cancelled" and len(first.tokens) == 3
    assert second.tokens == alone(model, Request(prompt(11, 7), max_new_tokens=10))
    assert scheduler.stats()["busy_slots"] == 0


def test_warm_up_leaves_no_trace(models):
    """What the server runs before its first request: afterwards no row is busy, the prefix cache is empty, the
    step count is 0, and a request decodes as on a fresh scheduler."""
    model = models["gemma3"]
    scheduler = Scheduler(model, slots=2)
    scheduler.warm_up()
    assert scheduler.stats() == dict(busy_slots=0, queue_length=0, slots=2, prefix_hits=0, prefix_cached_tokens=0,
                                     prefix_cache_bytes=0, steps=0)
    request = Request(prompt(70, 9), max_new_tokens=12)
    handle = scheduler.submit(request)
    scheduler.run_until_done([handle])
    assert handle.tokens == alone(model, request)


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_prefix_cache_hit_gives_the_cold_run_logprobs(models, family):
    """A shared 27-token prefix (past the window) is restored from the snapshot at 24 (chunks of 8): the second
    request computes its first logits from the restored keys and values, bit-identical to a cold run."""
    model = models[family]
    system = prompt(12, 27)
    first, second = system + prompt(13, 6)[1:], system + prompt(14, 9)[1:]
    warm = Scheduler(model, slots=2, prefill_chunk=8, prefix_cache_bytes=64 << 20)
    warm.run_until_done([warm.submit(Request(system + [5], max_new_tokens=3))])
    handles = [warm.submit(Request(p, max_new_tokens=6, logprobs=3)) for p in (first, second)]
    warm.run_until_done(handles)
    assert [h.cached_tokens for h in handles] == [24, 24]
    assert warm.stats()["prefix_hits"] == 2
    for p, handle in zip((first, second), handles, strict=True):
        cold = Scheduler(model, slots=1, prefill_chunk=8, prefix_cache_bytes=0)
        reference = cold.submit(Request(p, max_new_tokens=6, logprobs=3))
        events = []
        while not reference.done:
            cold.step()
        for event, got in zip(reference, _events(handle), strict=True):
            events.append(event)
            assert got == event  # token, its log-probability and the top 3 alternatives, exactly
        assert reference.cached_tokens == 0 and len(events) == 6


def _events(handle):
    return list(handle)


def test_prefix_cache_stays_within_its_budget(models):
    model = models["gemma3"]
    one = Scheduler(model, slots=1, prefill_chunk=8, prefix_cache_bytes=1 << 30)
    one.run_until_done([one.submit(Request(prompt(20, 17), max_new_tokens=1))])
    entry = one.prefix_cache.nbytes  # one snapshot at 16 tokens
    budget = int(2.5 * entry)
    scheduler = Scheduler(model, slots=2, prefill_chunk=8, prefix_cache_bytes=budget)
    for seed in range(21, 27):
        scheduler.run_until_done([scheduler.submit(Request(prompt(seed, 17), max_new_tokens=1))])
        assert scheduler.prefix_cache.nbytes <= budget
    assert len(scheduler.prefix_cache) == 2  # the least recently used were evicted
    hit = scheduler.submit(Request(prompt(26, 17) + [9], max_new_tokens=1))
    miss = scheduler.submit(Request(prompt(21, 17) + [9], max_new_tokens=1))
    scheduler.run_until_done([hit, miss])
    assert hit.cached_tokens == 16 and miss.cached_tokens == 0


def test_submit_rejects_what_cannot_run(models):
    from gemmakit.decoding import QueueFull
    from gemmakit.errors import InputError

    scheduler = Scheduler(models["gemma"], slots=1, context=32, max_queue=1)
    with pytest.raises(InputError, match="context"):
        scheduler.submit(Request(list(range(2, 40))))
    with pytest.raises(InputError, match="token ids"):
        scheduler.submit(Request([2, VOCAB + 5]))
    scheduler.submit(Request([2, 7]))
    with pytest.raises(QueueFull):
        scheduler.submit(Request([2, 8]))


def test_a_full_row_ends_with_length(models):
    scheduler = Scheduler(models["gemma3"], slots=1, context=12)
    handle = scheduler.submit(Request(prompt(30, 10), max_new_tokens=50))
    scheduler.run_until_done([handle])
    assert handle.finish_reason == "length" and len(handle.tokens) == 3  # positions 10 and 11 fed, then full


def test_threaded_scheduler_streams_and_async_events(models):
    import asyncio

    model = models["gemma2"]
    requests = [Request(prompt(40 + i, 6 + i), max_new_tokens=8) for i in range(4)]
    expected = [alone(model, r) for r in requests]
    with Scheduler(model, slots=2) as scheduler:
        handles = [scheduler.submit(r) for r in requests]

        async def consume(handle):
            return [event.token async for event in handle.events()]

        async def main():
            return await asyncio.gather(*(consume(h) for h in handles[:2]))

        got = asyncio.run(main()) + [[e.token for e in h] for h in handles[2:]]
    assert got == expected


# --- the native decoder: rows at different positions in one call ----------------------------------------------
@pytest.fixture(scope="module")
def int8_models(models) -> dict[str, torch.nn.Module]:
    if native.library() is None:
        pytest.skip("no C++ compiler to build the native step")
    return {family: quantize_model(model, "int8", dtype=torch.float32) for family, model in models.items()}


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_native_rows_in_one_call_equal_each_row_alone(int8_models, family):
    model = int8_models[family]
    decoder = choose_decoder(model).decoder
    assert decoder.name == "native"
    handles = staggered(model, decoder=decoder, cancel=None)
    for handle, request in zip(handles, REQUESTS, strict=True):
        assert handle.tokens == alone(model, request, decoder=decoder, prefill_chunk=8)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_every_decoder_gives_the_same_tokens(int8_models, family):
    """Eager and native decoders of the same int8 model with fp32 activations: the same greedy and seeded
    sampled tokens, through the one-batch engine and through the scheduler."""
    model = int8_models[family]
    decoders = [EagerDecoder(model), choose_decoder(model).decoder]
    assert [d.name for d in decoders] == ["eager", "native"]
    prompts = [prompt(50, 9), prompt(51, 14)]
    for sampling in (Sampling(), Sampling(temperature=0.8, top_k=40, seed=5)):
        outputs = [torch.stack(list(generate_tokens(model, prompts, 2 * WINDOW, sampling, decoder=d))).tolist()
                   for d in decoders]
        assert outputs[0] == outputs[1]
        scheduled = [[alone(model, Request(p, sampling, 2 * WINDOW), decoder=d) for p in prompts] for d in decoders]
        assert scheduled[0] == scheduled[1]


def test_native_steps_a_pool_wider_than_one_call_in_groups(int8_models):
    """18 rows in a 20-slot pool: the native decoder still runs (in groups of MAX_BATCH) and each row decodes as
    it does alone."""
    model = int8_models["gemma3"]
    decoder = choose_decoder(model).decoder
    calls = []
    run = decoder._run  # every native layer pass goes through it
    decoder._run = lambda binding, ids, rows, times, *a: calls.append(len(rows)) or run(binding, ids, rows, times, *a)
    requests = [Request(prompt(60 + i, 4 + i % 5), max_new_tokens=30) for i in range(18)]  # all 18 overlap
    scheduler = Scheduler(model, slots=20, decoder=decoder)
    handles = [scheduler.submit(r) for r in requests]
    scheduler.run_until_done(handles)
    assert max(calls) == native.MAX_BATCH and scheduler._slots.batch_size == 20
    for handle, request in zip(handles, requests, strict=True):
        assert handle.tokens == alone(model, request, decoder=decoder)
