"""The same GGUF in bf16 on CUDA against the fp32 CPU reference, and decode tok/s vs transformers on that GPU.

    python bench/cuda_check.py MODEL.gguf [--out DIR]
    python bench/cuda_check.py random-270m      # Gemma 3 270M shapes, seeded random weights (no file needed)

The random-weights form exists for GPU machines the 250 MB GGUF cannot be copied to: decode speed depends on
shapes, not values, and the CPU-vs-CUDA comparison still checks the same function on both devices.

Prints and writes JSON: top-1 agreement and logit error of CUDA bf16 vs CPU fp32 on a fixed text; greedy
decode tok/s (batch 1, 128 new tokens after a ~50-token prompt) for gemmakit and, when it is installed,
transformers loading the same GGUF in bf16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
        "resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
        "Marcius is chief enemy to the people. All: We know't, we know't. First Citizen: Let us kill him, and "
        "we'll have corn at our own price. Is't a verdict?")


def decode_tps(step, first_token: torch.Tensor, n: int) -> float:
    token = first_token
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        token = step(token)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def random_270m():
    """Two `Gemma` wrappers (CPU fp32, CUDA bf16) around the same seeded random weights of Gemma 3 270M's shape."""
    from gemmakit.api import Gemma
    from gemmakit.config import PRESETS
    from gemmakit.loader import build_model

    config = PRESETS["gemma3-270m"]
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        from gemmakit.model import Transformer

        shapes = {k: v.shape for k, v in Transformer(config).named_parameters()}
    state = {k: torch.randn(s, generator=gen) * (0.1 if k.endswith("norm.weight") else 0.03)
             for k, s in shapes.items()}
    cpu = Gemma(build_model(config, state, torch.float32, "random"), None)
    gpu = Gemma(build_model(config, state, torch.bfloat16, "random", "cuda"), None)
    ids = torch.randint(3, config.vocab_size, (120,), generator=gen).tolist()
    return cpu, gpu, ids, state


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    import gemmakit
    from gemmakit.cache import KVCache

    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model}
    if args.model == "random-270m":
        cpu, gpu, ids, hf_state = random_270m()
    else:
        cpu = gemmakit.load(args.model, dtype="float32")
        ids = cpu.encode(TEXT)
        start = time.perf_counter()
        gpu = gemmakit.load(args.model, dtype="bfloat16", device="cuda")
        result["cuda_load_s"] = time.perf_counter() - start
        hf_state = None
    with torch.inference_mode():
        ref = cpu.module(torch.tensor([ids]))[0]
        got = gpu.module(torch.tensor([ids], device="cuda"))[0].float().cpu()
    result["tokens"] = len(ids)
    result["top1_agreement"] = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    result["max_abs_logit_err"] = (got - ref).abs().max().item()
    result["mean_abs_logit_err_over_std"] = ((got - ref).abs().mean() / ref.std()).item()

    prompt = torch.tensor([ids[:50]], device="cuda")
    n = args.new_tokens - 1
    mod = gpu.module
    with torch.inference_mode():
        for _ in range(2):  # the first round warms up kernels
            cache = KVCache(mod.config, 1, 50 + args.new_tokens, mod.dtype, "cuda")
            first = mod(prompt, cache=cache, last_only=True)[:, -1].argmax(-1).view(1, 1)
            result["gemmakit_decode_tps"] = decode_tps(
                lambda t, c=cache: mod(t, cache=c, last_only=True)[:, -1].argmax(-1).view(1, 1), first, n)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        result["transformers"] = "not installed on this machine"
    else:
        if hf_state is not None:
            from transformers import Gemma3ForCausalLM, Gemma3TextConfig

            hf = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                                    num_hidden_layers=18, num_attention_heads=4,
                                                    num_key_value_heads=1, head_dim=256, sliding_window=512))
            hf.load_state_dict(hf_state, strict=False)
            hf = hf.to(device="cuda", dtype=torch.bfloat16).eval()
        else:
            path = Path(args.model)
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.bfloat16).cuda().eval()
        with torch.inference_mode():
            for _ in range(2):
                out = hf(prompt, use_cache=True)
                state = {"past": out.past_key_values}

                def step(t, state=state):
                    o = hf(t, past_key_values=state["past"], use_cache=True)
                    state["past"] = o.past_key_values
                    return o.logits[:, -1].argmax(-1, keepdim=True)

                result["transformers_decode_tps"] = decode_tps(step, out.logits[:, -1].argmax(-1, keepdim=True), n)
        result["gemmakit_over_transformers"] = result["gemmakit_decode_tps"] / result["transformers_decode_tps"]
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cuda-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
