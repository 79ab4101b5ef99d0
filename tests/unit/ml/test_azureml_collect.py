"""Azure ML data collection (payload logging) as drift input: request and response collections in Azure's folder
layout, joined by correlationid into the request-log rows the drift checks take; bad lines counted with reasons."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

from airflow_llmops.ml.drift.azureml_collect import parse_event, read_collected, read_collected_window
from airflow_llmops.ml.drift.capture import MalformedRecord, detect_format
from airflow_llmops.ml.drift.inputs import WINDOW_COLUMNS

T0 = dt.datetime(2026, 11, 29, 8, 0, tzinfo=dt.timezone.utc).timestamp()
SOURCE = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws"


def _event(kind: str, ts: float, key: str, data: object, deployment: str = "v3-ab12") -> str:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": f"{kind}-{key}",
            "source": f"{SOURCE}/onlineEndpoints/topics/deployments/{deployment}",
            "type": f"azureml.inference.{kind}",
            "datacontenttype": "application/json",
            "time": dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": data,
            "path": "/invocations",
            "method": "POST",
            "correlationid": key,
        }
    )


def _write(root: Path, deployment: str, collection: str, ts: float, lines: list[str]) -> None:
    hour = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y/%m/%d/%H")
    folder = root / deployment / collection / hour
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "instance-1.jsonl").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


@pytest.fixture
def endpoint(tmp_path: Path) -> Path:
    root = tmp_path / "modelDataCollector" / "topics"
    _write(
        root,
        "v3-ab12",
        "request",
        T0 + 10,
        [
            _event("request", T0 + 10, "a", {"inputs": ["do you like pizza?", "what is ai?"]}),
            _event("request", T0 + 3590, "b", {"inputs": "late answer"}),
            _event("request", T0 - 60, "old", {"inputs": "before the window"}),
            "{not json",
            json.dumps({"type": "azureml.inference.request", "datainblob": "true", "correlationid": "c", "time": "x"}),
        ],
    )
    _write(
        root,
        "v3-ab12",
        "response",
        T0 + 10,
        [_event("response", T0 + 11, "a", {"results": [{"label": "food", "score": 0.8}, {"label": "ai"}]})],
    )
    # b's answer lands in the next hour's folder
    _write(root, "v3-ab12", "response", T0 + 3601, [_event("response", T0 + 3601, "b", {"results": [{"label": "x"}]})])
    _write(root, "v4-cd34", "request", T0 + 20, [_event("request", T0 + 20, "d", {"inputs": "unanswered"}, "v4-cd34")])
    return root


def test_requests_are_joined_with_their_responses_into_request_log_rows(endpoint: Path) -> None:
    rows = list(read_collected(endpoint, since=T0, until=T0 + 3600))
    assert [(r["input"], r["output"], r["variant"], r["status"]) for r in rows] == [
        ("do you like pizza?", "food", "v3-ab12", 200),
        ("what is ai?", "ai", "v3-ab12", 200),
        ("unanswered", None, "v4-cd34", 0),
        ("late answer", "x", "v3-ab12", 200),  # its response was read from the next hour's folder
    ]
    assert rows[0]["score"] == 0.8 and rows[0]["latency_ms"] is None and rows[0]["request_id"] == "a"


def test_the_window_counts_the_lines_it_cannot_use(endpoint: Path) -> None:
    window = read_collected_window(endpoint, T0, T0 + 3600)
    assert list(window.data.columns) == WINDOW_COLUMNS and len(window.data) == 4
    assert window.corrupt_lines == 2, window.malformed_examples
    assert any("datainblob" in m for m in window.malformed_examples)
    assert all(math.isnan(v) for v in window.data["latency_ms"])
    # A deployment's folder works too
    assert len(read_collected_window(endpoint / "v4-cd34", T0, T0 + 3600).data) == 1
    assert detect_format(endpoint) == "azureml"


def test_an_event_that_is_not_a_payload_says_why() -> None:
    with pytest.raises(MalformedRecord, match=r"not azureml\.inference"):
        parse_event(json.dumps({"type": "custom.log", "correlationid": "x", "time": "2026-11-29T08:00:00Z"}))
    with pytest.raises(MalformedRecord, match="no correlationid"):
        parse_event(json.dumps({"type": "azureml.inference.request", "time": "2026-11-29T08:00:00Z"}))
