"""The multilingual dialog corpus of the ``chatterbot-corpus`` package as topic-classification, dialog or chat
data."""

from __future__ import annotations

import itertools
import os
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

import pandas as pd

from airflow_llmops.ml.data.errors import DatasetError


def corpus_root() -> str:
    try:
        import chatterbot_corpus
    except ImportError as err:  # pragma: no cover - the `local` extra installs it
        raise DatasetError("chatterbot:// sources need the package chatterbot-corpus (extra `local`)") from err
    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")


def languages() -> list[str]:
    return sorted(d for d in os.listdir(corpus_root()) if os.path.isdir(os.path.join(corpus_root(), d)))


def parse_uri(uri: str) -> tuple[str, list[str] | None]:
    """``chatterbot://english?topics=ai,food`` → ("english", ["ai", "food"])."""
    parsed = urlparse(uri)
    language = (parsed.netloc or parsed.path.strip("/")).lower()
    topics = parse_qs(parsed.query).get("topics")
    chosen = [t for t in ",".join(topics).split(",") if t] if topics else None
    return language, chosen


def _conversations(path: str) -> list[list[str]]:
    import yaml

    with open(path, encoding="utf-8") as handle:
        doc: dict[str, Any] = yaml.safe_load(handle) or {}
    out = []
    for conv in doc.get("conversations") or []:
        if isinstance(conv, list):
            out.append([str(turn) for turn in conv if turn is not None])
    return out


def as_messages(turns: list[str]) -> list[dict[str, str]]:
    """One corpus dialog as a conversation: turns alternate user/assistant from the first; a last turn that
    nobody answers is left out (a conversation ends with the assistant). Fewer than two turns: no conversation."""
    answered = turns[: len(turns) - len(turns) % 2]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(answered)]


def load_chatterbot(uri: str, kind: Literal["classification", "dialog", "chat"] = "classification") -> pd.DataFrame:
    """Rows of (text, label=topic) for classification, (prompt, response, label=topic) for dialog, or
    (messages) for chat.

    For dialog each corpus dialog yields one row per consecutive pair of turns; for chat one conversation (see
    :func:`as_messages`). Row order is fixed (topic, dialog, turn).
    """
    language, topics = parse_uri(uri)
    folder = os.path.join(corpus_root(), language)
    if not os.path.isdir(folder):
        raise DatasetError(f"chatterbot corpus has no language {language!r}; choose one of {', '.join(languages())}")
    available = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".yml"))
    unknown = sorted(set(topics or []) - set(available))
    if unknown:
        raise DatasetError(f"chatterbot {language} has no topics {unknown}; available: {', '.join(available)}")
    rows: list[dict[str, Any]] = []
    for topic in topics or available:
        for conv in _conversations(os.path.join(folder, f"{topic}.yml")):
            if kind == "classification":
                rows.extend({"text": turn, "label": topic} for turn in conv)
            elif kind == "dialog":
                rows.extend({"prompt": a, "response": b, "label": topic} for a, b in itertools.pairwise(conv))
            elif len(conv) >= 2:
                rows.append({"messages": as_messages(conv)})
    columns = {"classification": ["text", "label"], "dialog": ["prompt", "response", "label"], "chat": ["messages"]}
    return pd.DataFrame(rows, columns=columns[kind])
