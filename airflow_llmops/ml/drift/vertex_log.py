"""Vertex AI request-response logging as the live traffic of a drift check.

An endpoint created with ``predict_request_response_logging_config`` (the adapter's
``request_response_logging_uri``) logs its predictions to a BigQuery table with the columns ``endpoint``,
``deployed_model_id``, ``logging_time``, ``request_id``, ``request_payload`` and ``response_payload`` (the last two
repeated strings: one JSON document per instance and per prediction). Exported to Cloud Storage as JSON
(``bq extract --destination_format NEWLINE_DELIMITED_JSON``, optionally gzip), each line is one row::

    {"endpoint": "projects/p/locations/us-central1/endpoints/123", "deployed_model_id": "456",
     "logging_time": "2026-11-29 07:00:00.123456 UTC", "request_id": "8765",
     "request_payload": ["{\\"inputs\\": \\"hi\\"}"], "response_payload": ["{\\"label\\": \\"greetings\\"}"]}

:func:`read_vertex_log_window` turns each instance into the record the model server's own request log holds
(:mod:`airflow_llmops.serving.request_log`), as :mod:`.capture` does for SageMaker Data Capture, so the same checks
run. The variant is the deployed model's id (the row names no display name). Not in the table: latency
(``latency_ms`` is ``None``: the latency check is skipped) and failed requests (``status`` is 200). A line that
cannot be used is skipped and counted (``corrupt_lines``), never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from airflow_llmops.ml.drift.capture import (
    CaptureWindow,
    MalformedCallback,
    MalformedRecord,
    parse_time,
    parsed_lines,
    request_base,
    request_texts,
    response_answers,
    text_records,
    window_of,
)

SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
ENDPOINT = "/predict"


def logging_time(value: Any) -> float:
    """``logging_time`` as BigQuery exports a TIMESTAMP (``2026-11-29 07:00:00.123456 UTC``), ISO 8601, or unix
    seconds, as unix seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise MalformedRecord(f"logging_time is {value!r}, not a time")
    text = value.strip()
    if text.endswith(" UTC"):
        text = text[: -len(" UTC")].replace(" ", "T") + "+00:00"
    try:
        return parse_time(text)
    except MalformedRecord:
        raise MalformedRecord(f"logging_time {value!r} is not a BigQuery TIMESTAMP or ISO 8601 time") from None


def _payload(row: Mapping[str, Any], key: str) -> list[Any]:
    items = row.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise MalformedRecord(f"{key} is not a list (a repeated column)")
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                out.append(json.loads(item))
            except ValueError:
                out.append(item)  # a plain text instance
        else:
            out.append(item)
    return out


def vertex_log_records(line: str, *, variants: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The request-log records of one exported row (one per input text).

    :raises MalformedRecord: the line cannot be used; the message says why.
    """
    try:
        row = json.loads(line)
    except ValueError as err:
        raise MalformedRecord(f"not JSON: {err}") from None
    if not isinstance(row, dict) or "request_payload" not in row:
        raise MalformedRecord("no request_payload (not a request-response logging row)")
    ts = logging_time(row.get("logging_time"))
    texts: list[str] = []
    for instance in _payload(row, "request_payload"):
        texts += request_texts(instance)
    if not texts:
        raise MalformedRecord("request_payload holds no text")
    try:
        answers = response_answers(_payload(row, "response_payload"))
    except MalformedRecord:
        answers = []
    dmid = str(row.get("deployed_model_id") or "")
    base = request_base(ts, str(row.get("request_id") or ""), (variants or {}).get(dmid, dmid), ENDPOINT)
    return text_records(base, texts, answers)


def log_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The exported files of a folder (any depth), or the given files, in name order."""
    if isinstance(source, str | Path):
        root = Path(str(source).removeprefix("file://"))
        if root.is_file():
            return [root]
        if not root.is_dir():
            return []
        return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    return [Path(str(p).removeprefix("file://")) for p in source]


def read_vertex_log(
    source: str | Path | Iterable[str | Path],
    *,
    since: float | None = None,
    until: float | None = None,
    variants: Mapping[str, str] | None = None,
    on_malformed: MalformedCallback | None = None,
) -> Iterator[dict[str, Any]]:
    """Request-log records with ``since <= ts < until`` (``ts`` = ``logging_time``) of exported rows.
    ``variants`` maps deployed model ids to names; ``on_malformed(path, line_number, reason)`` hears of each line
    skipped."""
    for path in log_files(source):
        for records in parsed_lines(path, lambda line: vertex_log_records(line, variants=variants), on_malformed):
            for record in records:
                if (since is None or record["ts"] >= since) and (until is None or record["ts"] < until):
                    yield record


def read_vertex_log_window(
    source: str | Path | Iterable[str | Path],
    start: float,
    end: float,
    *,
    variants: Mapping[str, str] | None = None,
) -> CaptureWindow:
    """The requests of ``[start, end)`` in exported request-response logging rows as a drift window: the same rows
    as :func:`~.inputs.read_window` gives for the request log; malformed lines in ``corrupt_lines``."""
    files = log_files(source)

    def read(bad: MalformedCallback) -> Iterable[dict[str, Any]]:
        return read_vertex_log(files, since=start, until=end, variants=variants, on_malformed=bad)

    return window_of(read, start, end, lambda: len(files))
