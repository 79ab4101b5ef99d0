"""Request-log retention (old and oversized logs are deleted) and time-window reads that open only the files whose
time range overlaps the window."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from airflow_llmops.ml.drift import read_window
from airflow_llmops.ml.drift.inputs import simulated_records, write_request_log
from airflow_llmops.serving.request_log import (
    RequestLogWriter,
    _file_name,
    log_files,
    prune_request_log,
    read_request_log,
)

HOUR = 3600.0


def hourly_log(folder: Path, hours: int, *, end: float, rows: int = 5, lie: bool = False) -> list[Path]:
    """``hours`` files as the server rotates them (named by their start, mtime at their last record).

    With ``lie``, every file holds records stamped in the last hour: a reader that opens a file outside the window
    would return them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for h in range(hours):
        start = end - (hours - h) * HOUR
        path = folder / _file_name(start)
        stamps = [start + i * HOUR / rows for i in range(rows)]
        if lie and h < hours - 1:
            stamps = [end - HOUR / 2] * rows
        path.write_text("".join(json.dumps({"ts": ts, "input": f"h{h}", "status": 200}) + "\n" for ts in stamps))
        os.utime(path, (start + HOUR - 10, start + HOUR - 10))
        paths.append(path)
    return paths


def test_a_one_hour_window_opens_only_the_files_of_that_hour(tmp_path: Path) -> None:
    end = time.time()
    paths = hourly_log(tmp_path / "log", 72, end=end, lie=True)
    opened: list[Path] = []
    records = list(read_request_log(tmp_path / "log", since=end - HOUR, until=end, on_file=opened.append))
    # The last file is the last hour; its neighbour is opened only when its mtime reaches into the window.
    assert opened == [paths[-1]]
    assert {r["input"] for r in records} == {"h71"}, "a file outside the window was read"
    window = read_window(tmp_path / "log", end - HOUR, end)
    assert window.files_read == 1 and len(window.data) == 5 and set(window.data["input"]) == {"h71"}
    # A window in the middle: its hour's file, and the next one (it may start with records queued a bit earlier).
    mid = end - 30 * HOUR
    assert [p for p, _ in log_files(tmp_path / "log", since=mid - HOUR, until=mid)] == paths[41:43]


def test_window_reads_stay_correct_for_files_named_without_a_timestamp(tmp_path: Path) -> None:
    end = time.time()
    texts = [f"text {i}" for i in range(20)]
    write_request_log(tmp_path, simulated_records(texts, ["a"] * 20, start=end - HOUR, end=end), name="sim")
    hourly_log(tmp_path, 3, end=end - HOUR)  # older, rotated files
    window = read_window(tmp_path, end - HOUR, end + 1)
    assert len(window.data) == 20 and window.files_read == 1
    assert len(list(read_request_log(tmp_path))) == 20 + 15


def test_pruning_deletes_files_past_retention_then_the_oldest_beyond_the_size_budget(tmp_path: Path) -> None:
    end = time.time()
    paths = hourly_log(tmp_path, 48, end=end)
    deleted = prune_request_log(tmp_path, retention_s=24 * HOUR, max_total_bytes=10**9, now=end)
    assert sorted(deleted) == paths[:24] and sorted(tmp_path.glob("requests-*")) == paths[24:]
    size = paths[-1].stat().st_size
    deleted = prune_request_log(tmp_path, retention_s=24 * HOUR, max_total_bytes=10 * size, now=end, keep={paths[30]})
    assert sorted(tmp_path.glob("requests-*")) == [paths[30], *paths[-9:]]  # the kept file stays, the newest fit


def test_the_writer_prunes_at_start_and_keeps_the_file_it_writes(tmp_path: Path) -> None:
    end = time.time()
    old = hourly_log(tmp_path, 10, end=end - 5 * 24 * HOUR)
    recent = hourly_log(tmp_path, 2, end=end)
    writer = RequestLogWriter(tmp_path, retention_s=3 * 24 * HOUR, max_total_bytes=1024)
    writer.append({"ts": time.time(), "input": "x" * 2000})
    writer.flush()
    assert set(recent) <= set(tmp_path.glob("requests-*")), "within the budget at start"
    writer.prune()  # the writer thread also does this every few minutes and at each rotation
    writer.close()
    left = sorted(tmp_path.glob("requests-*"))
    assert not set(old) & set(left), "files past retention are deleted"
    assert len(left) == 1 and left[0] not in recent, "the current file stays even when it alone exceeds the budget"
