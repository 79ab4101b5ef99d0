"""SageMaker Data Capture as the live traffic of a drift check.

A SageMaker endpoint with Data Capture writes JSON Lines files under
``<DestinationS3Uri>/<endpoint>/<variant>/yyyy/mm/dd/hh/<name>.jsonl`` (UTC hours), one line per request::

    {"captureData": {"endpointInput": {"observedContentType": "application/json", "mode": "INPUT",
                                       "data": "{\\"inputs\\": \\"hi\\"}", "encoding": "JSON"},
                     "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                        "data": "eyJ2YXJpYW50Ijog...", "encoding": "BASE64"}},
     "eventMetadata": {"eventId": "0e4f...", "inferenceTime": "2026-11-29T04:00:00Z"}, "eventVersion": "0"}

:func:`read_capture` turns each text of a request into the record the model server's own request log holds
(:mod:`airflow_llmops.serving.request_log`), and :func:`read_capture_window` into the :class:`~.inputs.Window`
that :func:`~.checks.compute_drift` reads, so the same checks run on either. What Data Capture does not record is
left out: ``latency_ms`` is ``None`` (NaN in the window: the latency check is skipped), ``status`` is 200 (SageMaker
captures answered requests).

Bodies: ``encoding`` ``JSON`` or ``CSV`` hold the text, ``BASE64`` the bytes; ``observedContentType`` says how to
read them (JSON, CSV: one input per line, anything else: one text). Inputs are ``{"inputs": ...}`` (also
``prompt`` or ``text``), a string or a list of strings; outputs are what ``/invocations`` answers (``results``
labels of a classifier, ``choices`` texts of a causal LM) or the Hugging Face shapes (``[{"label": ...}]``,
``[{"generated_text": ...}]``), ``{"predictions": [...]}``, or plain strings.

A line that cannot be used (not JSON, no input, an undecodable body, no ``inferenceTime``) is skipped and
counted, never dropped silently: ``on_malformed`` hears of each one and the window's ``corrupt_lines`` holds the
count.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from airflow_llmops.ml.drift.inputs import WINDOW_COLUMNS, Window, window_row

SUFFIX = ".jsonl"
HOUR_S = 3600.0
#: SageMaker writes a record into the hour folder of when it flushed the file, a few minutes after the request
#: at most; a window reads the folders that start up to this long after it ends.
FILE_LAG_S = 3600.0
ENDPOINT = "/invocations"
_DIGITS = (re.compile(r"^\d{4}$"), re.compile(r"^\d{2}$"), re.compile(r"^\d{2}$"), re.compile(r"^\d{2}$"))
_FRACTION = re.compile(r"(\.\d+)")

MalformedCallback = Callable[[Path, int, str], None]
T = TypeVar("T")


class MalformedRecord(ValueError):
    """A Data Capture line that cannot be turned into request-log records; the message says why."""


@dataclass(frozen=True)
class CaptureFile:
    """One Data Capture file, with the variant and the UTC hour its folders name (``None`` where they do not)."""

    path: Path
    variant: str
    hour: float | None


def _hour_of(parts: tuple[str, ...]) -> tuple[int, float] | None:
    """(index of ``yyyy``, hour start) when ``parts`` end with ``yyyy/mm/dd/hh/<file>``."""
    if len(parts) < 5:
        return None
    year, month, day, hour = parts[-5:-1]
    if not all(p.match(v) for p, v in zip(_DIGITS, (year, month, day, hour), strict=True)):
        return None
    try:
        start = dt.datetime(int(year), int(month), int(day), int(hour), tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return len(parts) - 5, start.timestamp()


def _describe(path: Path, parts: tuple[str, ...], default_variant: str) -> CaptureFile:
    found = _hour_of(parts)
    if found is None:
        return CaptureFile(path, default_variant, None)
    at, hour = found
    return CaptureFile(path, parts[at - 1] if at > 0 else default_variant, hour)


def _in_window(file: CaptureFile, since: float | None, until: float | None) -> bool:
    """Whether the file's hour folder may hold records with ``since <= inferenceTime < until``."""
    if file.hour is None:
        return True
    if until is not None and file.hour - FILE_LAG_S >= until:
        return False
    return not (since is not None and file.hour + HOUR_S <= since)


