"""Serving benchmark: gemmakit serve vs llama.cpp's llama-server vs llama-cpp-python's server, same GGUF (not CI).

    python bench/serve_bench.py [--model default] [--levels 1,4,8,16] [--max-tokens 128] [--threads 2]
                                [--llama-server PATH] [--llama-cpp-python] [--duration-cap 180]

For each server and each concurrency level C, C clients each stream `--rounds` requests (one after another) from a
fixed prompt set to /v1/completions, greedy, `max_tokens` 128 with `ignore_eos` (gemmakit and llama-server; for
llama_cpp.server, which lacks it, logit_bias -100 on <eos> and <end_of_turn>) so every request runs to 128 tokens.
Reported per level: time to first token p50/p99 (request sent -> first text chunk), inter-token latency p50/p99
(gaps between text chunks), aggregate output tokens/s (all completion tokens / wall time of the level), errors,
and batch invariance: how many greedy outputs differ from the same prompt sent alone (level 1).

Peers (skipped, with a note, when absent):
- llama-server, built from the llama.cpp sources vendored in llama-cpp-python's source distribution:
      pip download --no-binary :all: --no-deps llama-cpp-python && tar xf llama_cpp_python-*.tar.gz
      cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF && cmake --build build --target llama-server -j2      # many minutes on 2 cores
  then pass --llama-server .../build/bin/llama-server (or put it on PATH, or set LLAMA_SERVER). It runs with the
  same GGUF, `-t THREADS`, `-np C` parallel slots and `-c 4096*C` context (4096 per slot, as ours).
- `python -m llama_cpp.server` (pip install 'llama-cpp-python[server]'), with --llama-cpp-python; it serves one
  request at a time.
gemmakit runs as `gemmakit serve MODEL --slots C` with OMP_NUM_THREADS=THREADS. Each server runs alone.
Every server gets one untimed 8-token request before its levels (first-use costs off the clock, for all alike).
`--duration-cap` stops starting new levels once that many seconds have passed. Results: a markdown table on stdout
and bench/results/serve-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The history of the printing press begins",
    "Once upon a time, in a small village by the sea,",
    "The three most important ideas in thermodynamics are",
    "Here is a recipe for a simple loaf of bread:",
    "The city council met on Tuesday to discuss",
    "In computer science, a hash table is",
    "The old lighthouse keeper looked out at the storm and",
    "Photosynthesis is the process by which",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    outputs: dict[int, list[str]] = field(default_factory=dict)
    differ_from_alone: int | None = None
    first_error: str | None = None  # what the first failed request said (printed to stderr)

    def failed(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what[:300]

    def row(self) -> dict:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"

        return {"server": self.server, "C": self.concurrency, "requests": self.requests, "errors": self.errors,
                "TTFT p50 ms": ms(percentile(self.ttft_ms, 50)), "TTFT p99 ms": ms(percentile(self.ttft_ms, 99)),
                "ITL p50 ms": ms(percentile(self.itl_ms, 50)), "ITL p99 ms": ms(percentile(self.itl_ms, 99)),
                "tok/s": f"{self.tokens / self.wall_s:.1f}" if self.wall_s else "-",
                "differ from alone": "-" if self.differ_from_alone is None else str(self.differ_from_alone)}


class Server:
    """A server subprocess on a free port, waited for on /health."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, free_port()
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import httpx

        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-bench-{self.name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become healthy; see {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, level: Level,
                      bias: dict[str, int]) -> str | None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"logit_bias": bias} if bias else {"ignore_eos": True})
    sent = time.perf_counter()
    last, text, tokens = None, [], 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                level.failed(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}")
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text") or ""
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            level.ttft_ms.append((now - sent) * 1e3)
                        else:
                            level.itl_ms.append((now - last) * 1e3)
                        last = now
                        text.append(piece)
    except Exception as err:  # noqa: BLE001 - a failed request is counted, the run goes on
        level.failed(f"{type(err).__name__}: {err}")
        return None
    level.requests += 1
    level.tokens += tokens or max_tokens
    return "".join(text)


