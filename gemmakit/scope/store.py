"""Activation store: a text corpus streamed through the model into memory-mapped files, then read back
in shuffled batches for training.

Layout of a store folder:
    meta.json                      sites, d per site, context, dtype, sequences and rows done (for resuming)
    sequences.npy   int32 [S, T]   the token windows fed to the model (each starts with <bos>)
    rows.npy        int32 [N, 2]   (sequence, position) of every stored row
    <site>.bin      [N, d]         activations, float32 or bfloat16 bits (int16 on disk), written in order
Special tokens (<bos>, <eos>, padding, ...) are never stored: Gemma's BOS residual is hundreds of times larger
than any other and would dominate an SAE's loss. The store is written sequence batch by sequence batch and
`meta.json` is updated after each, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemmakit.errors import FormatError, InputError
from gemmakit.scope.sites import activations, as_transformer, parse_site, site_width

DTYPES = {"float32": np.float32, "bfloat16": np.int16}


def chunk_tokens(ids: Sequence[int], context: int, bos_id: int) -> np.ndarray:
    """Windows [S, context] of a token stream, each `<bos>` + (context - 1) tokens; the last partial one dropped."""
    if context < 2:
        raise InputError(f"context must be >= 2 tokens, got {context}")
    body = context - 1
    n = len(ids) // body
    arr = np.asarray(ids[: n * body], dtype=np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), bos_id, dtype=np.int32), arr], axis=1)


def special_mask(tokens: np.ndarray, tokenizer: Any) -> np.ndarray:
    """True where a token is a control token (bos, eos, pad, turn markers); all False without a tokenizer."""
    if tokenizer is None:
        return np.zeros(tokens.shape, dtype=bool)
    uniq = np.unique(tokens)
    special = {int(t) for t in uniq if tokenizer.is_special(int(t))}
    special.update(i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None and i >= 0)
    return np.isin(tokens, np.fromiter(special, dtype=np.int64, count=len(special)))


def _site_file(folder: Path, site: str) -> Path:
    return folder / f"{site}.bin"


def build_store(model: Any, text: str, folder: str | Path, sites: Sequence[str], context: int = 128,
                batch_size: int = 8, max_tokens: int | None = None, dtype: str = "bfloat16",
                progress: bool = True) -> ActivationStore:
    """Run `text` through the model and store the activations at `sites`; resumes an interrupted build."""
    from tqdm import tqdm

    folder = Path(folder)
    if dtype not in DTYPES:
        raise InputError(f"store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    sites = [str(parse_site(s)) for s in sites]
    tok = model.tokenizer
    module = as_transformer(model)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = _read_meta(meta_path)
        if meta["sites"] != sites or meta["context"] != context or meta["dtype"] != dtype:
            raise InputError(f"{folder}: holds a store for sites {meta['sites']}, context {meta['context']}, "
                             f"{meta['dtype']}; use another folder for sites {sites}, context {context}, {dtype}")
        seqs = np.load(folder / "sequences.npy", allow_pickle=False)
        rows = np.load(folder / "rows.npy", mmap_mode="r", allow_pickle=False)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        seqs = chunk_tokens(tok.encode(text, add_bos=False), context, tok.bos_id)
        keep = ~special_mask(seqs, tok)
        if max_tokens is not None:  # whole sequences until the budget of stored rows is reached
            per_seq = np.cumsum(keep.sum(1))
            n_seq = int(np.searchsorted(per_seq, max_tokens, side="left")) + 1
            seqs, keep = seqs[:n_seq], keep[:n_seq]
        if len(seqs) == 0:
            raise InputError(f"the corpus gives no window of {context} tokens; give more text or a shorter context")
        np.save(folder / "sequences.npy", seqs)
        seq_idx, pos = np.nonzero(keep)
        np.save(folder / "rows.npy", np.stack([seq_idx, pos], 1).astype(np.int32))
        rows = np.load(folder / "rows.npy", mmap_mode="r", allow_pickle=False)
        meta = {"sites": sites, "d": {s: site_width(module, s) for s in sites}, "context": context,
                "dtype": dtype, "n_rows": int(len(rows)), "n_sequences": int(len(seqs)), "sequences_done": 0,
                "rows_done": 0, "model": str(getattr(model, "source", None))}
        for s in sites:
            np.memmap(_site_file(folder, s), dtype=DTYPES[dtype], mode="w+", shape=(len(rows), meta["d"][s])).flush()
        _write_meta(meta_path, meta)
    maps = {s: np.memmap(_site_file(folder, s), dtype=DTYPES[dtype], mode="r+", shape=(meta["n_rows"], meta["d"][s]))
            for s in sites}
    keep_all = ~special_mask(seqs, tok)
    bar = tqdm(total=meta["n_rows"], initial=meta["rows_done"], unit="tok", disable=not progress,
               desc=f"activations -> {folder}")
    done, row = meta["sequences_done"], meta["rows_done"]
    while done < len(seqs):
        batch = seqs[done: done + batch_size]
        acts = activations(module, torch.from_numpy(batch.astype(np.int64)), sites)
        keep = torch.from_numpy(keep_all[done: done + batch_size])
        n = int(keep.sum())
        for s in sites:
            x = acts[s][keep].float()
            maps[s][row: row + n] = _to_disk(x, dtype)
            maps[s].flush()
        done, row = done + len(batch), row + n
        meta.update(sequences_done=done, rows_done=row)
        _write_meta(meta_path, meta)
        bar.update(n)
    bar.close()
    return ActivationStore(folder)


def _to_disk(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x.numpy()
    return x.to(torch.bfloat16).view(torch.int16).numpy()


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        for key in ("sites", "d", "context", "dtype", "n_rows", "sequences_done", "rows_done"):
            meta[key]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: not an activation store's meta.json ({e})") from e
    return meta


class ActivationStore:
    """Read side of a store: one site's rows as float32 tensors (an `ActivationSource` for training)."""

    def __init__(self, folder: str | Path, site: str | None = None) -> None:
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder / "meta.json")
        if self.meta["rows_done"] < self.meta["n_rows"]:
            raise InputError(f"{self.folder}: store is incomplete ({self.meta['rows_done']} of "
                             f"{self.meta['n_rows']} rows); run the build again to resume it")
        self.site = str(parse_site(site)) if site else self.meta["sites"][0]
        if self.site not in self.meta["sites"]:
            raise InputError(f"{self.folder}: no site {self.site}; it holds {self.meta['sites']}")
        self.d = int(self.meta["d"][self.site])
        self.dtype = self.meta["dtype"]
        self._map = np.memmap(_site_file(self.folder, self.site), dtype=DTYPES[self.dtype], mode="r",
                              shape=(self.meta["n_rows"], self.d))

    def __len__(self) -> int:
        return int(self.meta["n_rows"])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        arr = self._map[index.numpy()]
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.view(torch.bfloat16).float() if self.dtype == "bfloat16" else t

    def sequences(self) -> np.ndarray:
        return np.load(self.folder / "sequences.npy", allow_pickle=False)

    def positions(self) -> np.ndarray:
        """(sequence, position) of every row."""
        return np.load(self.folder / "rows.npy", allow_pickle=False)

    def batches(self, batch_size: int, seed: int = 0, epochs: int = 1):
        """Shuffled batches of rows [batch_size, d] (the last partial batch of each epoch is dropped)."""
        from gemmakit.scope.train import BatchOrder

        order = BatchOrder(len(self), batch_size, seed)
        for step in range(order.per_epoch * epochs):
            yield self.rows(order(step))