def capture_files(
    source: str | Path | Iterable[str | Path],
    *,
    since: float | None = None,
    until: float | None = None,
    variant: str | None = None,
) -> list[CaptureFile]:
    """The Data Capture files of ``source`` whose hour folders may hold records of ``[since, until)``.

    ``source`` is a local folder (an endpoint's: ``<variant>/yyyy/mm/dd/hh/*.jsonl``, a variant's:
    ``yyyy/mm/dd/hh/*.jsonl``, or any folder of ``*.jsonl`` files) or an iterable of files. The variant is the
    folder above ``yyyy``; for a variant's own folder (and files without the hour folders) it is ``variant``,
    by default the folder's name.
    """
    found: list[CaptureFile] = []
    if isinstance(source, (str, Path)):
        root = Path(str(source).removeprefix("file://"))
        if not root.is_dir():
            return []
        default = variant if variant is not None else root.name
        for path in root.rglob(f"*{SUFFIX}"):
            if path.is_file():
                found.append(_describe(path, path.relative_to(root).parts, default))
    else:
        for item in source:
            path = Path(str(item).removeprefix("file://"))
            found.append(_describe(path, path.parts, variant or ""))
    kept = [f for f in found if _in_window(f, since, until)]
    return sorted(kept, key=lambda f: (f.hour or 0.0, f.variant, str(f.path)))


