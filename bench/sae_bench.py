"""SAE bench (not CI): an SAE on the real Gemma 3 270M, layer 9 resid_post, from tinyshakespeare.

Builds (or resumes) an activation store, trains JumpReLU SAEs at several L0 targets in one pass, reports L0,
FVU and delta LM loss on held-out text, writes a dashboard, prints a few features, and measures training
throughput (tokens/s) against SAELens's JumpReLU training SAE on the same activations, width and batch size.

    .venv/bin/python bench/sae_bench.py                      # our part only
    SAELENS_PYTHON=/path/to/python-with-sae-lens .venv/bin/python bench/sae_bench.py --compare

SAELens is never a runtime dependency: its step is timed in a subprocess of an interpreter that has it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SITE = "layers.9.resid_post"

SAELENS_STEP = r"""
import json, sys, time, torch
from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
torch.set_num_threads(int(sys.argv[4]))
x = torch.load(sys.argv[1], weights_only=True)
width, steps = int(sys.argv[2]), int(sys.argv[3])
cfg = JumpReLUTrainingSAEConfig(d_in=x.shape[1], d_sae=width, l0_coefficient=1.0,
                                jumprelu_sparsity_loss_mode="quadratic", target_l0=60.0)
sae = JumpReLUTrainingSAE(cfg)
opt = torch.optim.Adam(sae.parameters(), lr=5e-4, betas=(0.0, 0.999))
b = x.shape[0] // (steps + 1)
def step(i):
    batch = x[i * b:(i + 1) * b]
    out = sae.training_forward_pass(TrainStepInput(sae_in=batch, coefficients={"l0": 1.0}, dead_neuron_mask=None,
                                                   n_training_steps=i, is_logging_step=False))
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
step(0)
start = time.perf_counter()
for i in range(1, steps + 1):
    step(i)
elapsed = time.perf_counter() - start
print(json.dumps({"tokens_per_s": steps * b / elapsed, "steps": steps, "batch": b, "seconds": elapsed}))
"""


def our_throughput(store, width: int, batch: int, steps: int) -> dict:
    from gemmakit.scope.train import TrainConfig, Trainer

    config = TrainConfig(width=width, targets=(60,), batch_size=batch, steps=steps + 1, log_every=10 ** 9,
                         checkpoint_every=0)
    trainer = Trainer(store, config, log=lambda m: None)
    trainer.train_step()  # warm-up, as for SAELens
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": steps * batch / elapsed, "steps": steps, "batch": batch, "seconds": elapsed}


def saelens_throughput(python: str, store, width: int, batch: int, steps: int, out: Path) -> dict:
    rows = store.rows(torch.randperm(len(store), generator=torch.Generator().manual_seed(1))[: batch * (steps + 1)]
                      .sort().values)
    rows = rows / float(rows.pow(2).sum(1).mean().sqrt())  # the same unit-mean-squared-norm inputs ours sees
    path = out / "saelens_batch.pt"
    torch.save(rows.contiguous(), path)
    proc = subprocess.run([python, "-c", SAELENS_STEP, str(path), str(width), str(steps),
                           str(torch.get_num_threads())], capture_output=True, text=True)
    path.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"SAELens run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sae"))
    p.add_argument("--max-tokens", type=int, default=60_000)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--l0", type=float, nargs="+", default=[20.0, 60.0])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--compare", action="store_true", help="time SAELens too (needs SAELENS_PYTHON)")
    p.add_argument("--compare-steps", type=int, default=5)
    p.add_argument("--compare-shapes", default="4096x1024,16384x4096", help="width x batch pairs to time")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()

    import gemmakit
    from gemmakit import scope
    from gemmakit.scope.dashboard import dashboard_data, write_dashboard
    from gemmakit.scope.store import chunk_tokens
    from gemmakit.scope.train import TrainConfig, train_saes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"site": SITE, "args": vars(args), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    model = gemmakit.load(args.model, dtype=args.dtype)
    text = Path(args.text).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # train on the first 90%, evaluate on the rest
    t = time.perf_counter()
    store = scope.build_store(model, text[:cut], out / "store", [SITE], context=args.context,
                              max_tokens=args.max_tokens)
    results["store"] = {"rows": len(store), "seconds_this_run": time.perf_counter() - t}
    print(f"store: {len(store)} rows", flush=True)

    if args.compare:
        python = os.environ.get("SAELENS_PYTHON")
        if not python:
            raise SystemExit("--compare needs SAELENS_PYTHON=<python with sae-lens installed>")
        results["throughput"] = []
        for shape in args.compare_shapes.split(","):
            width, batch = (int(v) for v in shape.split("x"))
            ours = our_throughput(store, width, batch, args.compare_steps)
            theirs = saelens_throughput(python, store, width, batch, args.compare_steps, out)
            row = {"width": width, "batch": batch, "ours_tok_s": ours["tokens_per_s"],
                   "saelens_tok_s": theirs["tokens_per_s"], "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"]}
            results["throughput"].append(row)
            print(f"throughput width {width} batch {batch}: ours {row['ours_tok_s']:,.0f} tok/s, SAELens "
                  f"{row['saelens_tok_s']:,.0f} tok/s, x{row['speedup']:.2f}", flush=True)

    if not args.skip_train:
        config = TrainConfig(width=args.width, targets=tuple(args.l0), batch_size=args.batch_size, steps=args.steps,
                             lr=args.lr, log_every=100, checkpoint_every=500, sparsity_warmup_steps=200)
        t = time.perf_counter()
        saes = train_saes(store, config, out / "train", scope.SAEInfo(site=SITE, model_name="gemma-3-270m"))
        results["train"] = {"seconds": time.perf_counter() - t, "steps": args.steps,
                            "tokens": args.steps * args.batch_size}
        held = chunk_tokens(model.tokenizer.encode(text[cut:], add_bos=False), args.context,
                            model.tokenizer.bos_id)[: args.eval_windows]
        results["eval"] = []
        for sae, target in zip(saes, args.l0, strict=True):
            m = scope.evaluate(model, sae, SITE, held, batch_size=4)
            row = {"target_l0": target, **m.summary()}
            results["eval"].append(row)
            print(f"eval target L0 {target:g}: L0 {m.l0:.1f}  FVU {m.fvu:.3f}  CE clean {m.ce_clean:.3f} -> "
                  f"spliced {m.ce_spliced:.3f} (delta {m.delta_ce:+.3f})  dead {m.dead_fraction:.1%}  "
                  f"dense {m.dense_fraction:.1%}", flush=True)
        sae = saes[-1]
        data = dashboard_data(model, sae, SITE, held, n_features=30,
                              texts=["ROMEO: But soft, what light through yonder window breaks?"])
        page = write_dashboard(out / "dashboard.html", data)
        results["dashboard"] = str(page)
        print(f"dashboard: {page}")
        for f in data["features"][:8]:
            top = "".join(f["top"][0]["tokens"]) if f["top"] else ""
            print(f"feature {f['id']}: density {f['density']:.4f}; top context {top!r}; "
                  f"promotes {[t for t, _ in f['pos'][:5]]}")
        results["features"] = [{"id": f["id"], "density": f["density"],
                                "top": "".join(f["top"][0]["tokens"]) if f["top"] else "",
                                "promotes": [t for t, _ in f["pos"][:5]]} for f in data["features"][:8]]
    results["total_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
