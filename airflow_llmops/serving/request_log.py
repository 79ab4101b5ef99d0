"""The request log: one JSON line per answered input, written by a background thread, rotated by size and age,
pruned by age and total size.

Files are ``requests-<UTC timestamp>.jsonl`` in one folder; names sort in time order, and the timestamp (when the
file was opened) with the file's mtime (its last write) bound the records' times, so :func:`log_files` picks the
files of a time window without opening the others. The drift stage reads them with :func:`read_request_log`.

Record fields: ``ts`` (unix seconds), ``time`` (ISO 8601 UTC), ``request_id``, ``index`` (position of the input
in its request), ``variant``, ``shadow``, ``endpoint``, ``status``, ``latency_ms``, ``input``, ``output`` (label
or generated text), ``score`` (classification), ``tokens_in``, ``tokens_out`` and, for failures, ``error``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO, Any

PREFIX = "requests-"
SUFFIX = ".jsonl"
_STAMP = "%Y%m%dT%H%M%S%fZ"
_STOP = object()
DEFAULT_RETENTION_S = 7 * 86_400.0
DEFAULT_MAX_TOTAL_BYTES = 1024**3
# A record is stamped when its request ends and written a moment later, so the first records of a file can be a
# little older than the file's name says (the queue's delay); a window reads files that start this much after it.
QUEUE_SLACK_S = 300.0
_MTIME_SLACK_S = 2.0  # coarse file-system clocks
_PRUNE_EVERY_S = 600.0
log = logging.getLogger(__name__)


def _file_name(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).strftime(_STAMP)
    return f"{PREFIX}{stamp}{SUFFIX}"


def _name_time(path: Path) -> float | None:
    """When the writer opened the file, from its name; ``None`` for other names (e.g. simulated logs)."""
    stamp = path.name.removeprefix(PREFIX).removesuffix(SUFFIX)
    try:
        return dt.datetime.strptime(stamp, _STAMP).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


def _first_ts(path: Path) -> float | None:
    """The ``ts`` of the file's first readable record (one line read), for files named without a timestamp."""
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                return float(json.loads(line).get("ts", 0))
    return None


def log_files(
    folder: str | Path, *, since: float | None = None, until: float | None = None
) -> list[tuple[Path, float]]:
    """The request-log files that may hold records with ``since <= ts < until``, oldest first, with their start.

    Decided without reading the files: a file last written (mtime) before ``since`` holds only older records, and
    a file opened (its name) after ``until`` holds only newer ones. Only a file named without a timestamp has its
    first line read.
    """
    found: list[tuple[Path, float]] = []
    for path in Path(folder).glob(f"{PREFIX}*{SUFFIX}"):
        try:
            mtime = path.stat().st_mtime
        except OSError:  # deleted by pruning meanwhile
            continue
        if since is not None and mtime < since - _MTIME_SLACK_S:
            continue
        start = _name_time(path)
        if start is None:
            start = _first_ts(path)
            if start is None:
                start = mtime
        elif until is not None and start - QUEUE_SLACK_S >= until:
            continue
        if until is not None and start >= until + QUEUE_SLACK_S:
            continue
        found.append((path, start))
    found.sort(key=lambda item: (item[1], item[0].name))
    return found


def prune_request_log(
    folder: str | Path,
    *,
    retention_s: float = DEFAULT_RETENTION_S,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    now: float | None = None,
    keep: Collection[Path] = (),
) -> list[Path]:
    """Delete request-log files last written more than ``retention_s`` ago, then the oldest ones until the rest
    fit in ``max_total_bytes``; the files in ``keep`` (the one being written) stay. Returns the deleted files."""
    now = time.time() if now is None else now
    files: list[tuple[float, str, Path, int, float]] = []
    for path in Path(folder).glob(f"{PREFIX}*{SUFFIX}"):
        try:
            stat = path.stat()
        except OSError:
            continue
        start = _name_time(path)
        files.append((start if start is not None else stat.st_mtime, path.name, path, stat.st_size, stat.st_mtime))
    files.sort()
    kept = {Path(k) for k in keep}
    deleted: list[Path] = []
    total = sum(size for _, _, _, size, _ in files)
    for _, _, path, size, mtime in files:
        if path in kept:
            continue
        if mtime < now - retention_s or total > max_total_bytes:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            deleted.append(path)
            total -= size
    if deleted:
        log.info("request log: deleted %d old file(s) in %s", len(deleted), folder)
    return deleted


