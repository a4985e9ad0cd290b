"""Gemma chat templates, reproduced exactly and tokenised so that user text cannot forge a turn.

The released instruction-tuned checkpoints were trained on one prompt shape, so the rendered text
must equal what the released Jinja templates produce (models.md §3):

    <bos><start_of_turn>user
    {content}<end_of_turn>
    <start_of_turn>model
    {content}<end_of_turn>
    <start_of_turn>model            <- generation prompt

Gemma 1/2 refuse a system message; Gemma 3 folds a leading one into the first user turn as
`system + "\\n\\n" + user` (the system text untrimmed, the user text `| trim`med, as its template does).

`render_chat` does not tokenise the rendered string: it emits the template's control tokens as ids
and tokenises everything between them (role names, newlines, message contents) as plain text. For
ordinary content that gives exactly the ids of tokenising the whole rendered string (control tokens
split the text into the same runs either way), while a user who types `<start_of_turn>` gets ordinary
pieces instead of a turn marker. BOS comes from the template only, so it appears exactly once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from gemmakit.errors import InputError, TokenizerError

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
FAMILIES = ("gemma", "gemma3")


class _TokenizerLike(Protocol):
    bos_id: int

    def token_id(self, piece: str) -> int | None: ...

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]: ...


def chat_family(tokenizer: _TokenizerLike) -> str:
    """Template family: "gemma3" when `<start_of_turn>` has id 105 (Gemma 3), else "gemma" (Gemma 1/2: 106)."""
    return "gemma3" if tokenizer.token_id(START_OF_TURN) == 105 else "gemma"


def _content_text(message: Mapping[str, Any], index: int, family: str) -> str:
    """The text of a message; Gemma 3 also accepts a list of `{"type": "text", "text": ...}` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if family == "gemma3" and isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
                raise InputError(f"messages[{index}].content: parts must be dicts with type 'text'; got {part!r}")
            if part["type"] == "image":
                raise InputError(f"messages[{index}].content: image parts are not supported (text-only models)")
            text = part.get("text")
            if not isinstance(text, str):
                raise InputError(f"messages[{index}].content: a text part needs a str 'text', got {text!r}")
            texts.append(text)
        return "".join(t.strip() for t in texts)
    raise InputError(
        f"messages[{index}].content must be a str"
        + (" or a list of text parts" if family == "gemma3" else "")
        + f", got {type(content).__name__}"
    )


def _turns(messages: Sequence[Mapping[str, Any]], family: str) -> list[tuple[str, str]]:
    """Validate the conversation and return (role, body) per turn, body already trimmed/folded."""
    if family not in FAMILIES:
        raise InputError(f"family must be one of {FAMILIES}, got {family!r}")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")

    prefix = ""
    loop = list(messages)
    if messages[0]["role"] == "system":
        if family == "gemma":
            raise InputError(
                "System role not supported by the Gemma 1/2 chat template; "
                "put the instructions at the start of the first user message"
            )
        if isinstance(messages[0]["content"], str):
            prefix = messages[0]["content"] + "\n\n"
        else:  # the template takes the first part's text, untrimmed
            parts = messages[0]["content"]
            if not parts or not isinstance(parts[0], Mapping) or not isinstance(parts[0].get("text"), str):
                raise InputError("messages[0].content: a system message needs text")
            prefix = parts[0]["text"] + "\n\n"
        loop = loop[1:]
        if not loop:
            raise InputError("a system message must be followed by a user message")

    offset = len(messages) - len(loop)
    turns: list[tuple[str, str]] = []
    for k, m in enumerate(loop):
        i = k + offset
        role = m["role"]
        expected = "user" if k % 2 == 0 else "model"
        if role == "assistant":
            role = "model"
        if role != expected:
            raise InputError(
                f"messages[{i}] has role {m['role']!r}; conversation roles must alternate "
                "user/assistant/user/assistant/... starting with user"
                + (" (a system message is only allowed first)" if role == "system" else "")
            )
        body = _content_text(m, i, family).strip()
        if k == 0:
            body = prefix + body
        turns.append((role, body))
    return turns


