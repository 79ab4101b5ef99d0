"""The rollout's decisions at their edges: the verdict, the step check, the operator's reactions to every outcome
(pass, breach, timeout, exception, kill, retry), the platform registry and the capability checks.

The platform here is an in-memory endpoint registered through the registry, as a third-party adapter would be: it
records every call, so each test states exactly what traffic the operator set and what it restored.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airflow_llmops.operators.rollout import RolloutOperator
from airflow_llmops.platforms import (
    EndpointHandle,
    PlatformCapabilities,
    RolloutRecord,
    VariantMetrics,
    available_platforms,
    deployment_platform,
    get_platform,
    register_platform,
    validate_endpoint_name,
)
from airflow_llmops.platforms.rollout import check_step, judge, step_weights
from airflow_llmops.specs import SLO, RolloutPlan
from airflow_llmops.triggers.rollout import RolloutStepTrigger

ROOT = Path(__file__).resolve().parents[2]


class MemoryEndpoints:
    """A deployment platform held in memory (class-level, so every adapter object sees the same endpoints)."""

    name = "memory"
    capabilities = PlatformCapabilities(traffic_split=True, shadow=False)
    weights: ClassVar[dict[str, float]] = {}
    records: ClassVar[dict[str, dict[str, Any]]] = {}
    calls: ClassVar[list[tuple[str, Any]]] = []
    metrics: ClassVar[dict[str, VariantMetrics]] = {}
    fail_on: ClassVar[set[str]] = set()

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    @classmethod
    def reset(cls, weights: dict[str, float]) -> None:
        cls.weights, cls.records, cls.calls, cls.metrics, cls.fail_on = dict(weights), {}, [], {}, set()

    def _act(self, what: str, arg: Any = None) -> None:
        type(self).calls.append((what, arg))
        if what in self.fail_on:
            raise ConnectionError(f"{what} failed")

    def deploy(self, endpoint_name, *, model_uri, variant, plan):  # type: ignore[no-untyped-def]
        previous = {k: v for k, v in self.weights.items() if v > 0 and k != variant}
        self.weights.setdefault(variant, 0.0 if previous else 100.0)
        return EndpointHandle("memory", endpoint_name, url="mem://", extra={"previous": previous, "variant": variant})

    def set_traffic(self, handle, weights):  # type: ignore[no-untyped-def]
        self._act("set_traffic", dict(weights))
        self.weights.update(weights)

    def get_traffic(self, handle):  # type: ignore[no-untyped-def]
        return dict(self.weights)

    def read_metrics(self, handle, *, variants, since=None):  # type: ignore[no-untyped-def]
        self._act("read_metrics")
        return [self.metrics.get(v, VariantMetrics(variant=v, requests=0, errors=0)) for v in variants]

    def rollback(self, handle, *, failed_variant, previous):  # type: ignore[no-untyped-def]
        self._act("rollback", (failed_variant, dict(previous)))
        self.weights.clear()
        self.weights.update(previous)

    def finish(self, handle, *, new_variant, keep_new=True):  # type: ignore[no-untyped-def]
        self._act("finish", new_variant)
        self.weights.clear()
        self.weights[new_variant] = 100.0

    def describe_endpoint(self, handle):  # type: ignore[no-untyped-def]
        return {"weights": dict(self.weights)}

    def get_rollout_record(self, endpoint_name):  # type: ignore[no-untyped-def]
        data = self.records.get(endpoint_name)
        return RolloutRecord.from_dict(json.loads(json.dumps(data))) if data else None

    def put_rollout_record(self, endpoint_name, record):  # type: ignore[no-untyped-def]
        self.records[endpoint_name] = record.to_dict()


@pytest.fixture(autouse=True)
def memory_platform():
    register_platform("memory", MemoryEndpoints)
    MemoryEndpoints.reset({"v1": 100.0})
    yield MemoryEndpoints


def _context() -> dict[str, Any]:
    return {"dag": SimpleNamespace(dag_id="d"), "run_id": "r", "outlet_events": {}}


def _rollout(**plan: Any) -> dict[str, Any]:
    parsed = RolloutPlan.parse({"strategy": "canary", "traffic_steps": [50, 100], "bake_seconds": 0, **plan})
    handle = deployment_platform("memory").deploy("ep", model_uri="/m/v2", variant="v2", plan=parsed)
    return {
        "platform": "memory",
        "platform_kwargs": {},
        "handle": handle.to_dict(),
        "plan": parsed.to_dict(),
        "variant": "v2",
        "model_uri": "/m/v2",
        "url": "mem://",
    }


def _operator(rollout: dict[str, Any], **kwargs: Any) -> RolloutOperator:
    return RolloutOperator(task_id="rollout", rollout=rollout, poll_interval=0.01, **kwargs)


def _healthy(requests: int = 50) -> None:
    MemoryEndpoints.metrics = {
        "v2": VariantMetrics("v2", requests, 0, p95_latency_ms=50.0),
        "v1": VariantMetrics("v1", requests, 0, p95_latency_ms=50.0),
    }


# -- the verdict -----------------------------------------------------------------------------------------------------
def test_judge_edges():
    slo = SLO(p95_latency_ms=100, max_error_rate=0.1, min_requests=20)
    assert judge(VariantMetrics("n", 10, 0, p95_latency_ms=10), None, slo).ok is None  # too few to pass
    assert judge(VariantMetrics("n", 10, 2, p95_latency_ms=10), None, slo).ok is None  # 2 <= 10% of 20
    breach = judge(VariantMetrics("n", 10, 3, p95_latency_ms=10), None, slo)  # errors alone exceed 10% of 20
    assert breach.ok is False and "error rate" in breach.message
    assert judge(VariantMetrics("n", 20, 2, p95_latency_ms=100), None, slo).ok is True  # limits are inclusive
    slow = judge(VariantMetrics("n", 20, 0, p95_latency_ms=100.5), None, slo)
    assert slow.ok is False and "p95 latency" in slow.message
    assert judge(VariantMetrics("n", 0, 0), None, SLO(min_requests=0)).ok is True  # judge what came, even nothing
    ratio = SLO(p95_latency_ms=1000, min_requests=1, max_latency_ratio=1.5)
    old = VariantMetrics("o", 50, 0, p95_latency_ms=40)
    assert judge(VariantMetrics("n", 5, 0, p95_latency_ms=60), old, ratio).ok is True
    assert judge(VariantMetrics("n", 5, 0, p95_latency_ms=61), old, ratio).ok is False


def test_step_weights_keep_the_old_split_proportions():
    plan = RolloutPlan.parse({"strategy": "canary", "traffic_steps": [10, 100]})
    assert step_weights(plan, 10, "new", {"a": 75.0, "b": 25.0}) == {"new": 10, "a": 67.5, "b": 22.5}
    shadow = RolloutPlan.parse({"strategy": "shadow"})
    assert step_weights(shadow, 100, "new", {"a": 100.0}) == {"a": 100.0}


def test_check_step_statuses(memory_platform):
    platform = deployment_platform("memory")
    handle = EndpointHandle("memory", "ep")
    plan = RolloutPlan.parse({"strategy": "canary", "traffic_steps": [50, 100], "bake_seconds": 10})
    record = RolloutRecord("i", "v2", "/m", {"v1": 100.0}, plan.to_dict(), step_started_at=1000.0)
    _healthy()
    assert check_step(platform, handle, record, plan, max_wait_s=5, now=1005).status == "wait"
    assert check_step(platform, handle, record, plan, max_wait_s=5, now=1010).status == "passed"
    _healthy(requests=0)
    strict = RolloutPlan.parse({**plan.to_dict(), "slo": {"min_requests": 5}})
    assert check_step(platform, handle, record, strict, max_wait_s=5, now=1014).status == "wait"
    assert check_step(platform, handle, record, strict, max_wait_s=5, now=1015).status == "timeout"
    memory_platform.metrics = {"v2": VariantMetrics("v2", 10, 5)}
    assert check_step(platform, handle, record, plan, max_wait_s=5, now=1001).status == "breach"


# -- the operator ----------------------------------------------------------------------------------------------------
def test_a_step_already_decided_never_defers(memory_platform):
    _healthy()
    result = _operator(_rollout()).execute(_context())
    assert result["state"] == "succeeded" and [s["percent"] for s in result["steps"]] == [50, 100]
    traffic = [arg for what, arg in memory_platform.calls if what == "set_traffic"]
    assert traffic == [{"v2": 50.0, "v1": 50.0}, {"v2": 100.0, "v1": 0.0}]
    assert memory_platform.weights == {"v2": 100.0}
    assert memory_platform.records["ep"]["state"] == "succeeded"


def test_a_step_that_must_bake_defers_to_a_trigger_that_round_trips(memory_platform):
    _healthy()
    rollout = _rollout(bake_seconds=30)
    op = _operator(rollout, deferrable=True, timeout=120)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(_context())
    trigger = deferred.value.trigger
    assert isinstance(trigger, RolloutStepTrigger) and deferred.value.method_name == "execute_complete"
    assert 0 < deferred.value.timeout.total_seconds() <= 120
    classpath, kwargs = trigger.serialize()
    rebuilt = RolloutStepTrigger(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["record"]["step"] == 0 and kwargs["record"]["step_started_at"]
    assert memory_platform.weights == {"v1": 50.0, "v2": 50.0}
    # The trigger's verdict resumes the task in the worker, which moves on and defers for the next step.
    with pytest.raises(TaskDeferred) as again:
        op.execute_complete(_context(), {"status": "passed", "step": 0, "message": "ok"})
    assert again.value.trigger.serialize()[1]["record"]["step"] == 1
    assert memory_platform.weights == {"v1": 0.0, "v2": 100.0}


@pytest.mark.parametrize(
    ("event", "words"),
    [
        ({"status": "breach", "step": 0, "message": "step 50%: v2: error rate 9% > 1%"}, "error rate"),
        ({"status": "timeout", "step": 0, "message": "step 50%: too little traffic"}, "too little traffic"),
        ({"status": "error", "step": 0, "message": "the server restarted"}, "restarted"),
    ],
)
def test_every_bad_verdict_restores_the_old_weights(memory_platform, event, words):
    op = _operator(_rollout(bake_seconds=30), deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute(_context())
    with pytest.raises(AirflowFailException, match=words) as failed:
        op.execute_complete(_context(), event)
    assert "rolled back" in str(failed.value)
    assert ("rollback", ("v2", {"v1": 100.0})) in memory_platform.calls
    assert memory_platform.weights == {"v1": 100.0}
    assert memory_platform.records["ep"]["state"] == "rolled_back"
    # A retry of a rolled-back rollout does not walk again: the verdict stands.
    with pytest.raises(AirflowFailException, match="already ended as rolled_back"):
        _operator(_rollout(bake_seconds=30)).execute(_context())


def test_an_exception_mid_walk_rolls_back(memory_platform):
    _healthy()
    memory_platform.fail_on = {"read_metrics"}
    with pytest.raises(ConnectionError):
        _operator(_rollout()).execute(_context())
    assert memory_platform.weights == {"v1": 100.0}
    assert memory_platform.records["ep"]["state"] == "rolled_back"
    assert "ConnectionError" in memory_platform.records["ep"]["message"]


def test_a_trigger_timeout_rolls_back(memory_platform):
    from airflow.sdk.exceptions import TaskDeferralError, TaskDeferralTimeout

    op = _operator(_rollout(bake_seconds=30), deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute(_context())
    with pytest.raises((TaskDeferralTimeout, TaskDeferralError)):  # how Airflow resumes a timed-out deferral
        op.resume_execution("__fail__", {"error": "Trigger/execution timeout"}, _context())
    assert memory_platform.weights == {"v1": 100.0}
    assert memory_platform.records["ep"]["state"] == "rolled_back"


def test_on_kill_rolls_back(memory_platform):
    op = _operator(_rollout(bake_seconds=30), deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute(_context())
    op.on_kill()
    assert memory_platform.weights == {"v1": 100.0}
    assert "killed" in memory_platform.records["ep"]["message"]


def test_a_retry_reattaches_at_the_recorded_step(memory_platform):
    rollout = _rollout(bake_seconds=30)
    with pytest.raises(TaskDeferred):
        _operator(rollout, deferrable=True).execute(_context())
    record = memory_platform.records["ep"]
    record.update(step=1, step_started_at=time.time() - 31, steps=[{"percent": 50, "status": "passed"}])
    memory_platform.weights = {"v1": 0.0, "v2": 100.0}
    _healthy()
    result = _operator(rollout).execute(_context())  # another worker, no memory of the first try
    assert result["state"] == "succeeded" and memory_platform.records["ep"]["attempts"] == 2
    assert [arg for what, arg in memory_platform.calls if what == "set_traffic"] == [{"v2": 50.0, "v1": 50.0}]


def test_auto_rollback_off_leaves_the_split_and_records_it(memory_platform):
    op = _operator(_rollout(bake_seconds=30, auto_rollback=False), deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute(_context())
    with pytest.raises(AirflowFailException, match="auto_rollback=False"):
        op.execute_complete(_context(), {"status": "breach", "step": 0, "message": "breach"})
    assert memory_platform.weights == {"v1": 50.0, "v2": 50.0}
    assert memory_platform.records["ep"]["state"] == "failed"
    assert "left in place" in memory_platform.records["ep"]["message"]


def test_the_first_model_needs_no_walk(memory_platform):
    memory_platform.reset({})
    result = _operator(_rollout()).execute(_context())
    assert result["state"] == "succeeded" and "first model" in result["message"]
    assert memory_platform.calls == []


def test_a_plan_the_platform_cannot_honour_is_refused_before_any_traffic_moves(memory_platform):
    rollout = _rollout()
    rollout["plan"] = RolloutPlan.parse({"strategy": "shadow"}).to_dict()
    with pytest.raises(AirflowFailException, match="cannot mirror traffic"):
        _operator(rollout).execute(_context())
    assert memory_platform.calls == []


# -- registry and names ----------------------------------------------------------------------------------------------
def test_registry_finds_local_by_entry_point_and_explains_missing_ones():
    assert "local" in available_platforms() and "memory" in available_platforms()
    from importlib.metadata import entry_points

    assert {"local", "sagemaker", "vertex", "azureml"} <= {
        ep.name for ep in entry_points(group="airflow_llmops.platforms")
    }
    with pytest.raises(ValueError, match=r"unknown platform 'mainframe'.*entry-point group"):
        get_platform("mainframe")


def test_capabilities_refuse_plans_with_a_reason():
    no_split = PlatformCapabilities(traffic_split=False)
    assert "cannot split traffic" in (no_split.refuse(RolloutPlan.parse({"strategy": "linear"}), "x") or "")
    assert no_split.refuse(RolloutPlan.parse({"strategy": "blue_green"}), "x") is None


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "-x", "x-", "x" * 64, "a b", ".", "a.b", "ümlaut"])
def test_endpoint_names_are_validated(bad):
    with pytest.raises(ValueError, match="endpoint_name"):
        validate_endpoint_name(bad)
    assert validate_endpoint_name("chatterbot-topics") == "chatterbot-topics"


def test_no_concrete_platform_is_imported_outside_platforms():
    concrete = {"airflow_llmops.platforms.local", "airflow_llmops.platforms.local_serving"}
    concrete |= {"airflow_llmops.platforms.localhost"}
    offenders = []
    for path in [*ROOT.joinpath("airflow_llmops").rglob("*.py"), *ROOT.joinpath("dags").glob("*.py")]:
        if "platforms" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in concrete:
                offenders.append(f"{path.relative_to(ROOT)}: {node.module}")
            if isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name in concrete]
    assert offenders == []


# -- guarded deployments (the platform walks and judges; we start, watch and report) ---------------------------------
class GuardedEndpoints(MemoryEndpoints):
    """A platform with its own guarded deployment: ``outcome`` says how the platform's walk ends."""

    name = "guarded"
    capabilities = PlatformCapabilities(traffic_split=True, native_guarded_deployment=True)
    outcome: ClassVar[list[str]] = []

    def start_guarded_deployment(self, handle, *, variant, plan):  # type: ignore[no-untyped-def]
        self._act("start_guarded", (variant, plan.strategy))

    def guarded_deployment_state(self, handle, *, variant):  # type: ignore[no-untyped-def]
        self._act("guarded_state")
        state = self.outcome.pop(0) if len(self.outcome) > 1 else self.outcome[0]
        return state, {"rolled_back": "alarms in ALARM: errors", "succeeded": "done"}.get(state, "walking")