class RequestLogWriter:
    """Appends records from any thread without blocking; a daemon thread writes and rotates the files.

    :param folder: where the ``requests-*.jsonl`` files go (created when missing).
    :param max_bytes: start a new file once the current one reaches this size.
    :param max_age_s: start a new file once the current one is this old.
    :param retention_s: delete files last written longer ago than this (checked at start, at each rotation and
        every few minutes).
    :param max_total_bytes: then delete the oldest files until the folder holds at most this much.
    :param on_drop: called when a record is dropped because the queue is full (the disk cannot keep up).
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        max_age_s: float = 3600.0,
        retention_s: float = DEFAULT_RETENTION_S,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_queue: int = 100_000,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.retention_s = retention_s
        self.max_total_bytes = max_total_bytes
        self._path: Path | None = None
        self._pruned_at = 0.0
        self._on_drop = on_drop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._file: IO[str] | None = None
        self._opened_at = 0.0
        self._size = 0
        self._thread = threading.Thread(target=self._run, name="llmops-request-log", daemon=True)
        self._thread.start()

    def append(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every record appended so far is on disk (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done, timeout=timeout)
        done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    def prune(self, now: float | None = None) -> list[Path]:
        """Apply the retention now (the writer thread does it on its own; tests and tools may call it)."""
        now = time.time() if now is None else now
        self._pruned_at = now
        try:
            return prune_request_log(
                self.folder,
                retention_s=self.retention_s,
                max_total_bytes=self.max_total_bytes,
                now=now,
                keep={self._path} if self._path is not None else (),
            )
        except OSError:  # a pruning failure must not stop the log
            log.exception("request log: pruning %s failed", self.folder)
            return []

    def _rotate_if_due(self, now: float) -> IO[str]:
        if self._file is not None and (self._size >= self.max_bytes or now - self._opened_at >= self.max_age_s):
            self._file.close()
            self._file = None
        if self._file is None:
            path = self.folder / _file_name(now)
            while path.exists():  # two rotations in the same microsecond
                now += 1e-6
                path = self.folder / _file_name(now)
            self._file = path.open("a", encoding="utf-8")
            self._path, self._opened_at, self._size = path, now, 0
            self.prune(now)
        return self._file

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        out = self._rotate_if_due(time.time())
        out.write(line)
        self._size += len(line.encode("utf-8"))

    def _run(self) -> None:
        self.prune()
        while True:
            try:
                item = self._queue.get(timeout=_PRUNE_EVERY_S / 10)
            except queue.Empty:
                item = None
            if time.time() - self._pruned_at >= min(_PRUNE_EVERY_S, self.retention_s / 10):
                self.prune()
            if item is None:
                continue
            if item is _STOP:
                break
            if isinstance(item, threading.Event):
                if self._file is not None:
                    self._file.flush()
                item.set()
                continue
            try:
                self._write(item)
            except (OSError, ValueError, TypeError):  # a full disk or an odd record must not kill the writer
                if self._on_drop is not None:
                    self._on_drop()
            if self._queue.empty() and self._file is not None:
                self._file.flush()
        if self._file is not None:
            self._file.close()


def read_request_log(
    folder: str | Path,
    *,
    since: float | None = None,
    until: float | None = None,
    on_corrupt: Callable[[Path, int], None] | None = None,
    on_file: Callable[[Path], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records with ``since <= ts < until`` (either bound optional) of the ``requests-*.jsonl`` files in
    ``folder``, oldest file first; only the files that can hold such records are opened (see :func:`log_files`).

    A line that is not a JSON object (cut short while the server was writing it, or damaged) is skipped;
    ``on_corrupt(path, line_number)`` is called for each one, so a caller can count them. ``on_file(path)`` is
    called for each file opened.
    """
    for path, _ in log_files(folder, since=since, until=until):
        if on_file is not None:
            on_file(path)
        try:
            handle = path.open(encoding="utf-8", errors="replace")
        except FileNotFoundError:  # pruned since it was listed
            continue
        with handle as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    ts = float(record.get("ts", 0))
                except (ValueError, TypeError, AttributeError):  # not JSON, not an object, or a bad ``ts``
                    if on_corrupt is not None and line.strip():
                        on_corrupt(path, number)
                    continue
                if (since is None or ts >= since) and (until is None or ts < until):
                    yield record
