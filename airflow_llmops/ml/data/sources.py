"""Read JSONL, CSV and Parquet from any path object with ``open()`` (pathlib.Path, Airflow's ObjectStoragePath).

The Airflow layer hands us ObjectStoragePath objects, so every object store Airflow reaches works here without
a storage layer of our own, while this module stays free of Airflow imports.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any, Protocol

import pandas as pd

from airflow_llmops.ml.data.errors import DatasetError
from airflow_llmops.uris import display_uri

SUFFIXES = {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "parquet": (".parquet", ".pq")}
REASON_COLUMN = "quarantine_reasons"


class PathLike(Protocol):
    def open(self, mode: str = ...) -> Any: ...
    def exists(self) -> bool: ...
    def is_dir(self) -> bool: ...
    def iterdir(self) -> Iterable[PathLike]: ...
    @property
    def name(self) -> str: ...


def _files(path: PathLike, fmt: str) -> list[PathLike]:
    if not path.exists():
        raise DatasetError(f"no file or folder at {display_uri(path)}; check the dataset source URI and its connection")
    if not path.is_dir():
        return [path]
    files = sorted((p for p in path.iterdir() if p.name.lower().endswith(SUFFIXES[fmt])), key=lambda p: p.name)
    if not files:
        raise DatasetError(f"folder {display_uri(path)} holds no {fmt} files (suffixes {', '.join(SUFFIXES[fmt])})")
    return files


def _read_bytes(path: PathLike) -> bytes:
    with path.open("rb") as handle:
        data: bytes = handle.read()
    return data


def _bad(source: str, line: int, reason: str, raw: bytes) -> dict[str, Any]:
    preview = raw[:200].decode("utf-8", errors="replace")
    return {"source_file": source, "line": line, REASON_COLUMN: reason, "raw_preview": preview, "raw_bytes": len(raw)}


def _read_jsonl(path: PathLike, max_record_bytes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    source = display_uri(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            if len(line) > max_record_bytes:
                bad.append(_bad(source, number, f"too_large:{len(line)}>{max_record_bytes} bytes", line))
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                bad.append(_bad(source, number, f"invalid_utf8:byte {err.start}", line))
                continue
            except json.JSONDecodeError as err:
                bad.append(_bad(source, number, f"invalid_json:{err.msg} at column {err.colno}", line))
                continue
            if not isinstance(record, dict):
                bad.append(_bad(source, number, f"not_an_object:{type(record).__name__}", line))
                continue
            record["_source_line"] = number
            rows.append(record)
    return rows, bad


def _read_csv(path: PathLike) -> pd.DataFrame:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatasetError(
            f"{display_uri(path)} is not valid UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
            f"(line {line}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if not text.strip():
        return pd.DataFrame()
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:
        raise DatasetError(f"{display_uri(path)} is not a well-formed CSV file: {err}") from None
    frame["_source_line"] = range(2, len(frame) + 2)
    return frame


def _read_parquet(path: PathLike) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _read_bytes(path)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(
            f"{display_uri(path)} is not a readable Parquet file ({err}); it may be truncated or still being written"
        ) from None
    frame = table.to_pandas()
    frame["_source_line"] = range(1, len(frame) + 1)
    return frame


def read_table(path: PathLike, fmt: str, *, max_record_bytes: int = 1_000_000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every file of ``fmt`` at ``path`` (a file or a folder).

    Returns the records and the quarantined input lines (invalid UTF-8, invalid JSON, over ``max_record_bytes``)
    with a reason each; raises :class:`DatasetError` for an input that cannot be read at all.
    """
    if fmt not in SUFFIXES:
        raise DatasetError(f"unknown format {fmt!r}; use jsonl, csv or parquet")
    frames: list[pd.DataFrame] = []
    bad: list[dict[str, Any]] = []
    for file in _files(path, fmt):
        if fmt == "jsonl":
            rows, file_bad = _read_jsonl(file, max_record_bytes)
            bad.extend(file_bad)
            frame = pd.DataFrame(rows)
        elif fmt == "csv":
            frame = _read_csv(file)
        else:
            frame = _read_parquet(file)
        if not frame.empty:
            frame["_source_file"] = display_uri(file)
            frames.append(frame)
    records = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    quarantine = pd.DataFrame(bad, columns=["source_file", "line", REASON_COLUMN, "raw_preview", "raw_bytes"])
    if records.empty and quarantine.empty:
        raise DatasetError(f"{display_uri(path)} holds no records (empty {fmt} input); check that the export ran")
    return records, quarantine
