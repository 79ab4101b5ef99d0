"""The rollout's fault matrix, each under steady load on a canary of a good version: the endpoint's server is
SIGKILLed mid-bake, the worker running the rollout is SIGKILLed and the task retried, the triggerer restarts
mid-bake, the metrics read raises. After each the endpoint serves the old version at 100 % or the new one promoted,
the log says which and why, and no request fails except those in flight to a killed process (counted, printed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_rollout import Load
from test_serving import wait_for

from airflow_llmops.platforms import EndpointHandle, get_platform, register_platform
from airflow_llmops.platforms.localhost import LocalHost

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
_RUN_DAG = """
import json, sys
sys.path.insert(0, "tests/integration")
from dags_under_test import load_dag
dag = load_dag("llmops_test_rollout", folder="tests/dags", module="llmops_test_rollout", attr="rollout_dag")
run = dag.test(run_conf=json.loads(sys.argv[1]))
tasks = {t.task_id: str(t.state) for t in run.get_task_instances()}
print("RESULT " + json.dumps({"state": str(run.state), "tasks": tasks}))
"""


@pytest.fixture(scope="module")
def classifier() -> Path:
    from test_serving_models import build_classifier

    return build_classifier()


@pytest.fixture
def endpoints(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "endpoints"
    yield root
    get_platform("local", endpoints_root=str(root)).stop_endpoint("topics")


def _run_dag(conf: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    """dag.test() in a process of its own: a worker that can be SIGKILLed."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _RUN_DAG, json.dumps(conf)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> dict[str, Any]:
    proc.wait(timeout=timeout)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
    assert lines, log.read_text(errors="replace")[-4000:]
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def _platform(endpoints: Path) -> LocalHost:
    return get_platform("local", endpoints_root=str(endpoints))  # type: ignore[no-any-return]


def _traffic(endpoints: Path) -> dict[str, float]:
    platform = _platform(endpoints)
    return platform.get_traffic(EndpointHandle("local", "topics"))


def _baking(endpoints: Path, variant: str, step: int = 0) -> Callable[[], bool]:
    def check() -> bool:
        record = _platform(endpoints).get_rollout_record("topics")
        return bool(record and record.variant == variant and record.step == step and record.step_started_at)

    return check


def _first_version(classifier: Path, endpoints: Path, tmp_path: Path) -> str:
    conf = {"model_uri": str(classifier), "endpoints_root": str(endpoints), "variant": "v1"}
    result = _finish(_run_dag(conf, tmp_path / "v1.log"), tmp_path / "v1.log")
    assert result["state"] == "success", result
    assert _traffic(endpoints) == {"v1": 100.0}
    url = _platform(endpoints).describe_endpoint(EndpointHandle("local", "topics"))["url"]
    return str(url)


def _canary(classifier: Path, endpoints: Path, **params: Any) -> dict[str, Any]:
    """The run conf of a canary of v2 in two steps (50 %, 100 %)."""
    return {
        "model_uri": str(classifier),
        "endpoints_root": str(endpoints),
        "variant": "v2",
        "traffic_steps": [50, 100],
        **params,
    }


def _report(name: str, load: Load) -> list[tuple[float, int, str | None]]:
    failed = [r for r in load.results if r[1] != 200]
    served = {v: sum(1 for r in load.results if r[2] == v) for v in sorted({str(r[2]) for r in load.results})}
    print(f"[{name}] requests {len(load.results)}, failed {len(failed)}, served by variant {served}")
    return failed


def test_server_killed_mid_bake_rolls_back_to_the_old_version(airflow_db, classifier, endpoints, tmp_path) -> None:
    import psutil

    url = _first_version(classifier, endpoints, tmp_path)
    conf = _canary(classifier, endpoints, bake_seconds=30)
    log = tmp_path / "v2.log"
    with Load(url) as load:
        proc = _run_dag(conf, log)
        wait_for(_baking(endpoints, "v2"), timeout=120, what="the first step's bake")
        time.sleep(2)
        server = json.loads((endpoints / "topics" / "server.json").read_text())
        supervisor = psutil.Process(int(server["pid"]))
        children = supervisor.children()
        victim = children[0] if children else supervisor  # the serving process, under its supervisor if any
        victim.send_signal(signal.SIGKILL)
        result = _finish(proc, log)
        time.sleep(1)
    failed = _report("server SIGKILL", load)
    text = log.read_text(errors="replace")
    assert result["tasks"]["rollout"] == "failed", result
    assert "rolled back" in text and "restarted" in text, text[-3000:]
    assert _traffic(endpoints) == {"v1": 100.0}
    record = _platform(endpoints).get_rollout_record("topics")
    assert record is not None and record.state == "rolled_back"
    # Only requests in flight to the killed process may fail: the load has one request in flight at a time.
    assert len(failed) <= 2, failed


