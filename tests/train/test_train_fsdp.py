"""Scale-out: the same `gemmakit train sft` under `torchrun --nproc_per_node 2` (FSDP2 over gloo), stopped and
resumed from its sharded checkpoint, gives the same losses, gradient norms and final weights as one process on the
same global batches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemmakit.cli import main
from gemmakit.weights import hf
from support.train_helpers import one_thread, save_tiny_model, write_jsonl

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def torchrun(args: list[str]) -> None:
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([launcher, "--standalone", "--nproc_per_node", "2", "-m", "gemmakit.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers: nothing left behind
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_fsdp_equals_one_process(tmp_path):
    model = save_tiny_model("gemma3", tmp_path / "tiny")
    data = write_jsonl(tmp_path / "d.jsonl", "messages")
    args = ["train", "sft", str(model), str(data), "--full", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3",
            "--schedule", "constant", "--save-every", "1", "--no-progress"]
    assert main([*args, "--max-steps", "3", "--out", str(tmp_path / "one")]) == 0
    # two processes: 2 steps, then a second launch resumes from the sharded (DCP) checkpoint for step 3
    torchrun([*args, "--max-steps", "2", "--out", str(tmp_path / "two")])
    torchrun([*args, "--max-steps", "3", "--out", str(tmp_path / "two"), "--resume"])
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert len({r["loss"] for r in one}) == 3  # training moved, so agreement is not trivial
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint").glob("*.distcp")) == ["__0_0.distcp",
                                                                                         "__1_0.distcp"]
    a, b = hf.read_state_dict(tmp_path / "one" / "model"), hf.read_state_dict(tmp_path / "two" / "model")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_on_policy_gkd_equals_one_process(tmp_path):
    """lmbda=1: the (sharded) student samples every micro-batch's completions, at temperature 1, so rows stop at
    different lengths on different ranks. Draws keyed by the seed, the step and each example's global index make
    two ranks, stopped after step 2 and resumed from the DCP checkpoint, sample what one process does; the training
    forward and backward after each generation show that FSDP's state survived it."""
    student, teacher = save_tiny_model("gemma3", tmp_path / "s", seed=0), save_tiny_model("gemma3", tmp_path / "t", 1)
    data = write_jsonl(tmp_path / "d.jsonl", "prompt")
    args = ["train", "distill", str(student), str(data), "--teacher", str(teacher), "--mode", "gkd", "--lmbda", "1",
            "--gen-temperature", "4", "--max-new-tokens", "32", "--batch-size", "4", "--grad-accum", "2", "--lr",
            "1e-2", "--schedule", "constant", "--save-every", "1", "--no-progress"]
    assert main([*args, "--max-steps", "3", "--out", str(tmp_path / "one")]) == 0
    torchrun([*args, "--max-steps", "2", "--out", str(tmp_path / "two")])
    torchrun([*args, "--max-steps", "3", "--out", str(tmp_path / "two"), "--resume"])
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    # the target count is the summed length of the sampled completions (some end early at a stop token)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert any(r["tokens"] < 8 * 32 for r in one)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert len({r["loss"] for r in one}) == 3
