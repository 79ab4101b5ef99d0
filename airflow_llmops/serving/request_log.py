"""The request log: one JSON line per answered input, written by a background thread, rotated by size and age.

Files are ``requests-<UTC timestamp>.jsonl`` in one folder; names sort in time order. The drift stage reads them
with :func:`read_request_log`. Record fields: ``ts`` (unix seconds), ``time`` (ISO 8601 UTC), ``request_id``,
``index`` (position of the input in its request), ``variant``, ``shadow``, ``endpoint``, ``status``,
``latency_ms``, ``input``, ``output`` (label or generated text), ``score`` (classification), ``tokens_in``,
``tokens_out`` and, for failures, ``error``.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PREFIX = "requests-"
SUFFIX = ".jsonl"
_STOP = object()


def _file_name(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{PREFIX}{stamp}{SUFFIX}"


class RequestLogWriter:
    """Appends records from any thread without blocking; a daemon thread writes and rotates the files.

    :param folder: where the ``requests-*.jsonl`` files go (created when missing).
    :param max_bytes: start a new file once the current one reaches this size.
    :param max_age_s: start a new file once the current one is this old.
    :param on_drop: called when a record is dropped because the queue is full (the disk cannot keep up).
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        max_age_s: float = 3600.0,
        max_queue: int = 100_000,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
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
            self._opened_at, self._size = now, 0
        return self._file

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        out = self._rotate_if_due(time.time())
        out.write(line)
        self._size += len(line.encode("utf-8"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
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
    on_corrupt: Callable[[Path, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of every ``requests-*.jsonl`` file in ``folder``, oldest file first; ``since`` filters on ``ts``.

    A line that is not a JSON object (cut short while the server was writing it, or damaged) is skipped;
    ``on_corrupt(path, line_number)`` is called for each one, so a caller can count them.
    """
    for path in sorted(Path(folder).glob(f"{PREFIX}*{SUFFIX}")):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    ts = float(record.get("ts", 0))
                except (ValueError, TypeError, AttributeError):  # not JSON, not an object, or a bad ``ts``
                    if on_corrupt is not None and line.strip():
                        on_corrupt(path, number)
                    continue
                if since is None or ts >= since:
                    yield record
