"""Continuous batching on the embedded Gemma 3 270M: aggregate decode speed with 1, 4, 8 and 16 concurrent
requests arriving staggered, a newcomer's time to first token while 7 streams run, and the prefix cache's savings
on a 4-turn chat. gemmakit's aggregate counts every output token from the first submission to the last token
(prompt prefills and the staggered arrivals included); llama.cpp's is given both ways: its decode steps alone
(prompts prefilled before the clock starts), and with its one-batch prefill of all prompts counted too.
Not CI: figures depend on the machine; quote them with the command that made them.

    .venv/bin/python bench/batch.py --threads 2 [--tokens 128] [--rounds 3]

Requests are greedy, 128 new tokens each (no stop), prompts of 20-60 tokens cut from ../shared/data (or a
built-in text), one new request every `--stagger` steps until N have joined. Aggregate tok/s counts every
output token from the first submission to the last token. Each level runs both sides `--rounds` times,
alternating, and reports the medians. llama.cpp's batched decoding is compared when
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


class LlamaBatch:
    """llama.cpp decoding several sequences in one batch (llama-cpp-python's low-level API, one context with a
    sequence per stream), greedy, on the same GGUF and token ids."""

    def __init__(self, path: str, streams: int, per_stream: int, threads: int) -> None:
        import llama_cpp as ll

        self.ll = ll
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
        params = ll.llama_context_default_params()
        params.n_ctx = streams * per_stream
        params.n_batch = params.n_ubatch = 1024
        params.n_seq_max = streams
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, params)
        self.vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(1024, 0, streams)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, wants logits) entries; greedy tokens of those that
        want logits, in order."""
        import numpy as np

        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if self.ll.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())
                for i, entry in enumerate(entries) if entry[3]]

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def llama_concurrent(path: str, prompt_ids: list[list[int]], tokens: int, threads: int) -> tuple[float, float]:
    """len(prompt_ids) sequences decoded together: aggregate output tok/s counting the decode steps only, and
    counting the prompts' prefill too (all prompts in one batch first, then `tokens` each: what gemmakit's figure
    counts, except that gemmakit's requests arrive staggered)."""
    n = len(prompt_ids)
    peer = LlamaBatch(path, n, max(map(len, prompt_ids)) + tokens + 8, threads)
    try:
        begin = time.perf_counter()
        chosen = peer.decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(prompt_ids) for j, t in enumerate(p)])
        pos = [len(p) for p in prompt_ids]
        start = time.perf_counter()
        for _ in range(tokens - 1):
            chosen = peer.decode([(chosen[s], pos[s], s, True) for s in range(n)])
            pos = [q + 1 for q in pos]
        end = time.perf_counter()
        return n * (tokens - 1) / (end - start), n * tokens / (end - begin)
    finally:
        peer.close()


def llama_newcomer_ttft(path: str, prompt_ids: list[list[int]], threads: int) -> float:
    """llama.cpp: a newcomer's prompt decoded in the same batch as the next token of the others (as
    llama-server's continuous batching does); its time to first token is that decode's time."""
    running, newcomer = prompt_ids[:-1], prompt_ids[-1]
    n = len(prompt_ids)
    peer = LlamaBatch(path, n, max(map(len, prompt_ids)) + 64, threads)
    try:
        chosen = peer.decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(running) for j, t in enumerate(p)])
        pos = [len(p) for p in running]
        for _ in range(20):
            chosen = peer.decode([(chosen[s], pos[s], s, True) for s in range(len(running))])
            pos = [q + 1 for q in pos]
        start = time.perf_counter()
        peer.decode([(chosen[s], pos[s], s, True) for s in range(len(running))]
                    + [(t, j, n - 1, j == len(newcomer) - 1) for j, t in enumerate(newcomer)])
        return time.perf_counter() - start
    finally:
        peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--stagger", type=int, default=2, help="decode steps between two arrivals")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side per level (medians)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = gemmakit.load("default")
    try:
        import llama_cpp  # noqa: F401

        peer_path = str(model.source)
    except ImportError:
        peer_path = None
    print(f"decoder: {model.decoder_choice.name} ({model.decoder_choice.reason}); threads {args.threads}")
    model.generate_ids([prompts(model, 1)[0]], 16)  # warm up (native build, caches)
    print("| concurrent | gemmakit aggregate tok/s | per stream | TTFT p50 ms | llama.cpp decode only | ratio "
          "| llama.cpp with prefill | ratio |\n|---|---|---|---|---|---|---|---|")
    for n in map(int, args.concurrency.split(",")):
        # alternating rounds, medians: one run of a few seconds on a shared host moves by 20%
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(run_concurrent(model, n, args.tokens, args.stagger))
            if peer_path:
                theirs.append(llama_concurrent(peer_path, prompts(model, n), args.tokens, args.threads))
        r = {key: statistics.median(o[key] for o in ours) for key in ours[0]}
        peer = [statistics.median(t[i] for t in theirs) for i in range(2)] if theirs else None
        peer_text = " | ".join(f"{p:.1f} | {r['tok_s'] / p:.2f}x" for p in peer) if peer else "- | - | - | -"
        print(f"| {n} | {r['tok_s']:.1f} | {r['per_stream']:.1f} | {r['ttft_p50_ms']:.0f} | {peer_text} |", flush=True)
    ours = newcomer_ttft(model, 7, 200)
    theirs = llama_newcomer_ttft(peer_path, prompts(model, 8), args.threads) if peer_path else None
    print(f"newcomer joining 7 running streams: time to first token gemmakit {1e3 * ours:.0f} ms"
          + (f", llama.cpp {1e3 * theirs:.0f} ms" if theirs else ""))
    total, reused = chat_savings(model)
    print(f"4-turn chat: {reused} of {total} prompt tokens reused from the prefix cache ({reused / total:.0%})")
    if peer_path is None:
        print("llama.cpp: llama-cpp-python is not installed here (make bench builds it); no peer figures")


if __name__ == "__main__":
    main()
