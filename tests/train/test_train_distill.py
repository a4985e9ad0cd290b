"""Distillation: the chunked losses equal naive full-vocabulary computations (values and gradients), JSD(β)
reaches forward/reverse KL at its ends, and offline KD / on-policy GKD runs lower their losses on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

import gemmakit
from gemmakit.train.data import encode_rows, read_jsonl
from gemmakit.train.distill import (
    DistillConfig,
    GKDLoss,
    attach_teacher_topk,
    chunked_pair_loss,
    generalized_jsd,
    save_teacher_topk,
    teacher_topk,
    topk_tail_ce,
    train_distill,
)
from gemmakit.train.distributed import World
from support.train_helpers import one_thread, save_tiny_model, write_jsonl

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
V = 50


def logits(seed, n=7):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def naive_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def test_topk_tail_ce_equals_naive():
    s, t = logits(0), logits(1)
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    full_ids = torch.arange(V).expand(7, V)
    full = topk_tail_ce(s, full_ids, t.log_softmax(-1))  # k = V: the Gemma 2 report's soft CE
    torch.testing.assert_close(full, -(p_t * p_s.log()).sum(-1), atol=1e-4, rtol=1e-4)
    ids, logp = t.log_softmax(-1).topk(5, dim=-1)[1], t.log_softmax(-1).topk(5, dim=-1)[0]
    got = topk_tail_ce(s, ids, logp)
    for row in range(7):
        top = ids[row].tolist()
        pt = [p_t[row, j].item() for j in top]
        ps = [p_s[row, j].item() for j in top]
        expected = -sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))
        expected -= (1 - sum(pt)) * math.log(1 - sum(ps))
        assert got[row].item() == pytest.approx(expected, rel=1e-4)


def test_generalized_jsd_equals_naive_and_limits():
    s, t = logits(2), logits(3)
    ps, pt = s.softmax(-1).double(), t.softmax(-1).double()
    for beta in (0.1, 0.5, 0.9):
        got = generalized_jsd(s, t, beta)
        for row in range(7):
            m = beta * pt[row] + (1 - beta) * ps[row]
            expected = beta * naive_kl(pt[row].tolist(), m.tolist()) + (1 - beta) * naive_kl(ps[row].tolist(),
                                                                                             m.tolist())
            assert got[row].item() == pytest.approx(expected, rel=1e-3, abs=1e-6)
    forward = torch.tensor([naive_kl(pt[r].tolist(), ps[r].tolist()) for r in range(7)])
    reverse = torch.tensor([naive_kl(ps[r].tolist(), pt[r].tolist()) for r in range(7)])
    torch.testing.assert_close(generalized_jsd(s, t, 0.0).double(), forward.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0).double(), reverse.double(), atol=1e-4, rtol=1e-4)
    eps = 1e-4  # the ends are the limits of JSD/β and JSD/(1−β)
    torch.testing.assert_close((generalized_jsd(s, t, eps) / eps).double(), forward.double(), atol=0, rtol=2e-2)
    torch.testing.assert_close((generalized_jsd(s, t, 1 - eps) / eps).double(), reverse.double(), atol=0, rtol=2e-2)


class Head(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(V, 8, generator=torch.Generator().manual_seed(seed)))

    def unembed(self, h):
        return h @ self.w.T


def test_chunked_pair_loss_equals_unchunked_values_and_gradients():
    student, teacher = Head(0), Head(1)
    h = torch.randn(23, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    th = torch.randn(23, 8, generator=torch.Generator().manual_seed(5))

    def fn(s, t):
        return generalized_jsd(s, t, 0.3)

    chunked = chunked_pair_loss(student, h, fn, teacher=teacher, t_hidden=th, chunk_tokens=5)
    chunked.backward()
    g_chunked, h_chunked = student.w.grad.clone(), h.grad.clone()
    student.w.grad, h.grad = None, None
    full = fn(student.unembed(h), teacher.unembed(th)).sum()
    full.backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(g_chunked, student.w.grad)
    torch.testing.assert_close(h_chunked, h.grad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return save_tiny_model("gemma3", root / "student", seed=0), save_tiny_model("gemma3", root / "teacher", seed=1)


def test_offline_topk_file_round_trip(tiny, tmp_path):
    teacher = gemmakit.load(tiny[1], dtype="float32")
    rows = read_jsonl(write_jsonl(tmp_path / "d.jsonl", "prompt", repeat=1))
    examples = encode_rows(rows, teacher.tokenizer, 64)
    path = save_teacher_topk(teacher.module, examples, tmp_path / "topk.safetensors", k=8, batch_size=4,
                             progress=False)
    attached = attach_teacher_topk(examples, path)
    ex = attached[2]
    with torch.no_grad():
        hidden = teacher.module.hidden_states(torch.tensor([ex.ids]))[0, :-1]
        sel = torch.tensor(ex.mask[1:], dtype=torch.bool)
        ids, logp = teacher_topk(teacher.module, hidden[sel], 8)
    assert torch.equal(ex.extra["topk_ids"], ids)
    torch.testing.assert_close(ex.extra["topk_logprobs"], logp)


@pytest.mark.parametrize("mode", ["offline", "gkd"])
def test_distillation_lowers_loss(tiny, tmp_path, mode):
    student, teacher = gemmakit.load(tiny[0], dtype="float32"), gemmakit.load(tiny[1], dtype="float32")
    rows = read_jsonl(write_jsonl(tmp_path / "d.jsonl", "prompt"))
    cfg = DistillConfig(out=str(tmp_path / mode), mode=mode, lr=1e-2, batch_size=4, max_steps=12, top_k=16,
                        beta=0.5, lmbda=0.5, max_new_tokens=6, progress=False, schedule="constant")
    history = train_distill(student.module, student.tokenizer, rows, cfg, teacher=teacher.module, eval_rows=rows)
    losses = [r["loss"] for r in history]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if mode == "offline":  # soft CE's floor is the teacher's entropy, not 0: ask for a clear absolute drop
        assert last < first - 0.2, losses
    else:  # JSD's floor is 0
        assert last < 0.6 * first, losses
    assert (tmp_path / mode / "model" / "model.safetensors").exists()


def test_gkd_on_policy_completions_come_from_the_student(tiny):
    student, teacher = gemmakit.load(tiny[0], dtype="float32"), gemmakit.load(tiny[1], dtype="float32")
    rows = [{"prompt": "Two plus two?", "completion": "Four."}]
    examples = encode_rows(rows, student.tokenizer, 64)
    task = GKDLoss(student.module, teacher.module, student.tokenizer, lmbda=1.0, max_new_tokens=5,
                   gen_temperature=0)
    generated = task.on_policy(examples)[0]
    prompt_len = examples[0].mask.index(1)
    assert generated.ids[:prompt_len] == examples[0].ids[:prompt_len]
    greedy = student.generate_ids([examples[0].ids[:prompt_len]], 5, stop=False)[0]
    completion = generated.ids[prompt_len:]
    assert completion == greedy[: len(completion)] and sum(generated.mask) == len(completion) > 0


def test_gkd_draws_depend_on_step_and_global_index_not_on_rank(tiny):
    """Under torchrun every rank must take the same λ decision (FSDP needs the same collectives everywhere), and
    rank r's rows (r, r + N, … of the global micro-batch) must get the completions one process samples for them."""
    student, teacher = gemmakit.load(tiny[0], dtype="float32"), gemmakit.load(tiny[1], dtype="float32")
    rows = [{"prompt": q, "completion": a} for q, a in [("Two plus two?", "Four."), ("Say hello.", "Hello."),
                                                         ("Who is lazy?", "The dog."), ("Is it?", "Yes.")]]
    examples = encode_rows(rows, student.tokenizer, 64)
    task = GKDLoss(student.module, teacher.module, student.tokenizer, lmbda=0.5, max_new_tokens=4,
                   gen_temperature=1.0, seed=3)

    def through_last_target(ids, mask):  # drops the padding (and the data's text after its last target)
        return list(ids[: max(i for i, m in enumerate(mask) if m) + 1])

    def sequences(step, world):
        task.begin_step(step, world)
        ids, mask = task.collate(examples[world.rank::world.size])
        return [through_last_target(i.tolist(), m.tolist()) for i, m in zip(ids, mask, strict=True)]

    kinds = set()
    for step in range(6):
        one = sequences(step, World(0, 1))
        assert sequences(step, World(0, 2)) == one[0::2] and sequences(step, World(1, 2)) == one[1::2]
        assert sequences(step, World(0, 1)) == one  # a function of the step alone: what a resumed run draws
        kinds.add(one == [through_last_target(ex.ids, ex.mask) for ex in examples])
    assert kinds == {True, False}  # some steps kept the data's completions, some sampled the student's
