"""Shared by the training tests: a tiny model directory that `gemmakit.load` reads (weights + a 512-piece
SentencePiece tokenizer trained on the spot with Gemma's special ids), and small SFT data sets."""

from __future__ import annotations

import json
from pathlib import Path

from support.tiny_models import VOCAB, save_hf_model

TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
        "Two plus two is four. Answer the question briefly. Hello, how are you today? I am fine, thank you. ")


def save_tokenizer(directory: Path) -> None:
    """tokenizer.model: SentencePiece BPE with byte fallback, pad/eos/bos/unk = 0/1/2/3 and the turn markers."""
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join([TEXT] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=["<start_of_turn>",
                                                                                      "<end_of_turn>"],
        add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_by_whitespace=True,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_hf_model(family, directory, seed)
    save_tokenizer(directory)
    return directory


QA = [("What is the capital of France?", "Paris."), ("Two plus two?", "Four."),
      ("Say hello.", "Hello, how are you?"), ("Is the fox quick?", "Yes, the fox is quick."),
      ("Who is lazy?", "The dog."), ("Answer briefly: color of the fox?", "Brown.")]


def write_jsonl(path: Path, kind: str = "messages", repeat: int = 2) -> Path:
    rows = []
    for _ in range(repeat):
        for q, a in QA:
            if kind == "messages":
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            else:
                rows.append({"prompt": q, "completion": a})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_thread():
    """Tiny models on a shared, oversubscribed CPU run ~20x faster on one thread (no spinning OpenMP workers);
    use as `pytest.fixture(autouse=True, scope="module")(one_thread)` in a test module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer():
    """A 512-piece SentencePiece-style vocabulary: specials, 256 byte pieces, a few words, filler (for GGUF files,
    which must carry a tokenizer)."""
    from gemmakit.tokenizer import Tokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["▁", "a", "b", "▁a", "▁b", "ab", "▁ab"]
    pieces += words + [f"▁w{i}" for i in range(VOCAB - len(pieces) - len(words))]
    types += [1] * (VOCAB - len(types))
    scores = [0.0] * 262 + [-float(i) for i in range(VOCAB - 262)]
    return Tokenizer(pieces, types, scores=scores, source="tiny")
