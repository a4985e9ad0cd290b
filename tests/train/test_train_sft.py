"""SFT: answer-token masking follows the chat template, training drives the answer loss down, and a run killed
mid-way then resumed reproduces the uninterrupted run's losses exactly."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.train.data import encode_row, read_jsonl
from gemmakit.train.lora import LoraConfig, load_adapter
from gemmakit.train.sft import SFTConfig, chunked_nll, train_sft
from support.train_helpers import QA, one_thread, save_tiny_model, write_jsonl

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("gemma3", tmp_path_factory.mktemp("tiny") / "m")


def test_mask_covers_answer_and_end_of_turn_only(tiny_dir):
    tok = gemmakit.load(tiny_dir, dtype="float32").tokenizer
    ex = encode_row({"prompt": "Two plus two?", "completion": "Four."}, tok)
    answer = tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=False) if m])
    assert answer == "Four.<end_of_turn>"
    chat = encode_row({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."},
                                    {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Ok."}]},
                      tok)
    assert tok.decode([i for i, m in zip(chat.ids, chat.mask, strict=False) if m]) == "Yo.<end_of_turn>Ok.<end_of_turn>"


def test_chunked_nll_equals_full_cross_entropy(tiny_dir):
    model = gemmakit.load(tiny_dir, dtype="float32").module
    h = torch.randn(37, model.config.hidden_size)
    t = torch.randint(0, model.config.vocab_size, (37,))
    full = torch.nn.functional.cross_entropy(model.unembed(h), t, reduction="sum")
    torch.testing.assert_close(chunked_nll(model, h, t, chunk_tokens=8), full)


def test_sft_drives_answer_loss_down(tiny_dir, tmp_path):
    g = gemmakit.load(tiny_dir, dtype="float32")
    rows = read_jsonl(write_jsonl(tmp_path / "train.jsonl", "prompt"))
    cfg = SFTConfig(out=str(tmp_path / "run"), lr=3e-2, batch_size=4, grad_accum=1, max_steps=20, progress=False,
                    lora=LoraConfig(r=8, alpha=16))
    history = train_sft(g.module, g.tokenizer, rows, cfg, eval_rows=rows)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert history[-1]["eval_loss"] < 0.5 * first
    fresh = gemmakit.load(tiny_dir, dtype="float32")  # the saved PEFT adapter reproduces the trained model
    load_adapter(fresh.module, tmp_path / "run" / "adapter")
    ids = torch.tensor([g.tokenizer.encode(QA[0][0])])
    with torch.no_grad():
        torch.testing.assert_close(fresh.module(ids), g.module.eval()(ids))


class Killed(Exception):
    pass


def test_resume_after_kill_reproduces_losses(tiny_dir, tmp_path):
    rows = read_jsonl(write_jsonl(tmp_path / "train.jsonl", "messages"))

    def cfg(out, resume=False):
        return SFTConfig(out=str(out), lr=1e-2, batch_size=3, grad_accum=2, max_steps=6, warmup_steps=2,
                         save_every=1, progress=False, resume=resume, lora=LoraConfig(r=4, dropout=0.2), seed=3)

    g = gemmakit.load(tiny_dir, dtype="float32")
    full = [r["loss"] for r in train_sft(g.module, g.tokenizer, rows, cfg(tmp_path / "a"))]

    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed

    g = gemmakit.load(tiny_dir, dtype="float32")
    with pytest.raises(Killed):
        train_sft(g.module, g.tokenizer, rows, cfg(tmp_path / "b"), on_step=kill_at_3)
    g = gemmakit.load(tiny_dir, dtype="float32")  # a new process: fresh base model, state only from the checkpoint
    resumed = [r["loss"] for r in train_sft(g.module, g.tokenizer, rows, cfg(tmp_path / "b", resume=True))]
    assert len(set(full)) == 6  # losses change step to step, so equality below is informative
    assert resumed == pytest.approx(full, rel=1e-6, abs=1e-7)
