"""Prepare LLM text data: normalise, remove exact and near duplicates, split by a stable hash, count tokens.

Conversations (``task="chat"``) go the same way as one record each: the normalised conversation is kept as
canonical JSON in a ``messages`` column, its identity, duplicates and tokens come from that conversation.

Every removed record is kept in ``removed`` with its reason, and the output is byte-identical on every re-run
over the same input (records are processed in an order fixed by their content hash, never by input order).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from airflow_llmops.ml.data.chat import (
    FORMAT_EXAMPLE,
    count_turns,
    dumps_messages,
    loads_messages,
    normalise_messages,
    render_lenient,
)
from airflow_llmops.ml.data.errors import DatasetError
from airflow_llmops.ml.data.sources import REASON_COLUMN
from airflow_llmops.specs import DatasetSpec

SPLITS = ("train", "validation", "test")
_WS = re.compile(r"\s+")
_SHINGLE = 4
_NUM_PERM = 128


def normalise_text(value: object) -> str:
    """NFKC (folds width and compatibility forms), unify line breaks, collapse runs of whitespace."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = unicodedata.normalize("NFKC", str(value)).replace("\r\n", "\n").replace("\r", "\n")
    return _WS.sub(" ", text).strip()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def content_columns(spec: DatasetSpec, columns: pd.Index) -> list[str]:
    """The columns a record's identity is made of, checked against what the source has."""
    if spec.task == "classification":
        wanted = [spec.text_field]
    elif spec.prompt_field in columns or spec.response_field in columns:
        wanted = [spec.prompt_field, spec.response_field]
    else:
        wanted = [spec.text_field]
    required = wanted + ([spec.label_field] if spec.task == "classification" and spec.label_field else [])
    missing = [c for c in required if c not in columns]
    if missing:
        found = [c for c in columns if not str(c).startswith("_")]
        hint = f"; the source holds conversations ({spec.messages_field!r}): set task='chat'"
        raise DatasetError(
            f"dataset {spec.name!r} has no column(s) {missing}; found {found}. Set text_field / label_field "
            "(or prompt_field / response_field) in the DatasetSpec to the source's column names"
            + (hint if spec.messages_field in columns else "")
        )
    return wanted


def _require_messages(spec: DatasetSpec, records: pd.DataFrame) -> None:
    """A chat source must have the messages field; say which file lacks it and what chat data looks like."""
    if spec.messages_field in records.columns:
        return
    found = [str(c) for c in records.columns if not str(c).startswith("_")]
    files = sorted(set(records["_source_file"].astype(str))) if "_source_file" in records.columns else [spec.source]
    shown = ", ".join(files[:3]) + (f" (and {len(files) - 3} more files)" if len(files) > 3 else "")
    raise DatasetError(
        f"dataset {spec.name!r} has task 'chat' but {shown} has no field {spec.messages_field!r} (found {found}). "
        f"Chat data holds one conversation per record as a list of role/content messages, e.g. the JSONL line "
        f"{FORMAT_EXAMPLE}. Set messages_field in the DatasetSpec to the field holding that list"
    )


def _chat_cell(value: object) -> str:
    """A conversation as canonical JSON; "" for a missing or empty one (removed as ``empty``)."""
    conversation = normalise_messages(value)
    if conversation is None or conversation == [] or (isinstance(conversation, str) and not conversation.strip()):
        return ""
    return dumps_messages(conversation)


def _content_frame(records: pd.DataFrame, spec: DatasetSpec) -> tuple[pd.DataFrame, list[str], str | None]:
    """The normalised content columns (with ``label`` where there is one), their names, and the label field."""
    if spec.task == "chat":
        _require_messages(spec, records)
        return pd.DataFrame({"messages": records[spec.messages_field].map(_chat_cell)}), ["messages"], None
    fields = content_columns(spec, records.columns)
    label = spec.label_field if spec.label_field in records.columns else None
    frame = pd.DataFrame({c: records[c].map(normalise_text) for c in fields})
    if label:
        frame["label"] = records[label].map(normalise_text)
    return frame, fields, label


def _texts(frame: pd.DataFrame, fields: list[str], chat: bool) -> list[str]:
    """What duplicates are judged and tokens counted on: the rendered conversation, or the joined fields."""
    if chat:
        return [render_lenient(loads_messages(value)) for value in frame["messages"]]
    return [" ".join(parts) for parts in frame[fields].itertuples(index=False)]


