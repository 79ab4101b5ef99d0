"""Child processes: start them in a process group of their own, record who they are, check on them, stop them.

A pid alone does not name a process: once it exits, the kernel hands its pid to the next one, and a bare
``os.kill(pid, 0)`` then answers "alive" for a stranger (and a stop would kill it). A :class:`ProcessRecord`
keeps the pid with the process's create time, which a reused pid does not share; it is a small JSON object that
other processes (the triggerer, a retry on another worker) read back from disk.

:func:`child_env` builds the environment of a job or server started from an Airflow worker: an allow-list of what
such a child needs, never the worker's Airflow secrets.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # a dependency of Airflow itself

from airflow_llmops.jsonfiles import write_json_atomic

# -- environment of child processes -------------------------------------------------------------------------------

# What a training job, a tuning study or a model server started from a worker inherits from it; an entry ending in
# "*" is a prefix. Everything else stays behind: above all every AIRFLOW* variable, which on a worker holds the
# Fernet key, the metadata database's URL with its password, connections (AIRFLOW_CONN_*), variables
# (AIRFLOW_VAR_*) and the API's secrets. The children never import Airflow, and a model server or a training
# script must not be able to read or leak them.
CHILD_ENV_ALLOW: tuple[str, ...] = (
    # The basics of a POSIX process.
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "XDG_*",  # cache and config folders: the default HF_HOME and TORCH_HOME are under XDG_CACHE_HOME
    # Python and the environment it runs in.
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONWARNINGS",
    "PYTHONHASHSEED",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "LD_LIBRARY_PATH",  # CUDA's libraries are often found through it
    # Hugging Face: caches and offline mode (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_HOME); HF_TOKEN is dropped by
    # the secret filter below, a token saved in $HF_HOME/token still works.
    "HF_*",
    "HUGGINGFACE_*",
    "TRANSFORMERS_*",
    "TOKENIZERS_PARALLELISM",
    "SENTENCE_TRANSFORMERS_HOME",
    "ACCELERATE_*",
    # Threads and accelerators. torchrun sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK... for its
    # workers itself: stale ones from the worker's environment would only mislead the training script.
    "OMP_*",
    "MKL_*",
    "KMP_*",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_*",
    "VECLIB_MAXIMUM_THREADS",
    "CUDA_*",
    "NVIDIA_*",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "NCCL_*",  # e.g. NCCL_SOCKET_IFNAME for a multi-node rendezvous
    "GLOO_SOCKET_IFNAME",
    "TP_SOCKET_IFNAME",
    "TORCH_*",
    "PYTORCH_*",
    "TORCHINDUCTOR_*",
    # MLflow: where to track, and how to reach it. Not MLFLOW_RUN_ID or MLFLOW_EXPERIMENT_*, which would send the
    # job's runs elsewhere, nor the credentials (MLFLOW_TRACKING_TOKEN/PASSWORD/USERNAME): pass those in ``extra``.
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_S3_ENDPOINT_URL",
    "CODECARBON_*",
    "LLMOPS_*",  # this project's own settings (LLMOPS_ADMIN_TOKEN, LLMOPS_API_KEY: dropped as secrets)
    # Network.
    "NO_PROXY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "no_proxy",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)

# A name that a *prefix* entry matched is still left out when one of its "_"-separated words is one of these
# (HF_TOKEN, LLMOPS_ADMIN_TOKEN, LLMOPS_API_KEY; not TOKENIZERS_PARALLELISM): a credential is passed on purpose,
# by name in ``allow`` or in ``extra``.
SECRET_WORDS = frozenset(
    {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "PWD", "KEY", "CREDENTIAL", "CREDENTIALS", "AUTH", "USERNAME"}
)

_FORBIDDEN_PREFIX = "AIRFLOW"


def _looks_secret(name: str) -> bool:
    return any(word in SECRET_WORDS for word in name.upper().split("_"))


def _forbidden(name: str) -> bool:
    return name.upper().startswith(_FORBIDDEN_PREFIX)


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    allow: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A minimal environment for a child process: the variables of ``environ`` (default ``os.environ``) that
    :data:`CHILD_ENV_ALLOW` or ``allow`` name, then ``extra`` on top.

    An entry of ``allow`` is a name or, ending in ``*``, a prefix. Names a prefix matched that look like
    credentials (:data:`SECRET_WORDS`) are left out; an exact name in ``allow`` or a key of ``extra`` is taken as
    given. Nothing starting with ``AIRFLOW`` gets through: naming one in ``allow`` or ``extra`` is a ValueError.
    """
    source = os.environ if environ is None else environ
    entries = (*CHILD_ENV_ALLOW, *allow)
    forbidden = [entry for entry in (*allow, *(extra or {})) if _forbidden(entry)]
    if forbidden:
        raise ValueError(f"a child process does not get Airflow's environment: {sorted(forbidden)}")
    exact = {entry for entry in entries if not entry.endswith("*")}
    prefixes = tuple(entry[:-1] for entry in entries if entry.endswith("*"))
    env: dict[str, str] = {}
    for name, value in source.items():
        if _forbidden(name):
            continue
        if name in exact or (name.startswith(prefixes) and not _looks_secret(name)):
            env[name] = value
    env.update(extra or {})
    return env


