"""SageMaker Data Capture files as drift input: real files in SageMaker's layout and line format, read back as the
request-log rows the drift checks take."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import pytest

from airflow_llmops.ml.drift.capture import (
    capture_files,
    hour_prefixes,
    parse_time,
    read_capture,
    read_capture_window,
)
from airflow_llmops.ml.drift.inputs import WINDOW_COLUMNS

T0 = dt.datetime(2026, 11, 29, 4, 0, tzinfo=dt.timezone.utc).timestamp()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _part(body: Any, mode: str, *, encoding: str = "JSON", content_type: str = "application/json") -> dict:
    raw = body if isinstance(body, str) and "json" not in content_type else json.dumps(body)
    data = base64.b64encode(raw.encode()).decode() if encoding == "BASE64" else raw
    return {"observedContentType": content_type, "mode": mode, "data": data, "encoding": encoding}


def _line(ts: float, request: Any, response: Any = None, *, event: str = "e", **kw: Any) -> str:
    capture = {"endpointInput": _part(request, "INPUT", **kw.get("input", {}))}
    if response is not None:
        capture["endpointOutput"] = _part(response, "OUTPUT", **kw.get("output", {}))
    record = {
        "captureData": capture,
        "eventMetadata": {"eventId": event, "inferenceTime": _iso(ts)},
        "eventVersion": "0",
    }
    return json.dumps(record)


def _classified(*labels: str) -> dict:
    """What our /invocations answers for a classifier (the /v1/classify body)."""
    results = [{"label": label, "score": 0.9, "scores": {label: 0.9}} for label in labels]
    return {"variant": "model", "results": results, "usage": {"prompt_tokens": 3}}


def _write(folder: Path, variant: str, ts: float, lines: list[str], name: str = "part") -> Path:
    hour = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y/%m/%d/%H")
    path = folder / variant / hour / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.writelines(line + "\n" for line in lines)
    return path


@pytest.fixture
def endpoint(tmp_path: Path) -> Path:
    """An endpoint's capture folder: two variants, three hours, JSON and BASE64 bodies, a few broken lines."""
    root = tmp_path / "capture" / "chatterbot-topics"
    _write(
        root,
        "AllTraffic",
        T0 + 60,
        [
            _line(T0 + 60, {"inputs": "do you like pizza?"}, _classified("food"), event="a1"),
            _line(
                T0 + 120,
                {"inputs": ["hello there", "how much money"]},
                _classified("greetings", "money"),
                event="a2",
                input={"encoding": "BASE64"},
                output={"encoding": "BASE64"},
            ),
            "{not json",
            json.dumps({"captureData": {}, "eventMetadata": {"inferenceTime": _iso(T0)}}),
            _line(T0 + 180, "a bare string", None, event="a3"),
            "",
        ],
    )
    _write(
        root,
        "AllTraffic",
        T0 + 3600 + 30,
        [
            _line(T0 + 3630, {"inputs": "what is ai"}, _classified("ai"), event="b1"),
            # A broken base64 body and a record without a time: skipped, counted.
            json.dumps(
                {
                    "captureData": {"endpointInput": {"data": "%%%", "encoding": "BASE64"}},
                    "eventMetadata": {"inferenceTime": _iso(T0 + 3640)},
                }
            ),
            json.dumps({"captureData": {"endpointInput": _part({"inputs": "x"}, "INPUT")}, "eventMetadata": {}}),
        ],
    )
    _write(root, "AllTraffic", T0 - 7200, [_line(T0 - 7200, {"inputs": "old traffic"}, _classified("ai"))])
    _write(
        root,
        "Canary",
        T0 + 90,
        [
            _line(
                T0 + 90,
                "text sent as csv,with a comma\nsecond line",
                "food\nmoney",
                input={"encoding": "CSV", "content_type": "text/csv"},
                output={"encoding": "CSV", "content_type": "text/csv"},
            ),
            _line(
                T0 + 95,
                {"inputs": "tell me a joke"},
                {"id": "cmpl-1", "choices": [{"index": 0, "text": " why did", "finish_reason": "length"}]},
            ),
        ],
    )
    return root


