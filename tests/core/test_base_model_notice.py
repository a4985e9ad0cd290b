"""`gemmakit.chat.base_model_notice`: a pretrained checkpoint is named as such from what its files say (rule in
the function's docstring), and `gemmakit chat` prints it once before the first turn while `generate` stays silent.

The embedded real Gemma 3 270M (a pretrained release: its GGUF has no chat template and no "it" in its names)
gets the notice; a tiny model whose tokenizer_config.json carries a chat template does not."""

from __future__ import annotations

import io
import json

import pytest

import gemmakit
from gemmakit.api import Gemma
from gemmakit.chat import base_model_notice
from gemmakit.cli import main
from support.tiny_gguf import write_gguf_without_data
from support.tiny_models import save_hf_model, save_tiny_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
            "{% endfor %}")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The same tiny Gemma 3 twice: once with a chat template (chat-tuned), once without (as a base release)."""
    root = tmp_path_factory.mktemp("notice")
    chat, base = root / "tiny-chat", root / "tiny-model"
    for directory in (chat, base):
        save_hf_model("gemma3", directory)
        save_tiny_tokenizer(directory)
    (chat / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": TEMPLATE}))
    (base / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return chat, base


def test_the_embedded_pretrained_270m_gets_the_notice(real_gguf_path):
    model = gemmakit.load(real_gguf_path)
    notice = base_model_notice(model)
    assert notice is not None
    assert "pretrained" in notice and "no chat template" in notice and "-it" in notice
    assert real_gguf_path.name in notice


def test_a_chat_tuned_tiny_model_with_a_template_gets_none_and_the_same_model_without_one_does(tiny_dirs):
    chat, base = tiny_dirs
    assert base_model_notice(gemmakit.load(chat)) is None
    notice = base_model_notice(gemmakit.load(base))
    assert notice is not None and "tokenizer files have no chat template" in notice


def test_names_in_gguf_metadata_decide_before_the_template(tiny_dirs, tmp_path):
    """general.name with "it" means chat-tuned, with "pt" means pretrained (read from the header alone)."""
    module = gemmakit.load(tiny_dirs[0])
    verdicts = {}
    for name in ("gemma-3-1b-it", "gemma-3-1b-pt", "gemma-3-1b"):
        path = tmp_path / f"model{len(verdicts)}.gguf"
        write_gguf_without_data(path, hidden=16, layers=1, ffn=32, heads=2, kv_heads=1, head_dim=8, n_tokens=300,
                                name=name)
        verdicts[name] = base_model_notice(Gemma(module.module, module.tokenizer, path))
    assert verdicts["gemma-3-1b-it"] is None
    assert "general.name ('gemma-3-1b-pt') says pretrained" in verdicts["gemma-3-1b-pt"]
    assert "GGUF metadata has no chat template" in verdicts["gemma-3-1b"]
    assert base_model_notice(Gemma(module.module, module.tokenizer, None)) is None  # nothing to read: silent


def test_chat_prints_the_notice_once_and_generate_stays_silent(tiny_dirs, monkeypatch, capsys):
    chat, base = tiny_dirs
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nthe sea\n\n"))
    assert main(["chat", str(base), "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("looks like a pretrained (base) checkpoint") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
    assert main(["chat", str(chat), "-n", "2"]) == 0
    assert "pretrained" not in capsys.readouterr().err
    assert main(["generate", str(base), "hello", "-n", "2"]) == 0
    assert "pretrained" not in capsys.readouterr().err
