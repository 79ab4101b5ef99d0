"""Azure ML data collection (payload logging) as the live traffic of a drift check.

A managed online deployment with data collection on writes the HTTP requests and responses it serves as JSON Lines
under ``modelDataCollector/<endpoint>/<deployment>/<collection>/yyyy/MM/dd/HH/<instance>.jsonl`` (UTC hours;
the collections ``request`` and ``response``), one CloudEvent a line::

    {"specversion": "1.0", "id": "...", "source": ".../onlineEndpoints/ep/deployments/v3-ab12",
     "type": "azureml.inference.request", "datacontenttype": "application/json", "time": "2026-11-29T08:59:48Z",
     "data": {"inputs": "hi"}, "path": "/invocations", "method": "POST", "correlationid": "f6e8...", ...}

A response line (``azureml.inference.response``) carries the answer's body with the same ``correlationid``.
:func:`read_collected_window` joins each request with its response and turns every input text into the record the
model server's own request log holds (:mod:`airflow_llmops.serving.request_log`), as :mod:`.capture` does for
SageMaker Data Capture, so the same checks run. The variant is the deployment. Not collected: latency (``None``:
the latency check is skipped). A response's status is not in the record either: a request counts as answered
(200) when a response line was collected for it, else it is read with no output. Lines that cannot be used (not
JSON, no time, a payload kept in a separate blob: ``datainblob``) are skipped and counted, never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_llmops.ml.drift.capture import (
    CaptureWindow,
    MalformedCallback,
    MalformedRecord,
    capture_files,
    parse_time,
    parsed_lines,
    request_base,
    request_texts,
    response_answers,
    text_records,
    window_of,
)

REQUEST, RESPONSE = "request", "response"
ENDPOINT = "/score"


@dataclass(frozen=True)
class Event:
    """One collected line: which collection, its deployment, when, the join key and the body."""

    kind: str  # request or response
    deployment: str
    ts: float
    correlation: str
    data: Any
    path: str


def _deployment(source: Any, fallback: str) -> str:
    if isinstance(source, str) and "/deployments/" in source:
        return source.rsplit("/deployments/", 1)[1].split("/", 1)[0] or fallback
    return fallback


def parse_event(line: str, *, deployment: str = "") -> Event:
    """One JSON line of a ``request`` or ``response`` collection.

    :raises MalformedRecord: the line cannot be used; the message says why.
    """
    try:
        record = json.loads(line)
    except ValueError as err:
        raise MalformedRecord(f"not JSON: {err}") from None
    if not isinstance(record, dict):
        raise MalformedRecord("not a JSON object")
    kind = str(record.get("type") or "").rsplit(".", 1)[-1]
    if kind not in (REQUEST, RESPONSE):
        raise MalformedRecord(f"type {record.get('type')!r} is not azureml.inference.request or .response")
    if str(record.get("datainblob", "")).lower() == "true":
        raise MalformedRecord("the payload is kept in a separate blob (datainblob): not read")
    correlation = str(record.get("correlationid") or record.get("xrequestid") or record.get("id") or "")
    if not correlation:
        raise MalformedRecord("no correlationid to join the request and its response")
    data = record.get("data")
    if isinstance(data, str) and "json" in str(record.get("datacontenttype") or "").lower():
        try:
            data = json.loads(data)
        except ValueError:
            raise MalformedRecord("data is not valid JSON though datacontenttype says JSON") from None
    return Event(
        kind=kind,
        deployment=_deployment(record.get("source"), deployment),
        ts=parse_time(record.get("time")),
        correlation=correlation,
        data=data,
        path=str(record.get("path") or ENDPOINT),
    )


def _collection_files(
    source: str | Path | Iterable[str | Path], since: float | None, until: float | None
) -> list[tuple[Path, str]]:
    """(file, deployment) of the request and response collections whose hour folders may hold ``[since, until)``;
    ``source`` is an endpoint's folder, a deployment's, a collection's, or files."""
    out = []
    for file in capture_files(source, since=since, until=until):
        parts = file.path.parts
        # .../<deployment>/<collection>/yyyy/MM/dd/HH/<file>: the capture reader's "variant" is the collection
        deployment = parts[-7] if len(parts) >= 7 and file.variant in (REQUEST, RESPONSE) else ""
        if file.variant in (REQUEST, RESPONSE) or file.hour is None:
            out.append((file.path, deployment))
    return out


def _events(
    source: str | Path | Iterable[str | Path],
    since: float | None,
    until: float | None,
    on_malformed: MalformedCallback | None,
    on_file: Callable[[Path], None] | None,
) -> tuple[dict[str, Event], dict[str, Event]]:
    """The requests and the responses, by ``correlationid``."""
    requests: dict[str, Event] = {}
    responses: dict[str, Event] = {}
    for path, deployment in _collection_files(source, since, until):
        if on_file is not None:
            on_file(path)
        for event in parsed_lines(path, lambda line: parse_event(line, deployment=deployment), on_malformed):  # noqa: B023
            (requests if event.kind == REQUEST else responses)[event.correlation] = event
    return requests, responses


def _records(key: str, request: Event, response: Event | None) -> list[dict[str, Any]]:
    texts = request_texts(request.data)
    try:
        answers = response_answers(response.data) if response is not None else []
    except MalformedRecord:
        answers = []
    status = 200 if response is not None else 0
    return text_records(request_base(request.ts, key, request.deployment, request.path, status), texts, answers)


def read_collected(
    source: str | Path | Iterable[str | Path],
    *,
    since: float | None = None,
    until: float | None = None,
    on_malformed: MalformedCallback | None = None,
    on_file: Callable[[Path], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Request-log records with ``since <= ts < until`` (``ts``: the request's ``time``), each request joined with
    its response by ``correlationid``; oldest first."""
    # A response may be written into the next hour's folder: read one hour past the window for the join.
    late = None if until is None else until + 3600.0
    requests, responses = _events(source, since, late, on_malformed, on_file)
    for key, request in sorted(requests.items(), key=lambda item: item[1].ts):
        if (since is not None and request.ts < since) or (until is not None and request.ts >= until):
            continue
        try:
            yield from _records(key, request, responses.get(key))
        except MalformedRecord as err:
            if on_malformed is not None:
                on_malformed(Path(request.path), 0, f"request {key}: {err}")


def read_collected_window(source: str | Path | Iterable[str | Path], start: float, end: float) -> CaptureWindow:
    """The requests of ``[start, end)`` in Azure ML's collected payloads as a drift window: the same rows as
    :func:`~.inputs.read_window` gives for the request log; malformed lines in ``corrupt_lines``."""
    opened: list[Path] = []

    def read(bad: MalformedCallback) -> Iterable[dict[str, Any]]:
        return read_collected(source, since=start, until=end, on_malformed=bad, on_file=opened.append)

    return window_of(read, start, end, lambda: len(opened))
