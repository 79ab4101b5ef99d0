"""Vertex AI request-response logging rows (its BigQuery table exported to Cloud Storage as JSON) as drift input:
read back as the request-log rows the drift checks take, malformed lines counted, gzip exports and the window."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
from pathlib import Path

import pytest

from airflow_llmops.ml.drift.capture import MalformedRecord, detect_format
from airflow_llmops.ml.drift.inputs import WINDOW_COLUMNS
from airflow_llmops.ml.drift.vertex_log import (
    logging_time,
    read_vertex_log,
    read_vertex_log_window,
    vertex_log_records,
)

T0 = dt.datetime(2026, 11, 29, 4, 0, tzinfo=dt.timezone.utc).timestamp()


def _row(ts: float, instances: list, predictions: list, dmid: str = "456") -> str:
    stamp = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    return json.dumps(
        {
            "endpoint": "projects/p/locations/us-central1/endpoints/123",
            "deployed_model_id": dmid,
            "logging_time": stamp,
            "request_id": "8765",
            "request_payload": [json.dumps(i) for i in instances],
            "response_payload": [json.dumps(p) for p in predictions],
        }
    )


def test_each_instance_is_a_request_log_row_with_its_prediction() -> None:
    records = vertex_log_records(
        _row(
            T0 + 1.5,
            [{"inputs": "do you like pizza?"}, "plain text"],
            [{"label": "food", "score": 0.9}, {"label": "ai"}],
        ),
        variants={"456": "v3"},
    )
    assert [(r["input"], r["output"], r["score"], r["variant"]) for r in records] == [
        ("do you like pizza?", "food", 0.9, "v3"),
        ("plain text", "ai", None, "v3"),
    ]
    assert records[0]["ts"] == pytest.approx(T0 + 1.5) and records[0]["latency_ms"] is None
    assert records[0]["status"] == 200 and records[0]["request_id"] == "8765"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "not JSON"),
        ('{"captureData": {}}', "no request_payload"),
        ('{"request_payload": ["{}"], "logging_time": "2026-11-29 04:00:00 UTC"}', "holds no text"),
        ('{"request_payload": ["\\"hi\\""], "logging_time": "yesterday"}', "not a BigQuery TIMESTAMP"),
        ('{"request_payload": "hi", "logging_time": "2026-11-29 04:00:00 UTC"}', "not a list"),
    ],
)
def test_a_row_that_cannot_be_used_says_why(line: str, reason: str) -> None:
    with pytest.raises(MalformedRecord, match=reason):
        vertex_log_records(line)


def test_logging_time_in_every_form() -> None:
    assert logging_time("2026-11-29 04:00:00 UTC") == T0
    assert logging_time("2026-11-29 04:00:00.25 UTC") == T0 + 0.25
    assert logging_time("2026-11-29T04:00:00Z") == T0
    assert logging_time(T0) == T0


def test_the_window_reads_plain_and_gzip_exports_and_counts_bad_lines(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "000000000000.json").write_text(
        "\n".join(
            [
                _row(T0 - 10, [{"inputs": "before the window"}], [{"label": "x"}]),
                _row(T0 + 10, [{"inputs": "in the window"}], [{"label": "food"}]),
                "{broken",
                "",
            ]
        )
    )
    with gzip.open(export / "000000000001.json.gz", "wt") as handle:
        handle.write(_row(T0 + 20, [{"inputs": "zipped"}], [{"label": "ai"}], dmid="789") + "\n")
    (export / "README.txt").write_text("not an export file")
    window = read_vertex_log_window(export, T0, T0 + 60)
    assert list(window.data.columns) == WINDOW_COLUMNS
    assert list(window.data["input"]) == ["in the window", "zipped"]
    assert list(window.data["variant"]) == ["456", "789"]
    assert (
        window.corrupt_lines == 1 and window.files_read == 2 and "000000000000.json:3" in window.malformed_examples[0]
    )
    assert all(math.isnan(v) for v in window.data["latency_ms"])
    assert len(list(read_vertex_log(export))) == 3
    assert detect_format(export) == "vertex"
