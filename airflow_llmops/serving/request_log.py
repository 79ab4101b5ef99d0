"""The request log: one JSON line per answered input, written by a background thread, rotated by size and age,
pruned by age and total size, and optionally shipped to an object store (:class:`RequestLogShipper`).

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
import os
import queue
import re
import socket
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
ENV_SERVER_ID = "LLMOPS_SERVER_ID"
SHIPPED_FILE = ".shipped"  # in the log folder: the local names of the files already shipped, one a line
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
log = logging.getLogger(__name__)


def _file_name(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).strftime(_STAMP)
    return f"{PREFIX}{stamp}{SUFFIX}"


def _name_time(path: Path) -> float | None:
    """When the writer opened the file, from its name; ``None`` for other names (e.g. simulated logs)."""
    # A shipped file's name is ``requests-<stamp>-<server id>.jsonl``: the stamp holds no ``-``.
    stamp = path.name.removeprefix(PREFIX).removesuffix(SUFFIX).split("-", 1)[0]
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


def server_id() -> str:
    """This server's name in shipped file names: ``$LLMOPS_SERVER_ID``, else ``<hostname>-<pid>`` (unique across the
    replicas and variants that ship to one URI); characters other than ``[A-Za-z0-9._-]`` become ``_``."""
    value = os.environ.get(ENV_SERVER_ID, "").strip() or f"{socket.gethostname()}-{os.getpid()}"
    return _ID_UNSAFE.sub("_", value)[:128] or "server"


def shipped_name(local_name: str, server: str) -> str:
    """``requests-<stamp>.jsonl`` → ``requests-<stamp>-<server>.jsonl`` (what :func:`log_files` still times)."""
    return f"{local_name.removesuffix(SUFFIX)}-{server}{SUFFIX}"


class RequestLogShipper:
    """Copies the closed request-log files of ``folder`` to ``<uri>/requests-<stamp>-<server id>.jsonl`` with fsspec,
    in a background thread: woken at each rotation, retried every ``retry_s`` after a failure, and at :meth:`close`
    (after the writer closed its file) it ships the rest. ``<folder>/.shipped`` lists the files already shipped, so
    a restarted server ships only what is left.

    :param uri: any fsspec URI or a plain path (``gs://b/p``, ``s3://``, ``abfs://``, ``file:///p``, ``/p``).
    :param server: the name part that tells servers apart (default :func:`server_id`).
    """

    def __init__(self, folder: Path, uri: str, *, server: str | None = None, retry_s: float = 60.0) -> None:
        import fsspec

        self.folder = Path(folder)
        self.uri = uri.rstrip("/") or uri
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.root = self.root.rstrip("/") or self.root
        self.server = server or server_id()
        self.retry_s = retry_s
        self.failures = 0
        self._record = self.folder / SHIPPED_FILE
        self.shipped: set[str] = self._read_record()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        # Files named before this may be shipped; the writer moves it to the name of each file it opens.
        self._open_name: str | None = _file_name(time.time())
        self._wake.set()  # at start: the files an earlier run left unshipped
        self._thread = threading.Thread(target=self._run, name="llmops-request-log-ship", daemon=True)
        self._thread.start()

    def rotated(self, open_path: Path) -> None:
        """The writer opened ``open_path``: every file named before it is closed and may go (never blocks)."""
        with self._lock:
            self._open_name = open_path.name
        self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Ship every file left (the writer has closed its own) and stop, waiting at most ``timeout``."""
        with self._lock:
            self._open_name = None
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "request log: still shipping to %s after %.0f s; the rest ships at the next start", self.uri, timeout
            )

    def pending(self) -> list[str]:
        """The closed files not shipped yet, oldest first."""
        with self._lock:
            limit = self._open_name
        names = sorted(p.name for p in self.folder.glob(f"{PREFIX}*{SUFFIX}"))
        return [n for n in names if n not in self.shipped and (limit is None or n < limit)]

    def ship_pending(self) -> bool:
        """Upload the pending files in order; stops at the first failure (logged, retried later). True when none
        is left."""
        for name in self.pending():
            try:
                self._upload(name)
            except FileNotFoundError as err:
                if (self.folder / name).exists():  # the target is missing (a bucket, a folder), not the file
                    return self._failed(name, err)
                continue  # pruned by the retention meanwhile
            except Exception as err:  # each filesystem raises its own errors
                return self._failed(name, err)
            self.shipped.add(name)
            self._write_record()
            log.info("request log: shipped %s to %s", name, self.uri)
        return True

    def _failed(self, name: str, err: BaseException) -> bool:
        self.failures += 1
        log.warning("request log: shipping %s to %s failed (retried later): %s", name, self.uri, err)
        return False

    def _upload(self, name: str) -> None:
        target = f"{self.root}/{shipped_name(name, self.server)}"
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "file" in protocols or "local" in protocols:
            # A reader of a folder must never see half a file: write beside it, then rename.
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.put_file(str(self.folder / name), f"{target}.part")
            self.fs.mv(f"{target}.part", target)
        else:  # an object store's put is atomic
            self.fs.put_file(str(self.folder / name), target)

    def _read_record(self) -> set[str]:
        try:
            return {line.strip() for line in self._record.read_text(encoding="utf-8").splitlines() if line.strip()}
        except OSError:
            return set()

    def _write_record(self) -> None:
        existing = {p.name for p in self.folder.glob(f"{PREFIX}*{SUFFIX}")}
        self.shipped &= existing  # forget the files the retention deleted
        tmp = self._record.with_name(f"{SHIPPED_FILE}.tmp")
        try:
            tmp.write_text("".join(f"{n}\n" for n in sorted(self.shipped)), encoding="utf-8")
            os.replace(tmp, self._record)
        except OSError as err:  # at worst a file is shipped again after a restart (same name: overwritten)
            log.warning("request log: cannot write %s: %s", self._record, err)

    def _run(self) -> None:
        done = True
        while True:
            self._wake.wait(None if done else self.retry_s)
            self._wake.clear()
            with self._lock:
                stopping = self._stopping
            try:
                done = self.ship_pending()
            except Exception:  # a listing failure must not end the thread
                log.exception("request log: shipping to %s failed", self.uri)
                done = False
            if stopping:
                return


class RequestLogWriter:
    """Appends records from any thread without blocking; a daemon thread writes and rotates the files.

    :param folder: where the ``requests-*.jsonl`` files go (created when missing).
    :param max_bytes: start a new file once the current one reaches this size.
    :param max_age_s: start a new file once the current one is this old.
    :param retention_s: delete files last written longer ago than this (checked at start, at each rotation and
        every few minutes).
    :param max_total_bytes: then delete the oldest files until the folder holds at most this much.
    :param on_drop: called when a record is dropped because the queue is full (the disk cannot keep up).
    :param shipper: told of each rotation, closed after the last file (see :class:`RequestLogShipper`).
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
        shipper: RequestLogShipper | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.shipper = shipper
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
        if self.shipper is not None and not self._thread.is_alive():  # the last file is closed now: ship it too
            self.shipper.close()
        elif self.shipper is not None:
            log.warning("request log: the writer did not stop in %.0f s; its last file is not shipped", timeout)

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
            if self.shipper is not None:
                self.shipper.rotated(path)
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
