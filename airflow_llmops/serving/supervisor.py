"""``airflow-llmops serve --supervise``: keep the model server up across crashes without dropping the socket.

A small parent process (no torch, no FastAPI) binds the listening socket, then runs the real server as a child
process that inherits it (uvicorn serves an already-bound socket). When the child dies, SIGKILL and OOM included,
the parent starts a new one with back-off, at most ``max_restarts_per_minute`` times a minute, logging each
restart. The parent never closes the socket in between, so a connection that arrives while the child restarts
waits in the kernel's listen backlog and is answered by the next child (which takes no connection until its models
are loaded); only the requests in flight in the dead child fail.

The child gets its configuration (tokens included) as JSON on its stdin, never on its command line, and reloads the
state file like any start: with fallback weights recorded, it comes back on them (see
:mod:`airflow_llmops.serving.variants`). SIGTERM and SIGINT of the parent stop the child gracefully, then the
parent exits; a second signal kills the child at once. A child whose parent died stops by itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from airflow_llmops.serving.config import ServerConfig

log = logging.getLogger("airflow_llmops.serving.supervisor")
BACKLOG = 2048
STABLE_S = 30.0  # a child that ran this long is restarted at once; quicker deaths back off
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STOP_TIMEOUT_S = 30.0  # uvicorn's graceful shutdown is 10 s; then the child is killed
_POLL_S = 0.05


def bind(host: str, port: int) -> socket.socket:
    """The listening socket the children share, inheritable across ``exec``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.set_inheritable(True)
    return sock


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Runs the model server in a child process on a socket it owns, and restarts the child when it dies."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        log_level: str = "info",
        access_log: bool = False,
        max_restarts_per_minute: int = 5,
        restart_wait_for_models_s: float = 120.0,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.config = config
        self.host, self.port = host, port
        self.log_level, self.access_log = log_level, access_log
        self.max_restarts_per_minute = max_restarts_per_minute
        self.restart_wait_for_models_s = restart_wait_for_models_s
        self.backoff_max_s = backoff_max_s
        self.restarts = 0
        self.child: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._signals = 0

    # ---- signals ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        self._stop.set()
        child = self.child
        if child is None or child.poll() is not None:
            return
        # SIGTERM even for SIGINT: a Ctrl-C reaches the child too (same process group), and uvicorn takes a second
        # SIGINT as "exit now". A second signal to the parent does mean "now".
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGKILL if self._signals > 1 else signal.SIGTERM)

    # ---- children --------------------------------------------------------------------------------------------
    def _spawn(self, sock: socket.socket) -> subprocess.Popen[bytes]:
        update: dict[str, Any] = {"supervisor_restarts": self.restarts}
        if self.restarts:
            update["wait_for_models_s"] = max(self.config.wait_for_models_s, self.restart_wait_for_models_s)
        payload = {
            "config": self.config.model_copy(update=update).model_dump(mode="json"),
            "fd": sock.fileno(),
            "parent": os.getpid(),
            "log_level": self.log_level,
            "access_log": self.access_log,
        }
        argv = [sys.executable, "-m", "airflow_llmops.serving.supervisor", "--child"]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=(sock.fileno(),))
        stdin: IO[bytes] | None = child.stdin
        assert stdin is not None
        try:  # a child that died at once closed its end: the exit code tells the story
            with stdin:
                stdin.write(json.dumps(payload).encode())
        except BrokenPipeError:
            pass
        return child

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        told = False
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=_POLL_S)
            if self._stop.is_set() and not told:  # a signal that came while the child was being started
                told = True
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()

    def _stop_child(self, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            try:
                child.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("model server %d did not stop within %.0f s; killing it", child.pid, STOP_TIMEOUT_S)
                child.kill()
                child.wait()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0) or until the child dies too often (exit 1)."""
        sock = bind(self.host, self.port)
        private_cache = None
        if self.config.model_cache is None:
            # One folder for every child, so a restart loads the downloaded models from disk; deleted at exit.
            private_cache = Path(tempfile.mkdtemp(prefix="llmops-models-"))
            self.config = self.config.model_copy(update={"model_cache": private_cache})
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("supervisor %d listening on %s:%d", os.getpid(), self.host, self.port)
        if self.config.state_file is None:
            log.warning("no --state-file: a restarted server comes back with the --model variants only")
        try:
            return self._loop(sock)
        finally:
            if self.child is not None:
                self._stop_child(self.child)
            sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if private_cache is not None:
                shutil.rmtree(private_cache, ignore_errors=True)

    def _loop(self, sock: socket.socket) -> int:
        recent: collections.deque[float] = collections.deque()
        quick_deaths = 0
        while not self._stop.is_set():
            started = time.monotonic()
            self.child = self._spawn(sock)
            log.info("model server started: pid %d (restart %d)", self.child.pid, self.restarts)
            code = self._wait(self.child)
            if self._stop.is_set():
                log.info("model server %d stopped (%s)", self.child.pid, describe_exit(code))
                return 0
            lived = time.monotonic() - started
            log.error("model server %d died after %.1f s (%s)", self.child.pid, lived, describe_exit(code))
            now = time.monotonic()
            while recent and now - recent[0] >= 60.0:
                recent.popleft()
            if len(recent) >= self.max_restarts_per_minute:
                log.error(
                    "giving up: %d restarts in the last minute (--max-restarts-per-minute %d)",
                    len(recent),
                    self.max_restarts_per_minute,
                )
                return 1
            quick_deaths = quick_deaths + 1 if lived < STABLE_S else 0
            delay = 0.0 if quick_deaths <= 1 else min(self.backoff_max_s, BACKOFF_FIRST_S * 2 ** (quick_deaths - 2))
            if delay:
                log.warning("restarting the model server in %.1f s (it died %d times in a row)", delay, quick_deaths)
            if self._stop.wait(delay):
                return 0
            recent.append(time.monotonic())
            self.restarts += 1
            log.warning("restarting the model server (restart %d)", self.restarts)
        return 0


# ---- the child ---------------------------------------------------------------------------------------------------
def _watch_parent(parent: int, server: Any) -> None:
    """Stop serving when the supervisor is gone (killed): the socket, and the restarts, were its job."""
    while not server.should_exit:
        if os.getppid() != parent:
            log.error("the supervisor (pid %d) is gone; stopping", parent)
            server.should_exit = True
            return
        time.sleep(0.5)


def child_main() -> int:
    """Run one model server on the inherited socket, configured by the JSON the supervisor wrote to stdin."""
    payload = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    import uvicorn

    from airflow_llmops.serving.app import create_app

    level = str(payload["log_level"])
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.model_validate(payload["config"])
    sock = socket.socket(fileno=int(payload["fd"]))
    uv_config = uvicorn.Config(
        create_app(config), log_level=level, access_log=bool(payload["access_log"]), timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(uv_config)
    threading.Thread(target=_watch_parent, args=(int(payload["parent"]), server), daemon=True).start()
    server.run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: the supervised model server (see serve --supervise)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.parse_args(argv)
    return child_main()


if __name__ == "__main__":
    raise SystemExit(main())