def _guarded(outcome: list[str], **plan: Any) -> dict[str, Any]:
    register_platform("guarded", GuardedEndpoints)
    GuardedEndpoints.outcome = list(outcome)
    parsed = RolloutPlan.parse(
        {"strategy": "canary", "traffic_steps": [10, 100], "bake_seconds": 0, "native_guardrails": True, **plan}
    )
    handle = deployment_platform("guarded").deploy("ep", model_uri="/m/v2", variant="v2", plan=parsed)
    return {
        "platform": "guarded",
        "platform_kwargs": {},
        "handle": handle.to_dict(),
        "plan": parsed.to_dict(),
        "variant": "v2",
        "model_uri": "/m/v2",
        "url": "mem://",
    }


def test_a_guarded_deployment_is_started_once_watched_and_finished(memory_platform):
    result = _operator(_guarded(["in_progress", "in_progress", "succeeded"])).execute(_context())
    assert result["state"] == "succeeded"
    calls = [c[0] for c in MemoryEndpoints.calls]
    assert calls.count("start_guarded") == 1 and "set_traffic" not in calls  # the platform moved the traffic
    assert calls.count("guarded_state") == 3 and calls[-1] == "finish"


def test_a_guarded_deployment_the_platform_rolled_back_fails_the_task_with_its_reason(memory_platform):
    with pytest.raises(AirflowFailException, match=r"alarms in ALARM: errors.*rolled back"):
        _operator(_guarded(["in_progress", "rolled_back"])).execute(_context())
    assert ("rollback", ("v2", {"v1": 100.0})) in MemoryEndpoints.calls  # our cleanup after the platform's
    assert deployment_platform("guarded").get_rollout_record("ep").state == "rolled_back"


def test_a_retry_watches_the_guarded_deployment_it_started(memory_platform):
    rollout = _guarded(["in_progress"])
    with pytest.raises(TaskDeferred):
        _operator(rollout, deferrable=True).execute(_context())
    GuardedEndpoints.outcome = ["succeeded"]
    assert _operator(rollout).execute(_context())["state"] == "succeeded"  # re-attached, not started again
    assert [c[0] for c in MemoryEndpoints.calls].count("start_guarded") == 1


def test_native_guardrails_are_refused_where_the_platform_has_none(memory_platform):
    rollout = _rollout()
    rollout["plan"] = RolloutPlan.parse({"strategy": "blue_green", "native_guardrails": True}).to_dict()
    with pytest.raises(AirflowFailException, match="no guarded deployment of its own"):
        _operator(rollout).execute(_context())