def render_chat_text(
    messages: Sequence[Mapping[str, Any]],
    family: str,
    add_generation_prompt: bool = True,
    bos: bool = True,
) -> str:
    """The exact string the released Jinja template renders (`bos=False` drops the leading `<bos>`).

    Stricter than the Jinja only where it would silently accept nonsense: unknown roles, a second
    system message, or a system message with no user message after it raise InputError.
    """
    out = [BOS] if bos else []
    for role, body in _turns(messages, family):
        out.append(f"{START_OF_TURN}{role}\n{body}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: _TokenizerLike,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the chat prompt: template control tokens as ids, all other text as plain text.

    Equals `tokenizer.encode(render_chat_text(...), add_bos=False)` whenever no message contains a
    control token's text; when one does, it stays text (no forged `<start_of_turn>`/`<end_of_turn>`).
    """
    sot = tokenizer.token_id(START_OF_TURN)
    eot = tokenizer.token_id(END_OF_TURN)
    if sot is None or eot is None:
        raise TokenizerError(
            f"tokenizer has no {START_OF_TURN!r}/{END_OF_TURN!r} pieces; it is not a Gemma chat tokenizer"
        )
    family = chat_family(tokenizer)

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_bos=False, parse_special=False)

    ids = [tokenizer.bos_id]
    pending = ""  # text between two control tokens is tokenised as one run, as in the full string
    for role, body in _turns(messages, family):
        if pending:
            ids += text(pending)
        ids.append(sot)
        ids += text(f"{role}\n{body}")
        ids.append(eot)
        pending = "\n"
    if add_generation_prompt:
        ids += text(pending)
        ids.append(sot)
        pending = "model\n"
    ids += text(pending)
    return ids


# --- base (pretrained) checkpoints --------------------------------------------------------------------------
# Words in a model's names that say how it was trained. Gemma releases end in "-it" (instruction-tuned) or
# "-pt" (pretrained); GGUF converters copy that into general.finetune / general.name.
_TUNED_WORDS = frozenset({"it", "instruct", "instruction", "chat", "sft", "dpo", "rlhf"})
_BASE_WORDS = frozenset({"pt", "base", "pretrained", "pretrain"})


def _words(text: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", text.lower())) - {""}


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _checkpoint_facts(source: Path) -> tuple[list[tuple[str, str]], bool | None]:
    """(names, has_chat_template) from a checkpoint's own files, read without touching tensor data.

    names: (where, text) pairs that may say "it"/"pt"; has_chat_template: None when the format cannot say.
    """
    names = [("file name", source.name)]
    if source.is_dir():
        config = _read_json_dict(source / "config.json")
        tok = _read_json_dict(source / "tokenizer_config.json")
        for key in ("_name_or_path", "name_or_path"):
            for doc in (config, tok):
                if isinstance(doc.get(key), str):
                    names.append((key, doc[key]))
        template = bool(tok.get("chat_template")) or any(
            (source / f).is_file() for f in ("chat_template.jinja", "chat_template.json"))
        return names, template
    if source.is_file():
        with open(source, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from gemmakit.weights.gguf_reader import GGUFFile

            with GGUFFile(source) as gguf:  # parses the header only; tensor data stays unread in the map
                meta = gguf.metadata
            names = [(key, meta[key]) for key in ("general.name", "general.finetune", "general.basename")
                     if isinstance(meta.get(key), str)] + names
            return names, bool(meta.get("tokenizer.chat_template"))
    return names, None


def base_model_notice(model: Any) -> str | None:
    """A one-paragraph notice when `model` (a loaded `gemmakit.Gemma`) is a pretrained, not chat-tuned, checkpoint.

    Rule, from what the checkpoint's files say (GGUF `general.*` metadata and `tokenizer.chat_template`; an HF
    directory's config.json / tokenizer_config.json / chat_template.*; the file or directory name):
    1. a name with an instruction-tuning word ("it", "instruct", "chat", ...) means chat-tuned: no notice;
    2. a name with a pretraining word ("pt", "base", "pretrained") means base: notice;
    3. otherwise a checkpoint that carries no chat template is taken as base: notice;
    4. anything else (a template, or a format that cannot say, such as a bare .ckpt): no notice.
    The chat CLI prints it once before the first turn and the server's web page shows it; `generate` stays
    silent, since continuing text is what a base model does well.
    """
    source = getattr(model, "source", None)
    if source is None or not Path(source).exists():
        return None
    source = Path(source)
    names, has_template = _checkpoint_facts(source)
    if any(_words(text) & _TUNED_WORDS for _, text in names):
        return None
    said = next(((where, text) for where, text in names if _words(text) & _BASE_WORDS), None)
    if said is not None:
        why = f"its {said[0]} ({said[1]!r}) says pretrained"
    elif has_template is False:
        where = "GGUF metadata has" if source.is_file() else "tokenizer files have"
        why = (f"its {where} no chat template and none of its names says instruction-tuned "
               f"({names[0][0]} {names[0][1]!r})")
    else:
        return None
    return (f"{source.name} looks like a pretrained (base) checkpoint, not an instruction-tuned one: {why}. A base "
            "model continues text; it was never trained on chat turns, so its replies may echo the prompt or "
            "repeat themselves. For chat, load an instruction-tuned release (Gemma's '-it' checkpoints, e.g. "
            "gemma-3-270m-it); for continuing text, `gemmakit generate` suits this one.")


__all__ = ["base_model_notice", "chat_family", "render_chat", "render_chat_text"]
