"""Agile classifiers (Responsible GenAI Toolkit): LoRA-tune a Gemma on a few labelled examples, score like ShieldGemma.

The recipe is the gemma-cookbook `agile_classifiers` notebook: the prompt
`{instructions}:[{labels}]` + separator + `Text:{text}` + separator + `Prediction:`, single-token labels
(`Positive`/`Negative`, Negative = the harmful class), LoRA rank 4 on the query and value projections
(KerasNLP's `enable_lora`, whose scaling is 1), Adam at 5e-4, batch 2, sequence length 128. The score is the
softmax over the two label tokens' logits at the last position, P(harmful label), exactly as ShieldGemma's Yes/No.

The loss is cross-entropy of the label token over the full vocabulary at the prediction position. (The notebook's
Keras `fit` on raw strings may also train on the prompt tokens; only the label matters for the score.) Texts that
do not fit `max_length` lose their end, not the instruction or the `Prediction:` cue.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gemmakit.errors import FormatError, InputError, TokenizerError
from gemmakit.model import Transformer
from gemmakit.safety.datasets import Example
from gemmakit.safety.scoring import Classification, PolicyResult, TokenizerLike, _pair, _right_pad

INSTRUCTIONS = "Classify the following text into one of the following classes"
SEPARATOR = "\n<separator>\n"
SETTINGS_FILE = "agile_classifier.json"


@dataclass
class AgileConfig:
    """Training and prompt settings; `labels[i]` is the word for label i (so labels[1] is the harmful class)."""

    labels: tuple[str, str] = ("Positive", "Negative")
    instructions: str = INSTRUCTIONS
    separator: str = SEPARATOR
    epochs: int = 4
    lr: float = 5e-4
    rank: int = 4
    batch_size: int = 2
    max_length: int = 128
    seed: int = 1234
    name: str = "agile"

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if len(self.labels) != 2 or len(set(self.labels)) != 2:
            raise InputError(f"labels must be two different words (label 0, label 1), got {self.labels}")
        for field_name in ("epochs", "rank", "batch_size", "max_length"):
            if getattr(self, field_name) < 1:
                raise InputError(f"{field_name} must be >= 1, got {getattr(self, field_name)}")


class AgileClassifier:
    """A LoRA-adapted Gemma that scores texts as P(labels[1]); usable wherever a guard takes a classifier."""

    def __init__(self, model: Any, config: AgileConfig, threshold: float = 0.5,
                 tokenizer: TokenizerLike | None = None) -> None:
        self.module: Transformer = model if isinstance(model, Transformer) else model.module
        self.tokenizer: TokenizerLike = tokenizer if tokenizer is not None else model.tokenizer
        self.config, self.threshold = config, threshold
        self.label_ids = []
        for word in config.labels:
            token = self.tokenizer.token_id(word)
            if token is None:
                raise TokenizerError(f"label {word!r} is not a single token of the model's vocabulary; choose "
                                     "single-token label words")
            self.label_ids.append(token)
        head = f"{config.instructions}:[{','.join(config.labels)}]{config.separator}Text:"
        self._head = self.tokenizer.encode(head, add_bos=True)
        self._tail = self.tokenizer.encode(f"{config.separator}Prediction:", add_bos=False)

    def prompt_ids(self, text: str) -> list[int]:
        """The notebook's prompt, the text cut to fit `max_length` tokens."""
        room = self.config.max_length - len(self._head) - len(self._tail)
        if room < 1:
            raise InputError(f"max_length {self.config.max_length} leaves no room for the text after the prompt's "
                             f"{len(self._head) + len(self._tail)} tokens")
        return self._head + self.tokenizer.encode(text, add_bos=False)[:room] + self._tail

    def _last_hidden(self, texts: Sequence[str]) -> torch.Tensor:
        ids, last = _right_pad([self.prompt_ids(t) for t in texts], self.module.config.pad_id)
        h = self.module.hidden_states(ids.to(self.module.device))
        return h[torch.arange(len(texts)), last.to(h.device)]

    def probabilities(self, texts: Sequence[str], batch_size: int = 8) -> list[float]:
        """P(labels[1]) per text: softmax over the two label logits."""
        out: list[float] = []
        rows = torch.tensor(self.label_ids, device=self.module.device)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                h = self._last_hidden(texts[start:start + batch_size])
                logits = self.module.unembed(h[:, None], rows=rows)[:, 0].float()
                out += torch.softmax(logits, dim=-1)[:, 1].tolist()
        return out

    def _verdict(self, score: float) -> Classification:
        return Classification((PolicyResult(self.config.name, score, self.threshold),))

    def classify_batch(self, items: Sequence[Any]) -> list[Classification]:
        """An item is a text or a (prompt, response) pair; for a pair the response is what gets classified."""
        texts = [prompt if response is None else response for prompt, response in map(_pair, items)]
        return [self._verdict(p) for p in self.probabilities(texts)]

    def classify(self, prompt: str, response: str | None = None) -> Classification:
        return self.classify_batch([(prompt, response)])[0]

    def score(self, prompt: str, response: str | None = None) -> dict[str, float]:
        return self.classify(prompt, response).scores

    # --- files ----------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """The LoRA adapter in PEFT's format plus `agile_classifier.json` (labels, prompt, threshold)."""
        from gemmakit.train.lora import save_adapter

        directory = save_adapter(self.module, directory)
        settings = {**asdict(self.config), "threshold": self.threshold}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, model: Any, directory: str | Path, threshold: float | None = None,
             tokenizer: TokenizerLike | None = None) -> AgileClassifier:
        """Wrap `model` with the saved adapter (this changes the model's module in place)."""
        from gemmakit.train.lora import load_adapter

        path = Path(directory) / SETTINGS_FILE
        if not path.exists():
            raise FormatError(f"{directory}: no {SETTINGS_FILE}; expected a directory from `safety train-agile`")
        try:
            settings = json.loads(path.read_text())
            saved_threshold = float(settings.pop("threshold", 0.5))
            config = AgileConfig(**settings)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: not valid agile classifier settings: {e}") from e
        module = model if isinstance(model, Transformer) else model.module
        load_adapter(module, directory)
        return cls(model, config, saved_threshold if threshold is None else threshold, tokenizer)


