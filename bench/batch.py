"""Continuous batching on the embedded Gemma 3 270M: aggregate decode speed with 1, 4, 8 and 16 concurrent
requests arriving staggered, a newcomer's time to first token while 7 streams run, and the prefix cache's savings
on a 4-turn chat. Not CI: figures depend on the machine; quote them with the command that made them.

    .venv/bin/python bench/batch.py --threads 2 [--tokens 128]

Requests are greedy, 128 new tokens each (no stop), prompts of 20-60 tokens cut from ../shared/data (or a
built-in text), one new request every `--stagger` steps until N have joined. Aggregate tok/s counts every
output token from the first submission to the last token. llama.cpp's batched decoding is compared when
llama-cpp-python is installed (`make bench` builds it); otherwise only gemmakit's figures are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.decoding import Request, Scheduler

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def prompts(model, count: int) -> list[list[int]]:
    text = DATA.read_text()[:50000] if DATA.exists() else "The quick brown fox jumps over the lazy dog. " * 2000
    ids = model.tokenizer.encode(text, add_bos=False)
    out, at = [], 0
    for i in range(count):
        length = 20 + (i * 13) % 41
        out.append([model.tokenizer.bos_id] + ids[at:at + length])
        at += length
    return out


def run_concurrent(model, n: int, tokens: int, stagger: int) -> dict:
    scheduler = Scheduler(model, slots=max(n, 1), prefix_cache_bytes=0)
    pending = [Request(p, max_new_tokens=tokens) for p in prompts(model, n)]
    handles = []
    start = time.perf_counter()
    while pending or not all(h.done for h in handles):
        if pending and scheduler.steps % stagger == 0:
            handles.append(scheduler.submit(pending.pop(0)))
        scheduler.step()
    elapsed = time.perf_counter() - start
    total = sum(len(h.tokens) for h in handles)
    ttft = [h.first_token_time - h.submitted for h in handles]
    return {"n": n, "tok_s": total / elapsed, "per_stream": total / elapsed / n,
            "ttft_p50_ms": 1e3 * statistics.median(ttft)}


def newcomer_ttft(model, running: int, tokens: int) -> float:
    """Time to first token of a request that joins `running` streams already decoding."""
    scheduler = Scheduler(model, slots=running + 1, prefix_cache_bytes=0)
    for p in prompts(model, running):
        scheduler.submit(Request(p, max_new_tokens=tokens))
    for _ in range(40):  # all prompts prefilled, every stream decoding
        scheduler.step()
    newcomer = scheduler.submit(Request(prompts(model, running + 1)[-1], max_new_tokens=4))
    while newcomer.first_token_time is None:
        scheduler.step()
    return newcomer.first_token_time - newcomer.submitted


def chat_savings(model) -> tuple[int, int]:
    """Prompt tokens computed vs reused over a 4-turn chat whose turns resend the whole history."""
    from gemmakit.chat import render_chat

    scheduler = Scheduler(model, slots=1)
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    questions = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?",
                 "Name a river in each."]
    total = reused = 0
    for question in questions:
        messages.append({"role": "user", "content": question})
        ids = render_chat(messages, model.tokenizer)
        handle = scheduler.submit(Request(ids, max_new_tokens=32, stop_ids=model.tokenizer.stop_ids))
        scheduler.run_until_done([handle])
        total += handle.prompt_tokens
        reused += handle.cached_tokens
        messages.append({"role": "assistant", "content": model.tokenizer.decode(handle.tokens)})
    return total, reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--stagger", type=int, default=2, help="decode steps between two arrivals")
    parser.add_argument("--concurrency", default="1,4,8,16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = gemmakit.load("default")
    print(f"decoder: {model.decoder_choice.name} ({model.decoder_choice.reason}); threads {args.threads}")
    model.generate_ids([prompts(model, 1)[0]], 16)  # warm up (native build, caches)
    print("| concurrent | aggregate tok/s | per stream | TTFT p50 ms |\n|---|---|---|---|")
    for n in map(int, args.concurrency.split(",")):
        r = run_concurrent(model, n, args.tokens, args.stagger)
        print(f"| {n} | {r['tok_s']:.1f} | {r['per_stream']:.1f} | {r['ttft_p50_ms']:.0f} |", flush=True)
    print(f"newcomer joining 7 running streams: time to first token {1e3 * newcomer_ttft(model, 7, 200):.0f} ms")
    total, reused = chat_savings(model)
    print(f"4-turn chat: {reused} of {total} prompt tokens reused from the prefix cache ({reused / total:.0%})")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed here (make bench builds it); no peer figures")


if __name__ == "__main__":
    main()
