"""Bench (not CI): GGUF files written by `gemmakit.export.save_gguf` run in llama.cpp (llama-cpp-python) with the
same next-token predictions as gemmakit, for tiny random Gemma 1/2/3 models and F32/F16/BF16/Q8_0.

    python bench/export_llamacpp.py [--real]     # --real also exports the embedded Gemma 3 270M (F16, Q8_0)

Prints, per file, the top-1 agreement over all positions and the largest logit difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gemmakit.export import save_gguf  # noqa: E402
from gemmakit.loader import build_model  # noqa: E402
from gemmakit.weights import hf  # noqa: E402
from support.tiny_models import VOCAB, save_hf_model  # noqa: E402
from support.train_helpers import tiny_tokenizer  # noqa: E402


def compare(model: torch.nn.Module, path: Path, ids: list[int]) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, n_threads=4,
                verbose=bool(os.environ.get("LLAMA_VERBOSE")))
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return agree, (theirs - ours).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--real", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    ids = [2] + torch.randint(3, VOCAB, (39,), generator=torch.Generator().manual_seed(0)).tolist()
    for family in ("gemma", "gemma2", "gemma3"):
        save_hf_model(family, root / family)
        config = hf.read_config(root / family)
        config = config.replace(query_pre_attn_scalar=float(config.head_dim))  # what llama.cpp assumes
        model = build_model(config, hf.read_state_dict(root / family), torch.float32, family)
        for kind in ("F32", "F16", "BF16", "Q8_0"):
            path = save_gguf(model, root / f"{family}-{kind}.gguf", tiny_tokenizer(), kind)
            agree, diff = compare(model, path, ids)
            print(f"{family:7s} {kind:5s} top-1 agreement {agree:.3f}  max |logit diff| {diff:.4f}", flush=True)
    if args.real:
        import gemmakit

        g = gemmakit.load("default", dtype="float32")
        text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
        prose = text.read_text()[:2000] if text.exists() else "The capital of France is Paris. " * 20
        text_ids = g.encode(prose)[:256]
        for kind in ("F16", "Q8_0"):
            path = save_gguf(g.module, root / f"gemma3-270m-{kind}.gguf", g.tokenizer, kind)
            agree, diff = compare(g.module, path, text_ids)
            print(f"gemma3-270m {kind:5s} ({len(text_ids)} tokens) top-1 agreement {agree:.3f}  "
                  f"max |logit diff| {diff:.4f}", flush=True)


if __name__ == "__main__":
    main()
