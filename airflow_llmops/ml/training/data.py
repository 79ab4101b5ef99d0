"""Load a prepared dataset's splits and turn them into tokenized examples for the Trainer.

The prepared layout (see ``airflow_llmops.ml.data.prepare``) is a folder with ``train.parquet``,
``validation.parquet``, ``test.parquet`` and ``manifest.json``. Classification rows carry ``text`` and ``label``;
causal-LM rows carry ``prompt``/``response`` (dialog) or ``text``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd
import torch
from torch.utils.data import Dataset

from airflow_llmops.ml.training.errors import TrainingInputError

# The splits a training job reads; the test split stays untouched for the evaluation stage.
TRAINING_SPLITS = ("train", "validation")


def local_path(uri: str) -> str | None:
    """``file:///a/b`` or ``/a/b`` → ``/a/b``; ``None`` for a remote URI (``s3://``, ``gs://``...)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    # A one-letter "scheme" is a Windows drive letter, not a URI scheme.
    if not parsed.scheme or len(parsed.scheme) == 1:
        return os.path.abspath(os.path.expanduser(uri))
    return None


@dataclass
class Splits:
    name: str
    train: pd.DataFrame
    validation: pd.DataFrame


def _read_split(base: str, split: str, name: str, *, remote: bool) -> pd.DataFrame:
    location = f"{base.rstrip('/')}/{split}.parquet"
    if not remote and not os.path.isfile(location):
        raise TrainingInputError(
            f"dataset {name!r} has no split {split!r} ({location} is missing); point dataset_uri at the folder "
            "written by the prepare stage (it holds train/validation/test.parquet and manifest.json)"
        )
    try:
        return pd.read_parquet(location)
    except (OSError, ValueError, ImportError) as err:
        raise TrainingInputError(f"cannot read split {split!r} of dataset {name!r} from {location}: {err}") from None


def load_splits(dataset_uri: str | None) -> Splits:
    """The train and validation splits; an empty or missing split is an input error naming the dataset."""
    if not dataset_uri:
        raise TrainingInputError("TrainingSpec.dataset_uri is not set; give the prepared dataset's folder")
    path = local_path(dataset_uri)
    if path is not None and not os.path.isdir(path):
        raise TrainingInputError(f"dataset_uri {dataset_uri!r}: folder {path} does not exist")
    base = path if path is not None else dataset_uri
    name = _dataset_name(path, dataset_uri)
    frames = {split: _read_split(base, split, name, remote=path is None) for split in TRAINING_SPLITS}
    for split, frame in frames.items():
        if frame.empty:
            raise TrainingInputError(
                f"dataset {name!r} has 0 rows in split {split!r}; prepare it again with a non-zero "
                f"DatasetSpec.split.{split} fraction or with more data"
            )
    return Splits(name=name, train=frames["train"], validation=frames["validation"])


def _dataset_name(path: str | None, uri: str) -> str:
    if path is not None:
        try:
            with open(os.path.join(path, "manifest.json"), encoding="utf-8") as handle:
                return str(json.load(handle).get("name") or uri)
        except (OSError, ValueError):
            pass
    return uri


def classification_columns(splits: Splits) -> None:
    missing = [c for c in ("text", "label") if c not in splits.train.columns]
    if missing:
        raise TrainingInputError(
            f"dataset {splits.name!r} has no column(s) {missing} for task 'classification' (columns: "
            f"{list(splits.train.columns)}); prepare it with task='classification' and a label_field"
        )


def label_names(train: pd.DataFrame) -> list[str]:
    """Sorted, so the label → id mapping is the same on every rank and every retry."""
    return sorted({str(v) for v in train["label"].dropna()})


def known_labels(frame: pd.DataFrame, label2id: dict[str, int]) -> tuple[list[str], list[int], int]:
    """Texts and label ids of the rows whose label the head knows, plus how many rows were dropped (labels that
    occur only outside the training split cannot be scored by the head)."""
    keep = frame["label"].astype(str).isin(label2id)
    rows = frame[keep]
    return list(rows["text"].astype(str)), [label2id[str(v)] for v in rows["label"]], int((~keep).sum())


def lm_texts(frame: pd.DataFrame, eos: str) -> list[str]:
    """Dialog rows become ``prompt<eos>response<eos>``: the model learns where a turn ends and a reply starts."""
    if {"prompt", "response"} <= set(frame.columns):
        return [
            f"{p}{eos}{r}{eos}" for p, r in zip(frame["prompt"].astype(str), frame["response"].astype(str), strict=True)
        ]
    if "text" in frame.columns:
        return [f"{t}{eos}" for t in frame["text"].astype(str)]
    raise TrainingInputError(f"causal_lm needs columns prompt/response or text; the dataset has {list(frame.columns)}")


def tokenizer_corpus(frame: pd.DataFrame) -> list[str]:
    """The raw turns a tokenizer learns from (without the EOS joins, which it gets as a special token)."""
    columns = [c for c in ("prompt", "response", "text") if c in frame.columns]
    return [str(v) for c in columns for v in frame[c].dropna()]


class TokenizedDataset(Dataset[dict[str, list[int]]]):
    """Pre-tokenized, unpadded examples; padding happens per batch (to the batch's longest example)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def token_count(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_seq_length: int, labels: Sequence[int] | None = None
) -> TokenizedDataset:
    """Truncate to ``max_seq_length``; classification examples carry their label id, LM examples none (the
    collator derives LM labels from the input ids)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_seq_length, padding=False)
    examples: list[dict[str, list[int]]] = []
    for i, ids in enumerate(encoded["input_ids"]):
        example = {"input_ids": list(ids)}
        if labels is not None:
            example["labels"] = [int(labels[i])]
        examples.append(example)
    return TokenizedDataset(examples)


class PadCollator:
    """Pads a batch on the right; for causal LM the labels are the input ids with padding masked out (-100).

    Masking by the attention mask rather than by the pad id keeps real end-of-text tokens in the loss when a
    tokenizer pads with its EOS token.
    """

    def __init__(self, pad_token_id: int, *, causal_lm: bool) -> None:
        self.pad_token_id = pad_token_id
        self.causal_lm = causal_lm

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.causal_lm:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.tensor([f["labels"][0] for f in features], dtype=torch.long)
        return batch
