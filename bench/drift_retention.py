"""Request-log size and drift-window read time over 30 days of traffic, with and without retention.

Simulates a server's request log rotated every hour (``--rows-per-hour`` synthetic classify records per file, named
and time-stamped as the server writes them) for 30 days. With retention on, the server's pruning
(:func:`prune_request_log`, 7 days / 1 GiB by default) runs after every hour, as the writer does at each rotation.
After day 1, 10 and 30 it reads the drift stage's window, the last hour (:func:`read_window`, which opens only the
files overlapping the window), and, for comparison, scans the whole log as the reader did before (every file
opened and parsed, records filtered by time). Prints a table and writes JSON.

    .venv/bin/python bench/drift_retention.py [--rows-per-hour 300] [--days 30] [--checkpoints 1,10,30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from airflow_llmops.ml.drift import read_window
from airflow_llmops.serving.request_log import (
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_RETENTION_S,
    _file_name,
    prune_request_log,
    read_request_log,
)

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0
DAY = 24 * HOUR
SENTENCE = (
    "hello how are you today I would like a pizza with extra cheese what is the price of bread my bank account "
    "balance please tell me a joke about computers the weather is nice and sunny can you help me book a table"
)
WORDS = SENTENCE.split(" ")
LABELS = ("greetings", "food", "money", "ai")


def hour_of_records(start: float, rows: int, rng: random.Random) -> str:
    """One hour of the server's JSONL records, evenly spread over the hour."""
    lines = []
    for i in range(rows):
        ts = start + (i + 0.5) * HOUR / rows
        text = " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))
        record = {
            "ts": ts,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts)),
            "request_id": f"{int(ts * 1000):x}",
            "index": 0,
            "variant": "v1",
            "shadow": False,
            "endpoint": "/v1/classify",
            "status": 200,
            "latency_ms": round(max(1.0, rng.gauss(40, 8)), 3),
            "input": text,
            "output": rng.choice(LABELS),
            "score": round(rng.random(), 6),
            "tokens_in": len(text.split()),
            "tokens_out": 0,
        }
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


def on_disk(folder: Path) -> tuple[int, int]:
    files = list(folder.glob("requests-*.jsonl"))
    return len(files), sum(p.stat().st_size for p in files)


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def full_scan(folder: Path, start: float, end: float) -> int:
    """The reader before: every file opened and parsed, records filtered by time."""
    return sum(1 for r in read_request_log(folder) if start <= float(r["ts"]) < end)


def measure(folder: Path, day: int, retention: bool, end: float, repeats: int) -> dict[str, Any]:
    files, size = on_disk(folder)
    window_s, window = timed(lambda: read_window(folder, end - HOUR, end), repeats)
    scan_s, scanned = timed(lambda: full_scan(folder, end - HOUR, end), max(1, repeats // 3))
    assert scanned == len(window.data), (scanned, len(window.data))
    return {
        "day": day,
        "retention": retention,
        "files": files,
        "bytes": size,
        "window_rows": len(window.data),
        "window_files_read": window.files_read,
        "window_read_s": round(window_s, 4),
        "full_scan_s": round(scan_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-hour", type=int, default=300)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--checkpoints", default="1,10,30")
    parser.add_argument("--retention-s", type=float, default=DEFAULT_RETENTION_S)
    parser.add_argument("--max-total-bytes", type=int, default=DEFAULT_MAX_TOTAL_BYTES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "drift_retention.json")
    args = parser.parse_args()
    checkpoints = {int(d) for d in args.checkpoints.split(",") if d}
    rng = random.Random(0)
    first = time.time() - args.days * DAY  # the log ends now, so nothing depends on the clock beyond this
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-drift-retention-") as tmp:
        kept, unbounded = Path(tmp) / "retention-on", Path(tmp) / "retention-off"
        kept.mkdir()
        unbounded.mkdir()
        for hour in range(args.days * 24):
            start = first + hour * HOUR
            end = start + HOUR
            text = hour_of_records(start, args.rows_per_hour, rng)
            for folder in (kept, unbounded):
                path = folder / _file_name(start)
                path.write_text(text, encoding="utf-8")
                os.utime(path, (end - 1, end - 1))  # the last write, at the end of the hour
            prune_request_log(kept, retention_s=args.retention_s, max_total_bytes=args.max_total_bytes, now=end)
            day = (hour + 1) // 24
            if (hour + 1) % 24 == 0 and day in checkpoints:
                for folder, retention in ((kept, True), (unbounded, False)):
                    rows.append(measure(folder, day, retention, end, args.repeats))
                    print(f"day {day:>2} retention {'on ' if retention else 'off'} measured", file=sys.stderr)
    print(
        f"\n{'day':>4} {'retention':>9} {'files':>6} {'MB on disk':>10} {'window rows':>11} {'files read':>10}"
        f" {'window read s':>13} {'full scan s':>11}"
    )
    for row in rows:
        print(
            f"{row['day']:>4} {'on' if row['retention'] else 'off':>9} {row['files']:>6} "
            f"{row['bytes'] / 1e6:>10.1f} {row['window_rows']:>11} {row['window_files_read']:>10} "
            f"{row['window_read_s']:>13.4f} {row['full_scan_s']:>11.3f}"
        )
    results = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {
            "rows_per_hour": args.rows_per_hour,
            "days": args.days,
            "rotation_s": HOUR,
            "retention_s": args.retention_s,
            "max_total_bytes": args.max_total_bytes,
            "window_s": HOUR,
            "repeats": args.repeats,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
