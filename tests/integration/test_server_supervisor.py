"""``serve --supervise`` as real processes: the model server killed with SIGKILL under steady load comes back on the
same socket (requests that arrive meanwhile wait and are answered), on its fallback weights; restarts are capped;
SIGTERM stops everything cleanly; a child whose supervisor died stops."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from test_serving_models import Server, build_classifier, start_server

from airflow_llmops.processes import http_ok
from airflow_llmops.serving.client import ServingClient

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-supervisor"
CONCURRENCY = 4


def only_child(server: Server, *, other_than: int | None = None, timeout: float = 60.0) -> psutil.Process:
    """The supervisor's model-server child (a new one, when ``other_than`` names the old one)."""
    parent = psutil.Process(server.process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [c for c in parent.children() if c.pid != other_than and c.is_running()]
        if len(children) == 1:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"no (new) child of the supervisor {parent.pid} after {timeout:g}s")


@dataclass
class Result:
    started: float
    ended: float
    status: int  # 0: no HTTP answer (connection reset or closed)
    error: str = ""


class Load:
    """``CONCURRENCY`` threads, each sending classify requests back to back on its own keep-alive connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CONCURRENCY)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120, trust_env=False) as client:
            i = 0
            while not self._stop.is_set():
                started = time.time()
                try:
                    status, error = client.post("/v1/classify", json={"inputs": f"steady load {i}"}).status_code, ""
                except httpx.HTTPError as err:
                    status, error = 0, f"{type(err).__name__}: {err}"
                self.results.append(Result(started, time.time(), status, error))
                i += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Server]:
    server = start_server(
        tmp_path,
        "--supervise",
        "--model", f"clf={build_classifier()}:1",
        "--model", "spare=echo://:0",
        "--state-file", str(tmp_path / "state.json"),
        "--request-log", str(tmp_path / "requests"),
        "--max-batch-delay-ms", "2",
        env={"LLMOPS_ADMIN_TOKEN": ADMIN},
        timeout=180,
    )  # fmt: skip
    yield server
    server.process.stop()


def test_a_killed_server_comes_back_on_the_same_socket_losing_only_requests_in_flight(supervised: Server) -> None:
    client = ServingClient(supervised.url, ADMIN)
    before = client.server_info()
    assert before["supervisor_restarts"] == 0
    # Mid-rollout: 80/20 now, 100/0 recorded as the weights to come back on.
    client.set_weights({"clf": 80, "spare": 20}, fallback={"clf": 100, "spare": 0})
    child = only_child(supervised)
    assert child.pid == before["pid"]

    with Load(supervised.url) as load:
        time.sleep(3)
        killed_at = time.time()
        os.kill(child.pid, signal.SIGKILL)
        new = only_child(supervised, other_than=child.pid)
        deadline = time.monotonic() + 120
        while not any(r.started > killed_at and r.status == 200 for r in load.results):
            assert time.monotonic() < deadline, "no answer within 120 s of the kill"
            time.sleep(0.05)
        time.sleep(2)

    results = sorted(load.results, key=lambda r: r.started)
    failed = [r for r in results if r.status != 200]
    after_kill = [r for r in results if r.started > killed_at]
    back = min(r.ended for r in after_kill if r.status == 200) - killed_at
    waited = [r for r in after_kill if r.started < killed_at + back - 0.05]
    print(
        f"\nsupervisor restart: {len(results)} requests, {len(failed)} failed (concurrency {CONCURRENCY}), "
        f"answering again {back:.2f} s after SIGKILL, {len(waited)} requests sent during the restart answered "
        f"by the new server; failures: {[r.error for r in failed]}"
    )
    assert len(failed) <= CONCURRENCY, [r.error for r in failed]
    # Only requests in flight at the kill may fail (give the signal a moment to land: a request sent on a
    # keep-alive connection of the dying process in that instant is in flight too).
    assert all(r.started < killed_at + 0.5 for r in failed), "a request sent during the restart failed"
    later = [r for r in after_kill if r.started >= killed_at + 0.5]
    assert later and all(r.status == 200 for r in later), "requests sent while the server restarted wait, then succeed"
    assert back < 90

    info = client.server_info()
    assert info["pid"] == new.pid and info["supervisor_restarts"] == 1
    assert info["boot_count"] == before["boot_count"] + 1 and info["started_at"] > before["started_at"]
    assert info["weights"] == {"clf": 100.0, "spare": 0.0}, "old weights first"
    assert info["fallback_applied_at"] == info["started_at"]
    log = supervised.log_text
    assert f"model server {child.pid} died" in log and "signal SIGKILL" in log and "restart 1" in log

    # SIGTERM to the supervisor alone: it stops the model server gracefully and exits 0.
    popen = supervised.process.popen
    assert popen is not None
    os.kill(popen.pid, signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    assert not new.is_running() or new.status() == psutil.STATUS_ZOMBIE
    assert "stopped" in supervised.log_text


def test_restarts_are_capped_and_a_child_without_its_supervisor_stops(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--supervise", "--model", "base=echo://:1", "--max-restarts-per-minute", "2")
    try:
        child = only_child(server)
        ready = f"{server.url}/readyz"
        for _ in range(2):
            os.kill(child.pid, signal.SIGKILL)
            child = only_child(server, other_than=child.pid)
            server.process.wait_until(lambda: http_ok(ready, timeout=30), timeout=60, what="restart", interval=0.1)
        os.kill(child.pid, signal.SIGKILL)
        assert server.process.popen is not None and server.process.popen.wait(timeout=60) == 1
        assert "giving up: 2 restarts in the last minute" in server.log_text
        assert "restarting the model server in 0.5 s" in server.log_text, "quick deaths back off"
    finally:
        server.process.stop()

    orphaned = start_server(tmp_path / "orphan", "--supervise", "--model", "base=echo://:1")
    child = only_child(orphaned)
    try:
        os.kill(orphaned.process.pid, signal.SIGKILL)
        child.wait(timeout=30)  # raises psutil.TimeoutExpired if it keeps running
    finally:
        orphaned.process.stop()
        if child.is_running():
            child.kill()
