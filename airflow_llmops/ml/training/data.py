"""Load a prepared dataset's splits and turn them into tokenized examples for the Trainer.

The prepared layout (see ``airflow_llmops.ml.data.prepare``) is a folder with ``train.parquet``,
``validation.parquet``, ``test.parquet`` and ``manifest.json``. Classification rows carry ``text`` and ``label``;
causal-LM rows carry ``prompt``/``response`` (dialog) or ``text``; chat rows carry ``messages`` (one conversation
as JSON, OpenAI messages format).

Chat examples are rendered with the tokenizer's chat template and carry their own labels: the token ids of the
assistant's turns (content and end of turn), -100 everywhere else (system and user turns, role markers), so the loss
and the validation perplexity cover the assistant's words only.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd
import torch
from torch.utils.data import Dataset

from airflow_llmops.ml.data.chat import CHAT_TEMPLATE, conversation_issues, loads_messages, render_chat
from airflow_llmops.ml.training.errors import TrainingInputError

#: Label of a token the loss ignores (PyTorch's cross-entropy ``ignore_index``).
IGNORE = -100

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
    """Pads a batch on the right; for causal LM the labels are the input ids with padding masked out (-100), or,
    where the examples carry per-token labels (chat), those labels padded with -100.

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
        if self.causal_lm and "labels" in features[0]:
            labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
            for row, feature in enumerate(features):
                labels[row, : len(feature["labels"])] = torch.tensor(feature["labels"], dtype=torch.long)
            batch["labels"] = labels
        elif self.causal_lm:
            batch["labels"] = ids.masked_fill(mask == 0, IGNORE)
        else:
            batch["labels"] = torch.tensor([f["labels"][0] for f in features], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- chat


@dataclass
class ChatStats:
    """What became of a split's conversations on the way to examples."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0  # longer than max_seq_length, cut on the right, some assistant tokens left
    no_assistant_left: int = 0  # cut so short that no assistant token was left: dropped
    malformed: int = 0  # not a valid conversation (a dataset that skipped the validation gate): dropped
    unlocated: int = 0  # the chat template rewrote an assistant turn so that it could not be found: dropped
    examples_of_malformed: list[str] = field(default_factory=list)

    def notes(self, split: str, max_seq_length: int) -> list[str]:
        notes = []
        if self.truncated:
            notes.append(
                f"{self.truncated} of {self.conversations} {split} conversations are longer than "
                f"max_seq_length={max_seq_length} tokens and were truncated"
            )
        if self.no_assistant_left:
            notes.append(
                f"{self.no_assistant_left} {split} conversations were dropped: truncated to max_seq_length="
                f"{max_seq_length}, no assistant token was left to train on (raise max_seq_length to keep them)"
            )
        if self.malformed:
            notes.append(
                f"{self.malformed} {split} conversations were dropped as malformed "
                f"({'; '.join(self.examples_of_malformed)}); ValidateDatasetOperator quarantines them with reasons"
            )
        if self.unlocated:
            notes.append(
                f"{self.unlocated} {split} conversations were dropped: the chat template changes an assistant "
                "turn's text, so its tokens could not be found"
            )
        return notes


def chat_columns(splits: Splits) -> None:
    if "messages" not in splits.train.columns:
        raise TrainingInputError(
            f"dataset {splits.name!r} has no column 'messages' for task 'chat' (columns: "
            f"{list(splits.train.columns)}); prepare it with DatasetSpec(task='chat')"
        )


def conversations(frame: pd.DataFrame, stats: ChatStats | None = None) -> list[list[dict[str, str]]]:
    """The well-formed conversations of a split (optional system, then user/assistant alternating, ending with the
    assistant); malformed ones are counted in ``stats`` and left out."""
    out: list[list[dict[str, str]]] = []
    for value in frame["messages"]:
        if stats is not None:
            stats.conversations += 1
        messages = loads_messages(value)
        issues = conversation_issues(messages)
        if issues:
            if stats is not None:
                stats.malformed += 1
                if len(stats.examples_of_malformed) < 3:
                    stats.examples_of_malformed.append(issues[0].reason)
            continue
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return out


def chat_corpus(frame: pd.DataFrame) -> list[str]:
    """The rendered conversations a chat tokenizer learns from (role markers included: they are special tokens)."""
    return [render_chat(messages) for messages in conversations(frame)]


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the default one (:data:`~airflow_llmops.ml.data.chat.CHAT_TEMPLATE`,
    render_chat's format); ``save_pretrained`` stores it with the model, so serving and evaluation render prompts
    as training did. True when the default was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHAT_TEMPLATE
    return True


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2's TemplateError, or whatever a template's raise_exception raises
        raise TrainingInputError(
            f"the model's chat template cannot render a conversation ({type(err).__name__}: {err}); the "
            f"conversation starts {json.dumps(messages[:2], ensure_ascii=False)[:300]}"
        ) from None
    return str(text)


def _located_span(text: str, content: str, cursor: int, eos: str | None) -> tuple[int, int] | None:
    """Fallback for templates whose prefixes are not prefixes of the whole (they rewrite earlier turns): the
    content itself, plus the EOS token when it ends the turn (after optional whitespace)."""
    start = text.find(content, cursor)
    if start < 0:
        return None
    end = start + len(content)
    if eos:
        rest = text[end:]
        stripped = rest.lstrip()
        if stripped.startswith(eos):
            end += len(rest) - len(stripped) + len(eos)
    return start, end


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]] | None:
    """The conversation rendered by the tokenizer's chat template, and the character spans of the assistant's turns
    in it: from after the generation prompt (role marker) to the end of the turn (content and end-of-turn text),
    found by rendering the conversation prefix by prefix. ``None`` when a turn cannot be found."""
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if text.startswith(through) and through.startswith(prompt) and len(prompt) >= cursor:
            span: tuple[int, int] | None = (len(prompt), len(through))
        else:
            span = _located_span(text, message["content"], cursor, getattr(tokenizer, "eos_token", None))
        if span is None:
            return None
        spans.append(span)
        cursor = span[1]
    return text, spans


def _segment_tokens(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> dict[str, list[int]]:
    """Slow tokenizers have no offsets: the text is tokenized piece by piece, split at the span boundaries."""
    bounds = sorted({0, len(text), *(b for span in spans for b in span)})
    ids: list[int] = []
    labels: list[int] = []
    for lo, hi in itertools.pairwise(bounds):
        piece = list(tokenizer(text[lo:hi], add_special_tokens=False, verbose=False)["input_ids"])
        trained = any(s_lo <= lo < s_hi for s_lo, s_hi in spans)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return {"input_ids": ids, "labels": labels}


def chat_example(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, list[int]] | None:
    """Input ids and labels of one conversation (untruncated): a token is trained when it starts inside an
    assistant span (no special tokens are added: the template wrote the ones it wants); ``None`` when the template
    hides an assistant turn."""
    rendered = assistant_spans(tokenizer, messages)
    if rendered is None:
        return None
    text, spans = rendered
    if not getattr(tokenizer, "is_fast", False):
        return _segment_tokens(tokenizer, text, spans)
    # verbose=False: no "longer than the maximum" warning; the caller truncates, and the log counts truncations.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for token, (start, _end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": ids, "labels": labels}


def tokenize_chat(tokenizer: Any, frame: pd.DataFrame, max_seq_length: int) -> tuple[TokenizedDataset, ChatStats]:
    """Examples of a split's conversations, truncated to ``max_seq_length`` (on the right: the opening turns are
    the context of the later ones); one left without an assistant token is dropped and counted."""
    stats = ChatStats()
    examples: list[dict[str, list[int]]] = []
    for messages in conversations(frame, stats):
        example = chat_example(tokenizer, messages)
        if example is None:
            stats.unlocated += 1
            continue
        if len(example["input_ids"]) > max_seq_length:
            example = {key: value[:max_seq_length] for key, value in example.items()}
            if all(label == IGNORE for label in example["labels"]):
                stats.no_assistant_left += 1
                continue
            stats.truncated += 1
        examples.append(example)
    stats.examples = len(examples)
    return TokenizedDataset(examples), stats
