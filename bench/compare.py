"""gemmakit vs llama.cpp (llama-cpp-python) vs transformers on the same GGUF, each in its own subprocess.

    python bench/compare.py [--model default [PATH ...]] [--quick] [--threads 2] [--windows 4] [--runners ...]

Figures (issue 3): decode tok/s (batch 1, greedy, 128 new tokens after a ~50-token prompt, timed after a 16-token
warm-up decode in the same process; prefill excluded),
prefill tok/s (1024-token prompt, last-position logits only), perplexity on tinyshakespeare (512-token
windows, the same token ids for everyone), load time (second load in the same process; transformers: first,
since it re-converts every time anyway), peak resident memory while decoding (VmHWM, reset just before
decoding starts), and decode as a fraction of the memory-bandwidth limit (bandwidth / bytes of weights read
per token; the bandwidth is measured at the start of the run, a 256 MB fp32 reduction with the same threads,
and the issue's 24 GB/s is reported beside it). Every runner gets the same token ids (made once by gemmakit's
tokenizer), the same thread count, and runs alone. Then gemmakit and llama.cpp decode alternately in fresh
processes (`--decode-rounds`) and the median of the per-round ratios is printed: on a shared machine one run
of each is noise.
Loading (issue 13), each load in a fresh process for gemmakit and llama.cpp alike: the first load (gemmakit with
an empty `GEMMAKIT_CACHE`, so the conversion is timed; the native library is shared, built beforehand) and the
warm load (the next fresh process), each with its process's peak RSS; the converted file's size beside them.
Every gemmakit child of a run uses that bench cache (deleted afterwards unless --keep-cache), so a run never
fills the user's cache with big conversions.
Several `--model` values give a table per file. `--quick` (64 new tokens, a 512-token prefill, 1 window,
2 rounds, runners gemmakit and llama.cpp) is for big files. Random-weight files (`bench/real_shapes.py`) skip
perplexity, which means nothing there, and by default run only gemmakit, gemmakit-eager and llama.cpp
(transformers and the fp32 reference dequantise the whole model to fp32).
Prints a table per file and writes bench/results/compare-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
ISSUE_BANDWIDTH = 24e9  # bytes/s, as issue 3 states it for this machine (our kernels stream ~2x that)
# gemmakit: default load (int8, native decode step); -eager: the same model decoded by torch ops
RUNNERS = ("gemmakit", "gemmakit-eager", "gemmakit-compiled", "gemmakit-fp32", "llama.cpp", "transformers")
RANDOM_RUNNERS = ("gemmakit", "gemmakit-eager", "llama.cpp")  # default for random-weight files
QUICK = {"new_tokens": 64, "prefill_tokens": 512, "windows": 1, "decode_rounds": 2}


# --- the parent: make tokens, run each runner alone, print the table ---------------------------------------------
def make_tokens(model: str, args: argparse.Namespace) -> dict:
    from real_shapes import is_random_model

    from gemmakit.loader import resolve
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.weights.gguf_reader import GGUFFile

    path = resolve(model)
    with GGUFFile(path) as f:
        tok = Tokenizer.from_gguf_metadata(f.metadata, str(path))
        name = f.metadata.get("general.name")
    random = is_random_model(path, name if isinstance(name, str) else None)
    text = Path(args.data).read_text()
    ids = tok.encode(text[:200_000], add_bos=False)
    bos = tok.bos_id
    need = args.windows * args.window
    windows = [[bos] + ids[i * args.window:(i + 1) * args.window - 1] for i in range(args.windows)]
    assert len(ids) > need + 2000
    return {
        "path": str(path),
        "decode_prompt": [bos] + ids[need:need + args.prompt_tokens - 1],
        "new_tokens": args.new_tokens,
        "prefill_prompt": [bos] + ids[need + 100:need + 100 + args.prefill_tokens - 1],
        "windows": [] if random else windows,  # perplexity of random weights means nothing: skipped
        "random": random,
        "threads": args.threads,
    }


def run_child(name: str, tokens_file: str, timeout: int, env_extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(json.load(open(tokens_file))["threads"]), TOKENIZERS_PARALLELISM="0",
               **(env_extra or {}))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        result_file = out.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--tokens", tokens_file,
           "--result", result_file]
    print(f"[bench] running {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200] if (proc.stderr or proc.stdout)
                else f"exit {proc.returncode}"}
    result = json.loads(Path(result_file).read_text())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"[bench] {name}: {result}", file=sys.stderr, flush=True)
    return result


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "-" if not a or not b else f"{a / b:.{digits}f}x"


def table(results: dict[str, dict], random: bool = False) -> str:
    g, ge, gc, f32, lc, tf = (results.get(k, {}) for k in RUNNERS)
    rows = [
        ("decode tok/s", "decode_tps", 1, [("/llama.cpp", g, lc, False), ("/transformers", g, tf, False),
                                           ("eager/llama.cpp", ge, lc, False), ("compiled/llama.cpp", gc, lc, False)]),
        ("prefill tok/s", "prefill_tps", 0, [("/llama.cpp", g, lc, False), ("/transformers", g, tf, False)]),
        ("perplexity", "ppl", 3, [("/fp32 ref", g, f32, False), ("llama.cpp/fp32 ref", lc, f32, False)]),
        ("load s, same proc", "load_s", 2, [("/llama.cpp", g, lc, False)]),
        ("first load s", "first_load_fresh_s", 1, [("/llama.cpp", g, lc, False)]),
        ("first load RSS MB", "first_load_rss_mb", 0, [("/llama.cpp", g, lc, False)]),
        ("converted MB", "converted_mb", 0, []),
        ("warm load s", "warm_load_s", 2, [("/llama.cpp", g, lc, False)]),
        ("warm load RSS MB", "warm_load_rss_mb", 0, [("/llama.cpp", g, lc, False)]),
        ("import s", "import_s", 1, []),
        ("compile s", "compile_s", 1, []),
        ("peak RSS MB decode", "rss_mb", 0, [("/llama.cpp", g, lc, False)]),
        ("MB weights/token", "bytes_per_token_mb", 0, []),
        ("decode / bw limit", "bw_fraction", 2, []),
        ("decode / issue bw", "bw_fraction_issue", 2, []),
        ("load avg (1 min)", "loadavg_1min", 1, []),
    ]
    names = [n for n in RUNNERS if n in results]
    head = f"| {'figure':<18} | " + " | ".join(f"{n:>13}" for n in names) + " | ratios (gemmakit unless named) |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for label, key, digits, ratios in rows:
        cells = " | ".join(f"{fmt(results.get(n, {}).get(key), digits):>13}" for n in names)
        rs = ", ".join(f"{rl} {ratio(a.get(key), b.get(key), 4 if key == 'ppl' else 2)}" for rl, a, b, _ in ratios)
        lines.append(f"| {label:<18} | {cells} | {rs} |")
    errors = [f"{n}: {r['error']}" for n, r in results.items() if "error" in r]
    notes = ["perplexity: skipped (random weights: bench/real_shapes.py)"] if random else []
    notes.append("first load: a fresh process, gemmakit with an empty GEMMAKIT_CACHE (the conversion is timed); "
                 "warm load: the next fresh process; both exclude the library's import (its own row); RSS: that "
                 "process's peak (VmHWM), Python and imports included; the file is in the page cache for both")
    return "\n".join(lines + [""] + notes + errors)


def measure_bandwidth(threads: int) -> float:
    """Bytes/s of a 256 MB fp32 max-reduction (best of 5): what streaming weights can reach on this machine."""
    import torch

    torch.set_num_threads(threads)
    values = torch.ones(64 << 20)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        values.amax()
        best = min(best, time.perf_counter() - start)
    return values.numel() * 4 / best


def interleaved_decode(tokens_file: str, rounds: int, timeout: int, env: dict[str, str] | None = None) -> dict | None:
    """gemmakit and llama.cpp decode, alternating in fresh processes; the median of per-round ratios."""
    import statistics

    ours, theirs, ratios = [], [], []
    for _ in range(rounds):
        a = run_child("decode:gemmakit", tokens_file, timeout, env)
        b = run_child("decode:llama.cpp", tokens_file, timeout)
        if "error" in a or "error" in b:
            return {"summary": f"interleaved decode failed: {a.get('error') or b.get('error')}"}
        ours.append(a["decode_tps"])
        theirs.append(b["decode_tps"])
        ratios.append(a["decode_tps"] / b["decode_tps"])
    summary = (f"interleaved decode, {rounds} rounds: gemmakit median {statistics.median(ours):.1f} tok/s "
               f"({min(ours):.1f}-{max(ours):.1f}), llama.cpp median {statistics.median(theirs):.1f} "
               f"({min(theirs):.1f}-{max(theirs):.1f}); ratio median {statistics.median(ratios):.2f}x "
               f"(per round {min(ratios):.2f}-{max(ratios):.2f}x)")
    return {"gemmakit": ours, "llama.cpp": theirs, "ratios": ratios, "summary": summary}


def bench_cache() -> Path:
    """An empty GEMMAKIT_CACHE for one file's run, on the cache's own disk, sharing the user's native library
    (built now, so no child times a compile)."""
    from gemmakit.decoding.native.build import library
    from gemmakit.weights.converted import cache_root

    library()
    root = cache_root()
    (root / "native").mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=".bench-cache-", dir=root))
    (cache / "native").symlink_to(root / "native", target_is_directory=True)
    return cache


def measure_loads(tokens_file: str, cache: Path, timeout: int) -> dict[str, dict]:
    """First and warm loads, each in a fresh process: gemmakit converting into the empty `cache`, then reading
    it; llama.cpp twice (its first load is its only kind, the page cache warm after the first)."""
    env = {"GEMMAKIT_CACHE": str(cache)}
    out: dict[str, dict] = {"gemmakit": {}, "llama.cpp": {}}
    for runner in out:
        for kind in ("first_load", "warm_load"):
            r = run_child(f"load:{runner}", tokens_file, timeout, env)
            if "error" in r:
                out[runner].setdefault("error", f"{kind}: {r['error']}")
                continue
            out[runner][f"{kind}_fresh_s" if kind == "first_load" else f"{kind}_s"] = r["load_s"]
            out[runner][f"{kind}_rss_mb"] = r["peak_rss_mb"]
            out[runner]["import_s"] = min(r["import_s"], out[runner].get("import_s", float("inf")))
        if runner == "gemmakit":
            files = [f for f in cache.glob("*") if f.is_file()]
            out[runner]["converted_mb"] = sum(f.stat().st_size for f in files) / 1e6 if files else None
    return out


def compare_one(model: str, args: argparse.Namespace, bandwidth: float) -> dict:
    """Every runner on one file, the loads, the interleaved rounds: one table and one record."""
    tokens = make_tokens(model, args)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(tokens, f)
    runners = args.runners if args.runners is not None else ",".join(
        ("gemmakit", "llama.cpp") if args.quick else RANDOM_RUNNERS if tokens["random"] else RUNNERS)
    size = Path(tokens["path"]).stat().st_size
    print(f"[bench] {tokens['path']} ({size / 1e9:.2f} GB){' random weights' if tokens['random'] else ''}; "
          f"runners {runners}", file=sys.stderr, flush=True)
    cache = bench_cache()
    env = {"GEMMAKIT_CACHE": str(cache)}
    try:
        loads = measure_loads(f.name, cache, args.timeout) if args.loads else {}
        results = {name: run_child(name, f.name, args.timeout, env) for name in runners.split(",") if name}
        for runner, figures in loads.items():  # load figures join the runner's column (made if absent)
            target = results.setdefault(runner, {})
            for key, value in figures.items():
                if key == "error":
                    target.setdefault("error", value)
                else:
                    target[key] = value
        for result in results.values():
            if result.get("bytes_per_token") and result.get("decode_tps"):
                result["bw_fraction"] = result["decode_tps"] * result["bytes_per_token"] / bandwidth
                result["bw_fraction_issue"] = result["decode_tps"] * result["bytes_per_token"] / ISSUE_BANDWIDTH
        text = table(results, tokens["random"])
        rounds = interleaved_decode(f.name, args.decode_rounds, args.timeout, env) if args.decode_rounds else None
    finally:
        if args.keep_cache:
            print(f"[bench] bench cache kept: {cache}", file=sys.stderr)
        else:
            shutil.rmtree(cache, ignore_errors=True)
    head = f"### {Path(tokens['path']).name} ({size / 1e9:.2f} GB, {args.threads} threads)"
    print(f"\n{head}\n\n{text}")
    if rounds:
        print("\n" + rounds["summary"])
    return {"model": tokens["path"], "file_bytes": size, "random": tokens["random"], "runners": runners,
            "results": results, "table": text, "interleaved_decode": rounds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", dest="models", action="extend", nargs="+",
                   help="GGUF file(s), or 'default' (Gemma 3 270M Q4_K_M); repeatable; a table per file")
    p.add_argument("--quick", action="store_true",
                   help="for big files: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                   + ", runners gemmakit,llama.cpp (explicit options win)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=None, help="512-token perplexity windows (default 4)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens timed (default 128)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt length (default 1024)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--runners", default=None,
                   help=f"comma list of {', '.join(RUNNERS)} (default: all; {','.join(RANDOM_RUNNERS)} for "
                        "random-weight files; '' for none: only the loads)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per runner")
    p.add_argument("--decode-rounds", type=int, default=None,
                   help="then alternate gemmakit and llama.cpp decode-only runs this many times (0: skip) and "
                        "report the median ratio: on a shared machine one run each is noise (default 5)")
    p.add_argument("--no-loads", dest="loads", action="store_false",
                   help="skip the fresh-process first/warm load measurements")
    p.add_argument("--keep-cache", action="store_true", help="keep the run's conversion cache (printed)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.result)
    defaults = {"new_tokens": 128, "prefill_tokens": 1024, "windows": 4, "decode_rounds": 5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    bandwidth = measure_bandwidth(args.threads)
    print(f"[bench] memory bandwidth, {args.threads} threads: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    records = [compare_one(model, args, bandwidth) for model in args.models or ["default"]]
    print(f"\n(bandwidth limit: {bandwidth / 1e9:.1f} GB/s measured now; 'issue bw' uses the issue's 24 GB/s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"time": stamp, "threads": args.threads, "windows": args.windows, "quick": args.quick,
              "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
              "bandwidth_bytes_per_s": bandwidth, "files": records}
    (out / f"compare-{stamp}.json").write_text(json.dumps(record, indent=2))
    print(f"\nwritten {out / f'compare-{stamp}.json'}")
    return 0


# --- the children: one runner each -----------------------------------------------------------------------------------
def vm_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0), so the peak is that of decoding alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def nll_sum(logits, targets) -> float:
    import torch

    return torch.nn.functional.cross_entropy(torch.as_tensor(logits).float(), torch.as_tensor(targets),
                                             reduction="sum").item()


def perplexity(window_logits) -> float | None:
    """exp(mean NLL) over all windows; `window_logits(ids)` gives logits [T, V] for one window. None without
    windows (random-weight files)."""
    import math

    if not TOKENS["windows"]:
        return None
    total, count = 0.0, 0
    for ids in TOKENS["windows"]:
        total += nll_sum(window_logits(ids)[:-1], ids[1:])
        count += len(ids) - 1
    return math.exp(total / count)


def child(name: str, tokens_file: str, result_file: str) -> int:
    global TOKENS
    TOKENS = json.loads(Path(tokens_file).read_text())
    import torch

    torch.set_num_threads(TOKENS["threads"])
    if name.startswith("decode:"):
        Path(result_file).write_text(json.dumps(decode_only(name.removeprefix("decode:"))))
        return 0
    if name.startswith("load:"):
        Path(result_file).write_text(json.dumps(load_only(name.removeprefix("load:"))))
        return 0
    runners = {"gemmakit": run_gemmakit, "gemmakit-eager": run_gemmakit_eager,
               "gemmakit-compiled": run_gemmakit_compiled, "gemmakit-fp32": run_gemmakit_fp32,
               "llama.cpp": run_llama, "transformers": run_transformers}
    result = runners[name]()
    if result.get("bytes_per_token"):
        result["bytes_per_token_mb"] = result["bytes_per_token"] / 1e6
    result["loadavg_1min"] = os.getloadavg()[0]  # other work on the machine skews every figure: recorded
    Path(result_file).write_text(json.dumps(result))
    return 0


TOKENS: dict = {}


def _gemmakit(**load_kw) -> dict:
    import torch

    import gemmakit
    from gemmakit.cache import KVCache
    from gemmakit.quant import weight_bytes_per_token

    path = TOKENS["path"]
    start = time.perf_counter()
    model = gemmakit.load(path, **load_kw)
    first = time.perf_counter() - start
    del model
    start = time.perf_counter()
    model = gemmakit.load(path, **load_kw)
    load_s = time.perf_counter() - start
    mod = model.module
    n = TOKENS["new_tokens"]
    compile_s = None
    if load_kw.get("compile"):  # compile (or fetch from inductor's disk cache) outside the timed run
        start = time.perf_counter()
        model.generate_ids([TOKENS["decode_prompt"]], n)
        compile_s = time.perf_counter() - start
    # the native greedy step reads the 3-bit ranker; the eager and compiled paths read the int4 head
    ranked = bool(getattr(model.decoder, "greedy_reads_ranker", False))
    _gemmakit_decode_tps(model, WARMUP_TOKENS)
    reset_peak_rss()
    decode_tps = _gemmakit_decode_tps(model)
    rss = vm_kb("VmHWM") / 1024
    ids = torch.tensor([TOKENS["prefill_prompt"]])
    with torch.inference_mode():
        best = float("inf")
        for _ in range(2):
            cache = KVCache(mod.config, 1, ids.shape[1], mod.dtype)
            start = time.perf_counter()
            mod(ids, cache=cache, last_only=True)
            best = min(best, time.perf_counter() - start)

        def window_logits(w):
            return mod(torch.tensor([w]))[0]

        ppl = perplexity(window_logits)
    return {"load_s": load_s, "first_load_s": first, "decode_tps": decode_tps, "prefill_tps": ids.shape[1] / best,
            "ppl": ppl, "rss_mb": rss, "bytes_per_token": weight_bytes_per_token(mod, ranked=ranked),
            "scheme": str(getattr(mod, "quant_scheme", None)), "compile_s": compile_s}


WARMUP_TOKENS = 16  # every runner decodes this many tokens once before the timed decode (first-run costs)


def _gemmakit_decode_tps(model, new_tokens: int | None = None) -> float:
    """Greedy decode through the path users get (`Gemma.generate`'s scheduler), timed from token to token."""
    from gemmakit.decoding import Request, Scheduler

    scheduler = Scheduler(model, slots=1, prefix_cache_bytes=0)
    handle = scheduler.submit(Request(TOKENS["decode_prompt"], max_new_tokens=new_tokens or TOKENS["new_tokens"]))
    times = []
    while not handle.done:
        scheduler.step()
        if len(handle.tokens) > len(times):
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def _llama_decode_tps(llm, new_tokens: int | None = None) -> float:
    times = []
    for _ in llm.generate(TOKENS["decode_prompt"], top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == (new_tokens or TOKENS["new_tokens"]):
            break
    return (len(times) - 1) / (times[-1] - times[0])


def _transformers_decode_tps(model, new_tokens: int | None = None) -> float:
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([TOKENS["decode_prompt"]]), use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        steps = (new_tokens or TOKENS["new_tokens"]) - 1
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return steps / (time.perf_counter() - start)


def load_only(name: str) -> dict:
    """One load in this fresh process: its time (the library's import timed apart: torch's import is several
    seconds on a busy machine and says nothing about the file) and the process's peak RSS (imports included)."""
    start = time.perf_counter()
    if name == "gemmakit":
        import gemmakit

        import_s = time.perf_counter() - start
        start = time.perf_counter()
        model = gemmakit.load(TOKENS["path"])
    else:
        from llama_cpp import Llama

        import_s = time.perf_counter() - start
        start = time.perf_counter()
        threads = TOKENS["threads"]
        model = Llama(TOKENS["path"], n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    del model
    return {"load_s": load_s, "import_s": import_s, "peak_rss_mb": vm_kb("VmHWM") / 1024}


def decode_only(name: str) -> dict:
    """Load once, decode once to warm up, then time one decode: the interleaved rounds' unit of work."""
    if name == "gemmakit":
        import gemmakit

        model = gemmakit.load(TOKENS["path"])
        _gemmakit_decode_tps(model, WARMUP_TOKENS)
        return {"decode_tps": _gemmakit_decode_tps(model)}
    from llama_cpp import Llama

    threads = TOKENS["threads"]
    llm = Llama(TOKENS["path"], n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    _llama_decode_tps(llm, WARMUP_TOKENS)
    return {"decode_tps": _llama_decode_tps(llm)}


def run_gemmakit() -> dict:
    return _gemmakit()


def run_gemmakit_eager() -> dict:
    os.environ["GEMMAKIT_NATIVE"] = "0"
    return _gemmakit()


def run_gemmakit_compiled() -> dict:
    # int8 layers: the default GGUF-block layers run native kernels torch.compile cannot trace (choice.py)
    return _gemmakit(compile=True, quant="int8-rescore")


def run_gemmakit_fp32() -> dict:
    return _gemmakit(dtype="float32", quant=None)


def run_llama() -> dict:
    import numpy as np
    from llama_cpp import Llama

    path, threads = TOKENS["path"], TOKENS["threads"]
    kw = dict(n_threads=threads, n_threads_batch=threads, verbose=False)
    start = time.perf_counter()
    llm = Llama(path, n_ctx=2048, **kw)
    first = time.perf_counter() - start
    del llm
    start = time.perf_counter()
    llm = Llama(path, n_ctx=2048, **kw)
    load_s = time.perf_counter() - start
    _llama_decode_tps(llm, WARMUP_TOKENS)
    reset_peak_rss()
    decode_tps = _llama_decode_tps(llm)
    rss = vm_kb("VmHWM") / 1024
    best = float("inf")
    for _ in range(2):
        llm.reset()
        start = time.perf_counter()
        llm.eval(TOKENS["prefill_prompt"])
        best = min(best, time.perf_counter() - start)
    del llm
    ppl = None
    if TOKENS["windows"]:
        ppl_llm = Llama(path, n_ctx=len(TOKENS["windows"][0]), n_batch=512, logits_all=True, **kw)

        def window_logits(w):
            ppl_llm.reset()
            ppl_llm.eval(w)
            return np.array(ppl_llm.scores[:len(w)])

        ppl = perplexity(window_logits)
    weights = Path(path).stat().st_size  # every tensor is read per token (the Q8_0 embedding is also the head)
    return {"load_s": load_s, "first_load_s": first, "decode_tps": decode_tps,
            "prefill_tps": len(TOKENS["prefill_prompt"]) / best, "ppl": ppl, "rss_mb": rss,
            "bytes_per_token": weights}


def run_transformers() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(TOKENS["path"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    _transformers_decode_tps(model, WARMUP_TOKENS)
    reset_peak_rss()
    decode_tps = _transformers_decode_tps(model)
    rss = vm_kb("VmHWM") / 1024
    with torch.inference_mode():
        ids = torch.tensor([TOKENS["prefill_prompt"]])
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
        ppl = perplexity(lambda w: model(torch.tensor([w])).logits[0])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load_s": load_s, "first_load_s": load_s, "decode_tps": decode_tps, "prefill_tps": ids.shape[1] / best,
            "ppl": ppl, "rss_mb": rss, "bytes_per_token": weights}


if __name__ == "__main__":
    sys.exit(main())