@dataclass
class PreparedDataset:
    splits: dict[str, pd.DataFrame]
    removed: pd.DataFrame
    rejected_input: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)


def _near_duplicates(ids: list[str], texts: list[str], threshold: float) -> dict[str, str]:
    """record_id → id of the earlier (by record_id order) record it nearly duplicates, via MinHash LSH over
    character 4-grams (works for short texts and for scripts without spaces)."""
    from datasketch import MinHash, MinHashLSH

    # One set of permutations for all signatures, and CRC32 (C, deterministic) instead of the default SHA-1:
    # both were most of the cost per record.
    template = MinHash(num_perm=_NUM_PERM, seed=1, hashfunc=zlib.crc32)
    lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)
    kept: dict[str, MinHash] = {}
    dupes: dict[str, str] = {}
    for record_id, raw in zip(ids, texts, strict=True):
        text = raw.lower()
        grams = {text[i : i + _SHINGLE] for i in range(max(1, len(text) - _SHINGLE + 1))}
        # Texts this short carry too few shingles for a meaningful estimate: exact dedupe covers them.
        if len(grams) < 8:
            continue
        mh = MinHash(
            num_perm=_NUM_PERM, seed=1, hashfunc=zlib.crc32, permutations=template.permutations, scheme=template.scheme
        )
        mh.update_batch([g.encode("utf-8") for g in sorted(grams)])
        # LSH returns candidates; keep only those whose estimated Jaccard similarity reaches the threshold.
        hits = [rid for rid in sorted(lsh.query(mh)) if mh.jaccard(kept[rid]) >= threshold]
        if hits:
            dupes[record_id] = hits[0]
        else:
            lsh.insert(record_id, mh)
            kept[record_id] = mh
    return dupes


def _split_of(record_id: str, spec: DatasetSpec) -> str:
    u = int(_digest(spec.split.salt, record_id)[:15], 16) / 16**15
    if u < spec.split.train:
        return "train"
    return "validation" if u < spec.split.train + spec.split.validation else "test"


def prepare_records(
    records: pd.DataFrame,
    spec: DatasetSpec,
    *,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    tokenizer_name: str = "whitespace",
    rejected_input: pd.DataFrame | None = None,
) -> PreparedDataset:
    """Clean, deduplicate and split ``records`` (columns named by ``spec``).

    ``rejected_input`` are input lines the reader could not parse; they are recorded with the output.
    """
    rejected = rejected_input if rejected_input is not None else pd.DataFrame(columns=[REASON_COLUMN])
    if records.empty:
        raise DatasetError(
            f"dataset {spec.name!r} has 0 readable rows ({len(rejected)} rejected lines); check the source "
            f"{spec.source}"
        )
    frame, fields, label = _content_frame(records, spec)
    chat = spec.task == "chat"
    frame["record_id"] = [_digest(*row) for row in frame[fields].itertuples(index=False)]
    # Where each record came from, so that a removed record can be found in the source.
    refs = [c for c in ("source_file", "source_line") if f"_{c}" in records.columns]
    for ref in refs:
        frame[ref] = records[f"_{ref}"].astype(str)
    # Order by content, never by input order, so that a re-ordered input gives the same bytes.
    frame = frame.sort_values(["record_id", *(["label"] if label else [])], kind="stable").reset_index(drop=True)

    removed: list[pd.DataFrame] = []
    too_large = frame[fields].map(lambda v: len(v.encode("utf-8"))).sum(axis=1) > spec.max_record_bytes
    if too_large.any():
        # The oversized text stays in the source (see source_file/line); copying it here would bloat the record.
        reason = f"too_large:>{spec.max_record_bytes} bytes"
        removed.append(frame[too_large].assign(**{REASON_COLUMN: reason}, **{c: "" for c in fields}))
    frame = frame[~too_large]
    empty = (frame[fields] == "").all(axis=1)
    if empty.any():
        removed.append(frame[empty].assign(**{REASON_COLUMN: "empty"}))
    frame = frame[~empty]

    if label:
        labels_per_text = frame.groupby("record_id")["label"].nunique()
        conflicting = frame["record_id"].isin(labels_per_text[labels_per_text > 1].index)
        if conflicting.any():
            removed.append(frame[conflicting].assign(**{REASON_COLUMN: "conflicting_labels"}))
        frame = frame[~conflicting]

    exact = frame.duplicated("record_id", keep="first")
    if exact.any():
        removed.append(frame[exact].assign(**{REASON_COLUMN: "exact_duplicate"}))
    frame = frame[~exact]

    near = _near_duplicates(list(frame["record_id"]), _texts(frame, fields, chat), spec.near_duplicate_threshold)
    is_near = frame["record_id"].isin(near)
    if is_near.any():
        reasons = frame.loc[is_near, "record_id"].map(lambda rid: f"near_duplicate_of:{near[rid]}")
        removed.append(frame[is_near].assign(**{REASON_COLUMN: reasons}))
    frame = frame[~is_near].copy()

    texts = _texts(frame, fields, chat)
    counts = count_tokens(texts) if count_tokens else [len(t.split()) for t in texts]
    frame["n_tokens"] = pd.array(counts, dtype="int64")
    frame["split"] = frame["record_id"].map(lambda rid: _split_of(rid, spec))
    columns = ["record_id", *fields, *(["label"] if label else []), "n_tokens"]
    splits = {s: frame.loc[frame["split"] == s, columns].reset_index(drop=True) for s in SPLITS}
    removed_frame = (
        pd.concat(removed, ignore_index=True)[
            ["record_id", *fields, *(["label"] if label else []), *refs, REASON_COLUMN]
        ]
        if removed
        else pd.DataFrame(columns=["record_id", *fields, *refs, REASON_COLUMN])
    )
    manifest = build_manifest(spec, splits, removed_frame, len(records), tokenizer_name)
    manifest["rejected_input_rows"] = len(rejected)
    return PreparedDataset(splits=splits, removed=removed_frame, rejected_input=rejected, manifest=manifest)