def test_records_are_the_request_logs_rows_for_every_body_encoding(endpoint: Path) -> None:
    bad: list[tuple[str, int, str]] = []
    records = list(
        read_capture(
            endpoint, since=T0, until=T0 + 2 * 3600, on_malformed=lambda p, n, why: bad.append((p.name, n, why))
        )
    )
    by_input = {r["input"]: r for r in records}
    assert set(by_input) == {
        "do you like pizza?",
        "hello there",
        "how much money",
        "a bare string",
        "what is ai",
        "text sent as csv,with a comma",
        "second line",
        "tell me a joke",
    }
    pizza = by_input["do you like pizza?"]
    assert pizza["ts"] == pytest.approx(T0 + 60) and pizza["time"].startswith("2026-11-29T04:01:00")
    assert (pizza["variant"], pizza["output"], pizza["score"], pizza["request_id"]) == ("AllTraffic", "food", 0.9, "a1")
    assert (pizza["status"], pizza["latency_ms"], pizza["shadow"], pizza["endpoint"]) == (
        200,
        None,
        False,
        "/invocations",
    )
    # Base64 bodies decode; a request of two texts is two rows, each with its own answer and position.
    assert [(by_input[t]["output"], by_input[t]["index"]) for t in ("hello there", "how much money")] == [
        ("greetings", 0),
        ("money", 1),
    ]
    assert by_input["a bare string"]["output"] is None  # no endpointOutput captured
    assert by_input["second line"]["variant"] == "Canary" and by_input["second line"]["output"] == "money"
    assert by_input["tell me a joke"]["output"] == " why did"  # a causal LM's completion
    # Every unusable line is reported with its file, line number and reason; blank lines are not.
    assert [(name, n) for name, n, _ in bad] == [
        ("part.jsonl", 3),
        ("part.jsonl", 4),
        ("part.jsonl", 2),
        ("part.jsonl", 3),
    ]
    reasons = " | ".join(why for _, _, why in bad)
    assert "not JSON" in reasons and "no captureData.endpointInput" in reasons
    assert "not base64" in reasons and "inferenceTime is None" in reasons


def test_the_window_filter_reads_only_the_hours_that_can_hold_it(endpoint: Path) -> None:
    window = read_capture_window(endpoint, T0, T0 + 3600)
    assert list(window.data.columns) == WINDOW_COLUMNS
    assert sorted(window.data["input"]) == sorted(
        [
            "do you like pizza?",
            "hello there",
            "how much money",
            "a bare string",
            "text sent as csv,with a comma",
            "second line",
            "tell me a joke",
        ]
    )
    assert window.data["latency_ms"].map(math.isnan).all()  # Data Capture has no latency: NaN, as the checks allow
    assert set(window.data["status"]) == {200}
    # The hour before (04:00-05:00 window): the 02:00 folder is never opened; 04:00 and 05:00 (late files) are.
    assert window.files_read == 3  # AllTraffic 04h and 05h, Canary 04h
    assert window.corrupt_lines == 4 and len(window.malformed_examples) == 4
    # Records outside the window inside an opened folder are filtered by their inferenceTime.
    later = read_capture_window(endpoint, T0 + 3600, T0 + 7200)
    assert list(later.data["input"]) == ["what is ai"]
    assert read_capture_window(endpoint, T0 - 7200, T0 - 3600).data["input"].tolist() == ["old traffic"]
    assert read_capture_window(endpoint, T0 + 86_400, T0 + 90_000).data.empty


def test_a_variants_folder_and_a_list_of_files_work_too(endpoint: Path, tmp_path: Path) -> None:
    canary = read_capture_window(endpoint / "Canary", T0, T0 + 3600)
    assert set(canary.data["variant"]) == {"Canary"} and len(canary.data) == 3
    files = [f.path for f in capture_files(endpoint, since=T0, until=T0 + 3600)]
    assert len(files) == 3
    from_files = read_capture_window(files, T0, T0 + 3600)
    assert sorted(from_files.data["input"]) == sorted(read_capture_window(endpoint, T0, T0 + 3600).data["input"])
    assert set(from_files.data["variant"]) == {"AllTraffic", "Canary"}  # the folder above yyyy/mm/dd/hh
    # A flat folder of capture files (no hour folders): filtered by inferenceTime alone, variant from its name.
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.jsonl").write_text(_line(T0 + 10, {"inputs": "flat"}, _classified("ai")) + "\n")
    assert read_capture_window(flat, T0, T0 + 60).data[["input", "variant"]].values.tolist() == [["flat", "flat"]]
    assert read_capture_window(tmp_path / "missing", T0, T0 + 60).data.empty


def test_hour_prefixes_cover_the_window_and_late_files() -> None:
    assert hour_prefixes(T0 + 1800, T0 + 3600) == ["2026/11/29/04", "2026/11/29/05"]
    assert hour_prefixes(T0 - 60, T0 + 60) == ["2026/11/29/03", "2026/11/29/04", "2026/11/29/05"]


def test_inference_times_in_every_iso_form() -> None:
    assert parse_time("2026-11-29T04:00:00Z") == T0
    assert parse_time("2026-11-29T04:00:00.123456789Z") == pytest.approx(T0 + 0.123456)
    assert parse_time("2026-11-29T06:00:00.5+02:00") == pytest.approx(T0 + 0.5)
    assert parse_time("2026-11-29T04:00:00") == T0  # no zone: UTC, as SageMaker writes