def train_agile(model: Any, examples: Sequence[Example], config: AgileConfig | None = None,
                tokenizer: TokenizerLike | None = None, progress: bool = False) -> AgileClassifier:
    """Tune LoRA adapters (query/value projections) so the model answers each example's label word."""
    from gemmakit.train.lora import LoraConfig, apply_lora, lora_parameters

    config = config or AgileConfig()
    data = [(e.prompt if e.response is None else e.response, e.label) for e in examples if e.label is not None]
    if not data:
        raise InputError("train_agile needs labelled examples (label 0 or 1)")
    classifier = AgileClassifier(model, config, tokenizer=tokenizer)
    module = classifier.module
    torch.manual_seed(config.seed)
    apply_lora(module, LoraConfig(r=config.rank, alpha=float(config.rank), target_modules=("q_proj", "v_proj")))
    params = lora_parameters(module)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    order = random.Random(config.seed)
    targets = torch.tensor(classifier.label_ids, device=module.device)
    module.train()
    try:
        for epoch in range(config.epochs):
            shuffled = list(data)
            order.shuffle(shuffled)
            total = 0.0
            for start in range(0, len(shuffled), config.batch_size):
                batch = shuffled[start:start + config.batch_size]
                h = classifier._last_hidden([text for text, _ in batch])
                logits = module.unembed(h[:, None])[:, 0].float()
                loss = F.cross_entropy(logits, targets[torch.tensor([label for _, label in batch])])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            if progress:
                print(f"[agile epoch {epoch + 1}/{config.epochs}: loss {total / len(shuffled):.4f}]", flush=True)
    finally:
        module.eval()
    return classifier