async def run_level(server: Server, model: str, concurrency: int, rounds: int, max_tokens: int,
                    bias: dict[str, int]) -> Level:
    import httpx

    level = Level(server.name, concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(w: int) -> None:
            for r in range(rounds):
                index = (w * rounds + r) % len(PROMPTS)
                out = await one_request(client, server.url, model, PROMPTS[index], max_tokens, level, bias)
                if out is not None:
                    level.outputs.setdefault(index, []).append(out)

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        level.wall_s = time.perf_counter() - start
    return level


def bench_server(name: str, cmd_for, levels: list[int], args, bias: dict[str, int], deadline: float,
                 env: dict[str, str] | None = None, parallel: bool = True) -> list[Level]:
    results: list[Level] = []
    alone: dict[int, str] = {}
    # one server per level when the server's parallel slots are fixed at start (llama-server -np)
    groups = [[c] for c in levels] if parallel else [levels]
    for group in groups:
        if time.monotonic() > deadline:
            print(f"[{name}: duration cap reached, skipping levels {group}]", file=sys.stderr)
            continue
        with Server(name, cmd_for(max(group)), env) as server:
            # one untimed request first: each server's first-use costs (buffers, caches) stay off the clock
            asyncio.run(run_level(server, args.model_name, 1, 1, 8, bias))
            for c in group:
                if time.monotonic() > deadline:
                    break
                print(f"[{name}: concurrency {c}]", file=sys.stderr)
                level = asyncio.run(run_level(server, args.model_name, c, args.rounds, args.max_tokens, bias))
                if c == 1:
                    alone = {i: outs[0] for i, outs in level.outputs.items()}
                elif alone:
                    level.differ_from_alone = sum(o != alone[i] for i, outs in level.outputs.items() if i in alone
                                                  for o in outs)
                results.append(level)
                if level.first_error:
                    print(f"[{name}: concurrency {c}: {level.errors} failed, the first: {level.first_error}]",
                          file=sys.stderr)
                print("row: " + json.dumps(level.row()), flush=True)  # a run cut short still reports what it did
    return results


def constraint_cost(model: str) -> None:
    """llguidance's cost per token in the scheduler: `allows` on every token, `mask` only when the model's own
    choice breaks the grammar (greedy and two seeded samples of a small JSON schema)."""
    import statistics

    from gemmakit.api import load
    from gemmakit.chat import render_chat
    from gemmakit.decoding import Request, Sampling, Scheduler
    from gemmakit.serve.constrained import JsonConstraint, ll_tokenizer

    gemma = load(model)
    start = time.perf_counter()
    ll_tokenizer(gemma.tokenizer)
    print(f"vocabulary table ({gemma.tokenizer.vocab_size} tokens): {time.perf_counter() - start:.2f} s (once)")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 40}},
              "required": ["colour", "count", "ok", "note"], "additionalProperties": False}
    times: dict[str, list[float]] = {"allows": [], "mask": [], "advance": []}

    class Timed(JsonConstraint):
        def _time(self, name, fn, *a):
            t = time.perf_counter()
            out = fn(*a)
            times[name].append(time.perf_counter() - t)
            return out

        def allows(self, token):
            return self._time("allows", super().allows, token)

        def mask(self):
            return self._time("mask", super().mask)

        def advance(self, token):
            return self._time("advance", super().advance, token)

    prompt = render_chat([{"role": "user", "content": "Describe a colour as JSON."}], gemma.tokenizer)
    tokens = 0
    with Scheduler(gemma, slots=1) as sched:
        for temperature, seed in ((0.0, None), (0.8, 1), (0.8, 2)):
            start = time.perf_counter()
            constraint = Timed(gemma.tokenizer, schema)
            built = time.perf_counter() - start
            out = sched.submit(Request(prompt=prompt, sampling=Sampling(temperature=temperature, seed=seed),
                                       max_new_tokens=80, stop_ids=gemma.tokenizer.stop_ids,
                                       constraint=constraint)).result()
            tokens += len(out)
            print(f"T={temperature} seed={seed}: {len(out)} tokens, matcher built in {built * 1e3:.1f} ms: "
                  f"{gemma.tokenizer.decode(out)!r}")
    for name, values in times.items():
        print(f"{name}: {len(values)} calls over {tokens} tokens, median {statistics.median(values) * 1e6:.0f} us, "
              f"max {max(values) * 1e6:.0f} us")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a GGUF path or 'default' (the embedded 270M)")
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels (1 first: the batch-invariance reference)")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"))
    p.add_argument("--llama-cpp-python", action="store_true", help="also run python -m llama_cpp.server")
    p.add_argument("--duration-cap", type=float, default=1e9, help="start no new level after this many seconds")
    p.add_argument("--constraint-cost", action="store_true",
                   help="only measure llguidance's cost per token (json_schema decoding) in process, then exit")
    args = p.parse_args(argv)
    if args.constraint_cost:
        constraint_cost(args.model)
        return 0
    args.model_name = "bench"
    levels = [int(x) for x in args.levels.split(",")]
    from gemmakit.loader import resolve

    gguf = str(resolve(args.model))
    from gemmakit.api import load

    tok = load(gguf).tokenizer
    bias = {str(i): -100 for i in sorted(tok.stop_ids)}
    deadline = time.monotonic() + args.duration_cap
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: list[Level] = []
    notes: list[str] = []

    def ours(c: int) -> list[str]:
        return [sys.executable, "-m", "gemmakit.cli", "serve", gguf, "--port", "{port}", "--slots", str(max(c, 1)),
                "--served-model-name", args.model_name, "--no-explore", "--log-level", "warning"]

    results += bench_server("gemmakit", ours, levels, args, {}, deadline, env, parallel=False)
    if args.llama_server and Path(args.llama_server).exists():
        def llama(c: int) -> list[str]:
            return [args.llama_server, "-m", gguf, "-t", str(args.threads), "-np", str(c), "-c", str(4096 * c),
                    "--port", "{port}", "--host", "127.0.0.1", "-a", args.model_name]
        results += bench_server("llama-server", llama, levels, args, {}, deadline)
    else:
        notes.append("llama-server: not found (build it as the docstring says and pass --llama-server)")
    if args.llama_cpp_python:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            notes.append("llama_cpp.server: not installed (pip install 'llama-cpp-python[server]')")
        else:
            def lcp(c: int) -> list[str]:
                return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(args.threads),
                        "--port", "{port}", "--n_ctx", "4096", "--model_alias", args.model_name]
            results += bench_server("llama_cpp.server", lcp, levels, args, bias, deadline, parallel=False)
    rows = [r.row() for r in results]
    if rows:
        header = list(rows[0])
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(row[h]) for h in header) + " |")
    for note in notes:
        print(f"note: {note}")
    out = HERE / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows, "notes": notes,
                               "raw": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in results]},
                              indent=1))
    print(f"[written {out}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
