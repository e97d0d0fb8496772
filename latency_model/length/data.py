"""The training table: prompts, the replies they got, labels in the served model's tokens.

A DATA file is a Parquet table with `prompt` and `response` columns (an `id` column, when
present, decides the split; otherwise the prompt's text does). The label is the reply's length
in tokens of the tokenizer the replicas serve with, so a prediction is in the unit `max_tokens`
and the scheduler count: the same reply is 2-4x more tokens in a small local BPE than in
Llama's. The reply is only ever a label, never an input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latency_model.length.predictor import LengthModelError, split_of

TokenCounter = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class LengthTable:
    ids: list[str]
    prompts: list[str]
    tokens: np.ndarray
    """Reply length in tokens, >= 1."""

    def subset(self, mask: np.ndarray) -> LengthTable:
        idx = np.flatnonzero(mask)
        return LengthTable([self.ids[i] for i in idx], [self.prompts[i] for i in idx], self.tokens[idx])

    def splits(self) -> dict[str, LengthTable]:
        sides = np.asarray([split_of(i) for i in self.ids])
        return {side: self.subset(sides == side) for side in ("train", "val", "test")}


def read_pairs(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(ids, prompts, responses) of a DATA file; LengthModelError naming what is missing."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise LengthModelError(f"{p}: no such file (DATA is a Parquet table with prompt and response columns)")
    try:
        table = pq.read_table(p)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise LengthModelError(f"{p}: not a readable Parquet table ({err})") from None
    missing = [c for c in ("prompt", "response") if c not in table.column_names]
    if missing:
        raise LengthModelError(f"{p}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
    prompts = [s or "" for s in table.column("prompt").to_pylist()]
    responses = [s or "" for s in table.column("response").to_pylist()]
    ids = ([str(i) for i in table.column("id").to_pylist()] if "id" in table.column_names else list(prompts))
    return ids, prompts, responses


def tokenizer_counter(model_dir: str | Path) -> TokenCounter:
    """Token counts of texts in the served model's tokenizer (its `tokenizer.json`), without
    special tokens: what the engine counts as output tokens."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise LengthModelError(f"{path}: no tokenizer there (point --tokenizer at a model directory)")
    tok = Tokenizer.from_file(str(path))

    def count(texts: Sequence[str]) -> np.ndarray:
        return np.asarray([len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)])

    return count


def load_table(path: str | Path, count_tokens: TokenCounter) -> LengthTable:
    ids, prompts, responses = read_pairs(path)
    tokens = np.maximum(np.asarray(count_tokens(responses), dtype=np.int64), 1)
    return LengthTable(ids, prompts, tokens)