def hour_prefixes(start: float, end: float) -> list[str]:
    """``yyyy/mm/dd/hh`` of every hour folder that may hold records of ``[start, end)`` (to stage only those)."""
    first = int(start // HOUR_S) * HOUR_S
    prefixes = []
    hour = first
    while hour < end + FILE_LAG_S:
        prefixes.append(dt.datetime.fromtimestamp(hour, tz=dt.timezone.utc).strftime("%Y/%m/%d/%H"))
        hour += HOUR_S
    return prefixes


def parse_time(text: Any) -> float:
    """``inferenceTime`` (ISO 8601, ``Z`` or an offset, any number of fraction digits) as unix seconds."""
    if not isinstance(text, str) or not text:
        raise MalformedRecord(f"eventMetadata.inferenceTime is {text!r}, not an ISO 8601 time")
    value = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    value = _FRACTION.sub(lambda m: m.group(1)[:7].ljust(7, "0"), value, count=1)  # Python 3.10: 3 or 6 digits
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise MalformedRecord(f"eventMetadata.inferenceTime {text!r} is not an ISO 8601 time") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


def _csv_lines(text: str) -> list[str]:
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    return [row[0] if len(row) == 1 else ",".join(row) for row in rows]


def decode_body(part: Mapping[str, Any], what: str) -> Any:
    """The body of ``endpointInput`` or ``endpointOutput``: a JSON value, a list of CSV lines, or a text."""
    data = part.get("data")
    encoding = str(part.get("encoding") or "JSON").upper()
    content_type = str(part.get("observedContentType") or "").lower()
    if encoding == "BASE64":
        if not isinstance(data, str):
            raise MalformedRecord(f"{what}.data is not a base64 string")
        try:
            text = base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as err:
            raise MalformedRecord(f"{what}.data is not base64 of UTF-8 text: {err}") from None
    elif isinstance(data, str):
        text = data
    elif data is not None and encoding == "JSON":
        return data  # already a JSON value
    else:
        raise MalformedRecord(f"{what} has no data")
    if encoding == "CSV" or "csv" in content_type:
        return _csv_lines(text)
    if encoding == "JSON" or "json" in content_type:
        try:
            return json.loads(text)
        except ValueError as err:
            raise MalformedRecord(f"{what}.data is not valid JSON: {err}") from None
    return text


def request_texts(body: Any) -> list[str]:
    """The texts of a request body (see the module docstring for the shapes)."""
    if isinstance(body, str):
        return [body]
    if isinstance(body, list) and body and all(isinstance(item, str) for item in body):
        return list(body)
    if isinstance(body, dict):
        for key in ("inputs", "prompt", "text"):
            if key in body and not isinstance(body[key], dict):
                return request_texts(body[key])
    raise MalformedRecord("the request body holds no text (expected {'inputs': ...}, a string or a list of them)")


def _answer(item: Any) -> tuple[Any, float | None]:
    """(label or generated text, score) of one answer."""
    if isinstance(item, list) and item:  # a pipeline's top-k list: the first is the best
        item = item[0]
    if isinstance(item, dict):
        message = item.get("message")
        for value in (
            item.get("label"),
            item.get("generated_text"),
            item.get("text"),
            message.get("content") if isinstance(message, dict) else None,
        ):
            if value is not None:
                score = item.get("score")
                return value, float(score) if isinstance(score, (int, float)) else None
        return None, None
    return item, None


def response_answers(body: Any) -> list[tuple[Any, float | None]]:
    """One (output, score) per input, in order, of a response body; empty when it holds none."""
    if body is None:
        return []
    if isinstance(body, dict):
        if isinstance(body.get("results"), list):
            items = body["results"]
        elif isinstance(body.get("choices"), list):
            choices = [c for c in body["choices"] if isinstance(c, dict)]
            items = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
        elif isinstance(body.get("predictions"), list):
            items = body["predictions"]
        else:
            items = [body]
    elif isinstance(body, list):
        items = body
    else:
        items = [body]
    return [_answer(item) for item in items]


def text_records(
    base: Mapping[str, Any], texts: list[str], answers: list[tuple[Any, float | None]]
) -> list[dict[str, Any]]:
    """One request-log record per input text of a request (``base``: its time, id, variant, status...), each with
    its answer (output, score) where the response had one."""
    out = []
    for i, text in enumerate(texts):
        output, score = answers[i] if i < len(answers) else (None, None)
        out.append({**base, "index": i, "input": text, "output": output, "score": score})
    return out


def request_base(ts: float, request_id: str, variant: str, endpoint: str, status: int = 200) -> dict[str, Any]:
    """The fields every record of one captured request shares (no latency: the platforms' captures have none)."""
    return {
        "ts": ts,
        "time": dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(),
        "request_id": request_id,
        "variant": variant,
        "shadow": False,
        "endpoint": endpoint,
        "status": status,
        "latency_ms": None,
    }


def open_text(path: Path) -> Any:
    """A capture file as text (gzip when its name ends in ``.gz``), undecodable bytes replaced."""
    import gzip

    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def parsed_lines(
    path: Path,
    parse: Callable[[str], T],
    on_malformed: MalformedCallback | None,
) -> Iterator[T]:
    """``parse(line)`` of each non-empty line of ``path`` (:func:`open_text`; a missing file: nothing); a line it
    refuses with :class:`MalformedRecord` goes to ``on_malformed(path, line_number, reason)`` and is skipped."""
    try:
        handle = open_text(path)
    except FileNotFoundError:
        return
    with handle as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield parse(line)
            except MalformedRecord as err:
                if on_malformed is not None:
                    on_malformed(path, number, str(err))


def window_of(
    read: Callable[[MalformedCallback], Iterable[dict[str, Any]]], start: float, end: float, files: Callable[[], int]
) -> CaptureWindow:
    """A drift window of the records ``read(on_malformed)`` yields; the malformed lines counted with their reasons,
    ``files()`` (asked after reading) the files read."""
    import pandas as pd

    malformed: list[str] = []

    def bad(path: Path, line: int, reason: str) -> None:
        malformed.append(f"{path.name}:{line}: {reason}")

    rows = [window_row(record) for record in read(bad)]
    return CaptureWindow(
        data=pd.DataFrame(rows, columns=WINDOW_COLUMNS),
        start=start,
        end=end,
        corrupt_lines=len(malformed),
        files_read=files(),
        malformed_examples=tuple(malformed[:5]),
    )


def capture_records(line: str, *, variant: str) -> list[dict[str, Any]]:
    """The request-log records of one Data Capture line (one per input text).

    :raises MalformedRecord: the line cannot be used; the message says why.
    """
    try:
        record = json.loads(line)
    except ValueError as err:
        raise MalformedRecord(f"not JSON: {err}") from None
    capture = record.get("captureData") if isinstance(record, dict) else None
    if not isinstance(capture, dict) or not isinstance(capture.get("endpointInput"), dict):
        raise MalformedRecord("no captureData.endpointInput")
    request = capture["endpointInput"]
    meta = record.get("eventMetadata") if isinstance(record.get("eventMetadata"), dict) else {}
    ts = parse_time(meta.get("inferenceTime"))
    texts = request_texts(decode_body(request, "endpointInput"))
    answers: list[tuple[Any, float | None]] = []
    response = capture.get("endpointOutput")
    if isinstance(response, dict):
        try:
            answers = response_answers(decode_body(response, "endpointOutput"))
        except MalformedRecord:
            answers = []  # the inputs still count for the input checks; the prediction check sees no output
    request_id = str(meta.get("eventId") or meta.get("inferenceId") or "")
    return text_records(request_base(ts, request_id, variant, ENDPOINT), texts, answers)


def read_capture(
    source: str | Path | Iterable[str | Path],
    *,
    since: float | None = None,
    until: float | None = None,
    variant: str | None = None,
    on_malformed: MalformedCallback | None = None,
    on_file: Callable[[CaptureFile], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Request-log records with ``since <= ts < until`` (``ts`` = ``inferenceTime``) of the Data Capture files of
    ``source`` (see :func:`capture_files`), oldest hour first. ``on_malformed(path, line_number, reason)`` is
    called for each line skipped; ``on_file`` for each file opened."""
    for file in capture_files(source, since=since, until=until, variant=variant):
        if on_file is not None:
            on_file(file)
        for records in parsed_lines(file.path, lambda line: capture_records(line, variant=file.variant), on_malformed):  # noqa: B023
            for record in records:
                if (since is None or record["ts"] >= since) and (until is None or record["ts"] < until):
                    yield record


@dataclass
class CaptureWindow(Window):
    """A :class:`~.inputs.Window` read from Data Capture, with the reasons of the first malformed lines."""

    malformed_examples: tuple[str, ...] = ()


def read_capture_window(
    source: str | Path | Iterable[str | Path], start: float, end: float, *, variant: str | None = None
) -> CaptureWindow:
    """The requests of ``[start, end)`` in Data Capture files as a drift window: the same rows as
    :func:`~.inputs.read_window` gives for the request log; malformed lines in ``corrupt_lines``."""
    opened: list[CaptureFile] = []

    def read(bad: MalformedCallback) -> Iterable[dict[str, Any]]:
        return read_capture(source, since=start, until=end, variant=variant, on_malformed=bad, on_file=opened.append)

    return window_of(read, start, end, lambda: len(opened))


def detect_format(folder: str | Path) -> str:
    """Which platform's capture a local folder holds, by the first non-empty line of its first JSON file:
    ``azureml`` (an ``azureml.inference.*`` event), ``vertex`` (a request-response logging row) or ``sagemaker``
    (Data Capture, and the default)."""
    root = Path(str(folder).removeprefix("file://"))
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".json" in p.name) if root.is_dir() else [root]
    for path in files:
        with open_text(path) as lines:
            for line in lines:
                if not line.strip():
                    continue
                if '"azureml.inference.' in line:
                    return "azureml"
                return "vertex" if '"request_payload"' in line else "sagemaker"
    return "sagemaker"