# -- small helpers --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- who a process is -----------------------------------------------------------------------------------------------

# psutil's create time is the kernel's boot time (whole seconds, moved when the wall clock is stepped) plus the
# process's start in clock ticks: two readings in different processes can differ by about a second. A pid reused
# within that second, after the pid counter wrapped around, is the only stranger this lets through.
CREATE_TIME_TOLERANCE = 1.0


def _hostname() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class ProcessRecord:
    """Who a started process is: its pid and create time (and, for the reader, its argv and start).

    ``create_time`` is ``None`` in records written before it was kept (a ``launcher.json`` or ``server.json`` of
    an older version, a plain pid file); those are judged by ``started_at``: a process created after the record was
    written is not the one it recorded. A record with neither cannot tell, so it counts as alive (a caller does not
    start a duplicate) but :meth:`stop` will not signal it (it might be a stranger). ``host`` (when set) is the
    machine it runs on: a record read on another machine sharing the folder names no process there.
    """

    pid: int
    create_time: float | None
    started_at: float | None = field(default_factory=time.time)
    argv: tuple[str, ...] = ()
    host: str | None = None

    @classmethod
    def of(cls, process: subprocess.Popen[Any] | int, *, argv: Sequence[str] | None = None) -> ProcessRecord:
        """The record of a process just started (a Popen or a pid). ProcessLookupError if it is gone already."""
        pid = process if isinstance(process, int) else process.pid
        if argv is None and not isinstance(process, int) and isinstance(process.args, list | tuple):
            argv = [str(arg) for arg in process.args]
        try:
            # An exited but unreaped child (a zombie) still has its create time.
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            raise ProcessLookupError(f"no process {pid}") from None
        return cls(pid=pid, create_time=created, argv=tuple(argv or ()), host=_hostname())

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "started_at": self.started_at,
            "argv": list(self.argv),
            "host": self.host,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """The record in a JSON object; other keys (a launcher's ``attempt``, a server's ``url``) are ignored."""
        try:
            pid = int(data["pid"])
            create_time = None if data.get("create_time") is None else float(data["create_time"])
            started_at = None if data.get("started_at") is None else float(data["started_at"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a process record: {dict(data)!r} ({err})") from None
        if pid <= 0:  # kill(0) and kill(-1) address groups, never one process
            raise ValueError(f"not a process record: pid {pid}")
        argv = data.get("argv")
        host = data.get("host")
        return cls(
            pid=pid,
            create_time=create_time,
            started_at=started_at,
            argv=tuple(str(arg) for arg in argv) if isinstance(argv, list | tuple) else (),
            host=str(host) if host else None,
        )

    def write(self, path: Path, **extra: Any) -> None:
        """Write the record, with ``extra`` keys next to its own, as a JSON object; atomically, since other
        processes poll the file."""
        clash = set(extra) & set(self.to_dict())
        if clash:
            raise ValueError(f"extra keys clash with the record's own: {sorted(clash)}")
        write_json_atomic(path, {**self.to_dict(), **extra})

    @classmethod
    def read(cls, path: Path) -> ProcessRecord | None:
        """The record in ``path``: a JSON object, or a legacy file holding only a pid (its write time standing in
        for ``started_at``). ``None`` when the file is missing or holds no record."""
        try:
            text = path.read_text().strip()
            if text.isdigit():
                return cls(pid=int(text), create_time=None, started_at=path.stat().st_mtime)
            data = json.loads(text)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        try:
            return cls.from_dict(data)
        except ValueError:
            return None

    # -- the process -----------------------------------------------------------------------------------------------
    @property
    def verifiable(self) -> bool:
        """Whether the record can tell its process from a later one with the same pid."""
        return self.create_time is not None or self.started_at is not None

    def process(self) -> psutil.Process | None:
        """The recorded process, if this pid still belongs to it (it may be a zombie)."""
        if self.host is not None and self.host != _hostname():
            return None
        try:
            proc = psutil.Process(self.pid)
            created = proc.create_time()
        except psutil.Error:
            return None
        if self.create_time is not None:
            same = abs(created - self.create_time) <= CREATE_TIME_TOLERANCE
        elif self.started_at is not None:
            same = created <= self.started_at + CREATE_TIME_TOLERANCE
        else:
            same = True  # nothing to compare: see the class docstring
        return proc if same else None

    def alive(self) -> bool:
        """True while the recorded process runs: False once its pid is gone, a zombie or another process's."""
        proc = self.process()
        if proc is None:
            return False
        try:
            zombie = proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
        if zombie:
            # Ours to reap if we started it (nobody else will while this process lives); not ours otherwise.
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, os.WNOHANG)
            return False
        return True

    def stop(self, grace: float = 20.0) -> bool:
        """SIGTERM the process's group (the process alone if it leads none), SIGKILL what is left after ``grace``
        seconds. Only if the pid still belongs to the recorded process; True if something was signalled."""
        if not self.verifiable or self.process() is None:
            return False
        try:
            pgid = os.getpgid(self.pid)
        except ProcessLookupError:
            return False
        if pgid == self.pid and pgid != os.getpgrp():
            return _terminate_group(pgid, grace)
        # Not a group leader (started without a session of its own): its group is someone else's.
        proc = self.process()
        if proc is None:
            return False
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            _, left = psutil.wait_procs([proc], timeout=grace)
            for straggler in left:
                straggler.kill()
        return True


def _terminate_group(pgid: int, grace: float) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True  # the group is empty: its id may be anyone's next, so no SIGKILL to it
        # Members that are our children stay in the group as zombies until reaped.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-pgid, os.WNOHANG)
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def stop_process_group(pid: int, timeout: float = 20.0) -> bool:
    """SIGTERM the process group of ``pid``, SIGKILL it after ``timeout``. True if anything was running.

    Trusts ``pid``: for a process this process did not just start, use :meth:`ProcessRecord.stop`, which checks
    that the pid was not reused. Never signals the caller's own group (False).
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    if pgid == os.getpgrp():
        return False
    return _terminate_group(pgid, timeout)


@dataclass
class ManagedProcess:
    """A service process writing to its own log file, started as the leader of a new process group."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)
    record: ProcessRecord | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        # Not reaped before we wait on it, so the pid is still this process's.
        self.record = ProcessRecord.of(self.popen, argv=self.argv)
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen.pid

    def alive(self) -> bool:
        # The Popen, not the record: until it is reaped, its pid cannot be anybody else's.
        return self.popen is not None and self.popen.poll() is None

    def wait_until(self, check: object, *, timeout: float, what: str, interval: float = 1.0) -> None:
        """Poll ``check()`` until it is true; fail early with the log's tail if the process died."""
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before {what}; last log lines:\n{tail(self.log_path)}")
            time.sleep(interval)
        raise TimeoutError(f"{self.name}: no {what} after {timeout:.0f}s; last log lines:\n{tail(self.log_path)}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        stop_process_group(self.popen.pid, timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


__all__ = [
    "CHILD_ENV_ALLOW",
    "SECRET_WORDS",
    "ManagedProcess",
    "ProcessRecord",
    "child_env",
    "free_port",
    "http_ok",
    "port_open",
    "stop_process_group",
    "tail",
]
