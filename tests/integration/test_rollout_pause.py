"""Pausing and resuming a canary rollout walked by RolloutOperator, in real Airflow runs (dag.test) against a real
local model server (``echo://`` variants) under steady load: a pause holds the step's traffic past its bake time,
a resume lets the walk go on with a fresh bake of the held step, and a pause longer than ``max_pause_s`` ends in a
rollback with that reason."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_rollout import Load

pytestmark = pytest.mark.integration


def _run(conf: dict[str, Any]) -> Any:
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_rollout", folder="tests/dags", module="llmops_test_rollout", attr="rollout_dag")
    return dag.test(run_conf=conf)


def _wait(what: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


class Operator(threading.Thread):
    """The person at the LLMOps page: runs ``script`` next to the DAG run, keeping what it saw (or its error)."""

    def __init__(self, script: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(daemon=True)
        self.script, self.seen, self.error = script, {}, None  # type: ignore[var-annotated]

    def run(self) -> None:
        try:
            self.script(self.seen)
        except BaseException as err:
            self.error = err


def test_pause_holds_the_step_resume_continues_and_a_long_pause_rolls_back(
    airflow_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_llmops.platforms import EndpointHandle, get_platform
    from airflow_llmops.platforms.rollout import pause_rollout, resume_rollout
    from airflow_llmops.specs import RolloutPlan

    root = tmp_path / "endpoints"
    platform = get_platform("local", endpoints_root=str(root))
    first = platform.deploy("topics", model_uri="echo://", variant="v1", plan=RolloutPlan(strategy="all_at_once"))
    handle = EndpointHandle("local", "topics", url=first.url)
    base = {"model_uri": "echo://", "endpoints_root": str(root), "bake_seconds": 2, "traffic_steps": [20, 100]}

    def record() -> Any:
        return platform.get_rollout_record("topics")

    def step_started(variant: str) -> bool:
        r = record()
        return bool(r and r.variant == variant and r.in_progress and r.step_started_at)

    def pause_then_resume(seen: dict[str, Any]) -> None:
        _wait(lambda: step_started("v2"))
        pause_rollout(platform, "topics", by="tester", reason="checking the logs")
        time.sleep(6)  # three bake times: unpaused, step 1 would have passed
        held = record()
        seen.update(step=held.step, verdicts=list(held.steps), message=held.message)
        seen["traffic"] = platform.get_traffic(handle)
        seen["resumed_at"] = resume_rollout(platform, "topics", by="tester").pause["at"]

    try:
        with Load(first.url) as load:
            person = Operator(pause_then_resume)
            person.start()
            resumed = _run({**base, "variant": "v2"})
            person.join(timeout=30)
        assert person.error is None, person.error
        assert resumed.state == "success", {t.task_id: t.state for t in resumed.get_task_instances()}
        seen = person.seen
        assert seen["step"] == 0 and seen["verdicts"] == [], seen  # held at the first step, nothing judged passed
        assert seen["traffic"] == {"v2": 20.0, "v1": 80.0}
        assert seen["message"].startswith("paused by tester at ") and seen["message"].endswith(": checking the logs")
        done = record()
        assert done.state == "succeeded" and platform.get_traffic(handle) == {"v2": 100.0}
        assert done.pause["state"] == "resumed" and done.pause["paused_by"] == "tester"
        first_step = done.steps[0]
        # The held step baked again after the resume, on the numbers since the resume.
        assert first_step["status"] == "passed" and first_step["elapsed_s"] >= 2
        assert first_step["elapsed_s"] < 6, first_step  # measured from the resume, not from the step's start
        assert all(status == 200 for _, status, _ in load.results) and len(load.results) > 50

        def pause_forever(seen: dict[str, Any]) -> None:
            _wait(lambda: step_started("v3"))
            pause_rollout(platform, "topics", by="tester", reason="gone for lunch")

        with Load(first.url):
            person = Operator(pause_forever)
            person.start()
            started = time.monotonic()
            abandoned = _run({**base, "variant": "v3", "max_pause_s": 3})
            took = time.monotonic() - started
            person.join(timeout=30)
        assert person.error is None, person.error
        states = {t.task_id: t.state for t in abandoned.get_task_instances()}
        assert states["rollout"] == "failed", states
        ended = record()
        assert ended.state == "rolled_back", ended
        assert "paused by tester" in ended.message and "gone for lunch" in ended.message
        assert "paused longer than max_pause_s=3s" in ended.message
        assert platform.get_traffic(handle) == {"v2": 100.0}  # exactly the split before the rollout
        assert took < 40, took

        # Rolled back from the LLMOps page while paused: the walk ends at its next poll, without a second rollback.
        from airflow_llmops.plugins import ui_actions

        monkeypatch.setenv("AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT", str(root))

        def pause_then_roll_back(seen: dict[str, Any]) -> None:
            _wait(lambda: step_started("v4"))
            pause_rollout(platform, "topics", by="tester", reason="suspicious")
            time.sleep(2)
            target = ui_actions.endpoint_target("local", "topics")
            seen.update(ui_actions.rollback(target, who="tester", reason="not this one"))
            seen["at"] = time.monotonic()

        with Load(first.url):
            person = Operator(pause_then_roll_back)
            person.start()
            stopped = _run({**base, "variant": "v4"})
            ended_at = time.monotonic()
            person.join(timeout=30)
        assert person.error is None, person.error
        assert {t.task_id: t.state for t in stopped.get_task_instances()}["rollout"] == "failed"
        assert person.seen["after"] == {"v2": 100.0} and platform.get_traffic(handle) == {"v2": 100.0}
        assert ended_at - person.seen["at"] < 10  # the next poll, not the end of a pause or a bake
        final = record()
        assert final.state == "rolled_back" and "from the LLMOps page by tester: not this one" in final.message
    finally:
        platform.stop_endpoint("topics")