def test_worker_killed_mid_bake_retry_reattaches_and_finishes(airflow_db, classifier, endpoints, tmp_path) -> None:
    url = _first_version(classifier, endpoints, tmp_path)
    conf = _canary(classifier, endpoints, bake_seconds=4)
    log = tmp_path / "v2.log"
    with Load(url) as load:
        proc = _run_dag(conf, log)
        wait_for(_baking(endpoints, "v2"), timeout=120, what="the first step's bake")
        os.killpg(proc.pid, signal.SIGKILL)  # the worker dies without any clean-up
        proc.wait(timeout=30)
        assert _traffic(endpoints) == {"v1": 50.0, "v2": 50.0}  # stranded half-way, recorded as in progress
        retry = _finish(_run_dag(conf, tmp_path / "retry.log"), tmp_path / "retry.log")
        time.sleep(1)
    failed = _report("worker SIGKILL", load)
    text = (tmp_path / "retry.log").read_text(errors="replace")
    assert retry["state"] == "success", (retry, text[-3000:])
    assert "Re-attaching to the rollout of v2" in text and "Rollout succeeded" in text
    assert _traffic(endpoints) == {"v2": 100.0}
    record = _platform(endpoints).get_rollout_record("topics")
    assert record is not None and record.state == "succeeded" and record.attempts == 2
    assert [s["percent"] for s in record.steps] == [50, 100]  # one walk: no step done twice
    assert failed == [], failed[:5]


def test_triggerer_restart_mid_bake_reaches_the_same_verdict(airflow_db, classifier, endpoints, tmp_path) -> None:
    from airflow_llmops.platforms import RolloutRecord
    from airflow_llmops.specs import RolloutPlan
    from airflow_llmops.triggers.rollout import RolloutStepTrigger

    url = _first_version(classifier, endpoints, tmp_path)
    platform = _platform(endpoints)
    plan = RolloutPlan.parse(
        {"strategy": "canary", "traffic_steps": [50, 100], "bake_seconds": 4, "slo": {"min_requests": 5}}
    )
    handle = platform.deploy("topics", model_uri=str(classifier), variant="v2", plan=plan)
    platform.set_traffic(handle, {"v1": 50.0, "v2": 50.0})
    record = RolloutRecord(
        rollout_id="t", variant="v2", model_uri=str(classifier), previous={"v1": 100.0}, plan=plan.to_dict()
    )
    record.step_started_at = time.time()
    platform.put_rollout_record("topics", record)
    trigger = RolloutStepTrigger(
        platform="local",
        platform_kwargs={"endpoints_root": str(endpoints)},
        handle=handle.to_dict(),
        record=record.to_dict(),
        poll_interval=0.5,
    )

    async def first_event(t: RolloutStepTrigger) -> dict[str, Any]:
        async for event in t.run():
            return dict(event.payload)
        raise AssertionError("no event")

    async def scenario() -> dict[str, Any]:
        running = asyncio.ensure_future(first_event(trigger))
        await asyncio.sleep(1.5)
        running.cancel()  # the triggerer dies mid-bake
        with pytest.raises(asyncio.CancelledError):
            await running
        classpath, kwargs = trigger.serialize()
        assert classpath == "airflow_llmops.triggers.rollout.RolloutStepTrigger"
        rebuilt = RolloutStepTrigger(**json.loads(json.dumps(kwargs)))  # what a new triggerer loads
        return await asyncio.wait_for(first_event(rebuilt), timeout=60)

    with Load(url) as load:
        event = asyncio.run(scenario())
    failed = _report("triggerer restart", load)
    assert event["status"] == "passed" and event["step"] == 0 and event["elapsed_s"] >= 4, event
    assert event["new"]["requests"] >= 5
    assert _traffic(endpoints) == {"v1": 50.0, "v2": 50.0}  # the trigger only waits: traffic is the worker's
    assert failed == []


class _FlakyMetrics(LocalHost):
    """The local platform whose metrics reads fail after the first few (the monitoring backend went away)."""

    calls = 0

    def read_metrics(self, handle, *, variants, since=None):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        if type(self).calls > 2:
            raise ConnectionError("monitoring backend unreachable")
        return super().read_metrics(handle, variants=variants, since=since)


def test_metrics_read_raising_rolls_back(airflow_db, classifier, endpoints, tmp_path, capfd) -> None:
    from dags_under_test import load_dag

    url = _first_version(classifier, endpoints, tmp_path)
    dag = load_dag("llmops_test_rollout", folder="tests/dags", module="llmops_test_rollout", attr="rollout_dag")
    conf = _canary(classifier, endpoints, bake_seconds=6)
    _FlakyMetrics.calls = 0
    register_platform("local", _FlakyMetrics)
    try:
        with Load(url) as load:
            run = dag.test(run_conf=conf)
            time.sleep(1)
    finally:
        register_platform("local", LocalHost)
    failed = _report("metrics read raises", load)
    out, err = capfd.readouterr()
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert states["rollout"] == "failed", states
    assert "reading the endpoint's metrics failed 3 times" in out + err and "rolled back" in out + err
    assert _traffic(endpoints) == {"v1": 100.0}
    assert failed == []


def test_auto_rollback_off_leaves_the_split_and_says_so(airflow_db, classifier, endpoints, tmp_path) -> None:
    url = _first_version(classifier, endpoints, tmp_path)
    conf = _canary(classifier, endpoints, bake_seconds=3, error_rate=0.5, auto_rollback=False)
    log = tmp_path / "v2.log"
    with Load(url):
        result = _finish(_run_dag(conf, log), log)
    text = log.read_text(errors="replace")
    assert result["tasks"]["rollout"] == "failed", result
    assert "auto_rollback=False" in text and "left in place" in text
    assert _traffic(endpoints) == {"v1": 50.0, "v2": 50.0}
    record = _platform(endpoints).get_rollout_record("topics")
    assert record is not None and record.state == "failed" and "auto_rollback=False" in record.message