def _token_stats(series: pd.Series) -> dict[str, float]:
    if series.empty:
        return {}
    return {
        "min": int(series.min()),
        "mean": round(float(series.mean()), 3),
        "p50": float(series.quantile(0.5)),
        "p95": float(series.quantile(0.95)),
        "max": int(series.max()),
    }


def build_manifest(
    spec: DatasetSpec, splits: dict[str, pd.DataFrame], removed: pd.DataFrame, input_rows: int, tokenizer: str
) -> dict[str, Any]:
    """What was produced, without timestamps, so that the same input gives the same manifest."""
    reasons = removed[REASON_COLUMN].str.split(":").str[0].value_counts().sort_index() if len(removed) else None
    per_split: dict[str, Any] = {}
    for name, frame in splits.items():
        entry: dict[str, Any] = {"rows": len(frame), "tokens": _token_stats(frame["n_tokens"])}
        if spec.task == "chat" and "messages" in frame.columns:
            entry["conversations"] = len(frame)
            entry["turns"] = int(sum(count_turns(value) for value in frame["messages"]))
        if "label" in frame.columns:
            entry["labels"] = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
        per_split[name] = entry
    columns = {c: str(t) for c, t in splits["train"].dtypes.items()}
    return {
        "name": spec.name,
        "source": spec.source,
        "task": spec.task,
        "input_rows": input_rows,
        "output_rows": sum(len(f) for f in splits.values()),
        "removed": {str(k): int(v) for k, v in reasons.items()} if reasons is not None else {},
        "splits": per_split,
        "schema": columns,
        "tokenizer": tokenizer,
        "spec": spec.to_dict(),
    }


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """Deterministic Parquet bytes (same frame → same bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def serialise(prepared: PreparedDataset) -> dict[str, bytes]:
    """File name → bytes of the prepared dataset: one Parquet file per split, removed records, manifest."""
    files = {f"{name}.parquet": parquet_bytes(frame) for name, frame in prepared.splits.items()}
    files["removed.parquet"] = parquet_bytes(prepared.removed)
    if len(prepared.rejected_input):
        files["rejected_input.parquet"] = parquet_bytes(prepared.rejected_input)
    manifest = dict(prepared.manifest)
    manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    manifest["content_hash"] = _digest(*(f"{n}={h}" for n, h in sorted(manifest["files"].items())))
    prepared.manifest = manifest
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return files
