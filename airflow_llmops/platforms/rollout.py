"""Rollout steps and their verdicts, independent of Airflow and of the platform: what traffic each step sets and
whether the new variant's live numbers meet the SLO (and compare well enough with the old variant's)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from airflow_llmops.platforms.base import DeploymentPlatform, EndpointHandle, RolloutRecord, VariantMetrics
from airflow_llmops.specs import SLO, RolloutPlan


@dataclass(frozen=True)
class Verdict:
    """``ok``: True (meets the SLO), False (breach: roll back), None (too few requests to judge yet)."""

    ok: bool | None
    message: str
    new: dict[str, Any]
    old: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numbers(m: VariantMetrics) -> dict[str, Any]:
    return {**m.to_dict(), "error_rate": round(m.error_rate, 4)}


def judge(new: VariantMetrics, old: VariantMetrics | None, slo: SLO) -> Verdict:
    """The new variant against the SLO: error rate and p95 latency, and, with ``max_latency_ratio``, its p95
    against the old variant's. Errors count as soon as they happen (a breach needs no minimum of requests when
    the errors alone exceed what ``min_requests`` would allow); a pass needs ``min_requests``."""
    numbers = _numbers(new)
    old_numbers = _numbers(old) if old else None
    breaches = []
    allowed_errors = slo.max_error_rate * max(new.requests, slo.min_requests)
    if new.errors > allowed_errors:
        breaches.append(
            f"error rate {new.error_rate:.2%} ({new.errors}/{new.requests}) > max_error_rate {slo.max_error_rate:.2%}"
        )
    enough = new.requests >= slo.min_requests  # min_requests=0: judge whatever came, even nothing
    if new.requests and enough and new.p95_latency_ms is not None and new.p95_latency_ms > slo.p95_latency_ms:
        breaches.append(f"p95 latency {new.p95_latency_ms:.1f} ms > {slo.p95_latency_ms:g} ms")
    if (
        enough
        and slo.max_latency_ratio is not None
        and old is not None
        and old.p95_latency_ms
        and new.p95_latency_ms is not None
        and new.p95_latency_ms > slo.max_latency_ratio * old.p95_latency_ms
    ):
        breaches.append(
            f"p95 latency {new.p95_latency_ms:.1f} ms > {slo.max_latency_ratio:g} x the old variant's "
            f"{old.p95_latency_ms:.1f} ms"
        )
    if breaches:
        return Verdict(False, f"{new.variant}: " + "; ".join(breaches), numbers, old_numbers)
    if not enough:
        return Verdict(None, f"{new.variant}: {new.requests}/{slo.min_requests} requests so far", numbers, old_numbers)
    p95 = "-" if new.p95_latency_ms is None else f"{new.p95_latency_ms:.1f} ms"
    return Verdict(
        True,
        f"{new.variant}: {new.requests} requests, error rate {new.error_rate:.2%}, p95 {p95} within the SLO",
        numbers,
        old_numbers,
    )


def step_weights(plan: RolloutPlan, percent: float, new: str, previous: dict[str, float]) -> dict[str, float]:
    """Weights at a step: the new variant ``percent``, the previous ones share the rest as before. A shadow
    rollout leaves the serving weights alone (the shadow's share is its mirror percentage)."""
    if plan.strategy == "shadow":
        return dict(previous)
    total = sum(previous.values()) or 1.0
    rest = 100.0 - percent
    return {new: percent, **{name: rest * weight / total for name, weight in previous.items()}}


def combined(rows: list[VariantMetrics]) -> VariantMetrics | None:
    """The old variants as one (requests and errors summed, the worst p95)."""
    if not rows:
        return None
    p95 = [r.p95_latency_ms for r in rows if r.p95_latency_ms is not None]
    p50 = [r.p50_latency_ms for r in rows if r.p50_latency_ms is not None]
    return VariantMetrics(
        variant="+".join(r.variant for r in rows),
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        p50_latency_ms=max(p50) if p50 else None,
        p95_latency_ms=max(p95) if p95 else None,
    )


# -- pausing a rollout --------------------------------------------------------------------------------------------
DEFAULT_MAX_PAUSE_S = 24 * 3600.0


class RolloutPauseError(ValueError):
    """The rollout cannot be paused or resumed in its state (none in progress, already paused, not paused...)."""


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def active_pause(record: RolloutRecord | None) -> dict[str, Any] | None:
    """The pause holding ``record``'s rollout now (``None``: not paused, or the rollout is over)."""
    if record is None or not record.in_progress or not record.pause:
        return None
    return record.pause if record.pause.get("state") == "paused" else None


def pause_message(pause: dict[str, Any]) -> str:
    return f"paused by {pause.get('by')} at {_iso(float(pause.get('at') or 0))}: {pause.get('reason') or '-'}"


def step_start(record: RolloutRecord) -> float:
    """When the current step's bake began: its traffic was set, or the rollout was resumed after it (a resume
    restarts the bake of the step it held)."""
    assert record.step_started_at is not None
    resumed = record.pause if record.pause and record.pause.get("state") == "resumed" else None
    return max(record.step_started_at, float(resumed["at"])) if resumed else record.step_started_at


def pause_rollout(platform: DeploymentPlatform, endpoint_name: str, *, by: str, reason: str) -> RolloutRecord:
    """Ask the rollout in progress on ``endpoint_name`` to hold its current step: the traffic stays as it is, no
    step is passed and nothing is promoted, but the step is still judged (a breach still rolls back). Written to
    the endpoint's rollout record, where the walk (operator and trigger) reads it at every poll."""
    record = platform.get_rollout_record(endpoint_name)
    if record is None or not record.in_progress:
        state = "no rollout" if record is None else f"its last rollout ended as {record.state}"
        raise RolloutPauseError(f"endpoint {endpoint_name} has {state}: nothing to pause")
    if RolloutPlan.parse(record.plan).native_guardrails:
        raise RolloutPauseError(
            f"endpoint {endpoint_name}: the platform walks this guarded deployment itself; it cannot be paused "
            "(roll it back instead)"
        )
    if active_pause(record):
        raise RolloutPauseError(
            f"the rollout on endpoint {endpoint_name} is already {pause_message(record.pause or {})}"
        )
    now = time.time()
    record.pause = {"state": "paused", "by": by, "at": now, "reason": reason, "step": record.step}
    record.message = pause_message(record.pause)
    platform.put_rollout_record(endpoint_name, record)
    return record


def resume_rollout(platform: DeploymentPlatform, endpoint_name: str, *, by: str) -> RolloutRecord:
    """Let a paused rollout go on: the step it held bakes again from now (its verdict is on the numbers after the
    resume), then the walk continues as planned."""
    record = platform.get_rollout_record(endpoint_name)
    pause = active_pause(record)
    if record is None or pause is None:
        raise RolloutPauseError(f"endpoint {endpoint_name} has no paused rollout: nothing to resume")
    now = time.time()
    record.pause = {
        "state": "resumed",
        "by": by,
        "at": now,
        "paused_by": pause.get("by"),
        "paused_at": pause.get("at"),
        "reason": pause.get("reason"),
        "step": record.step,
    }
    record.message = f"resumed by {by} at {_iso(now)} after a pause of {now - float(pause.get('at') or now):.0f}s"
    platform.put_rollout_record(endpoint_name, record)
    return record


def save_record(platform: DeploymentPlatform, endpoint_name: str, record: RolloutRecord) -> None:
    """The walk's own write of its record: the pause state (and its message, while the rollout is in progress) is
    taken from the stored record, so a pause or resume written since the walk last read it is kept."""
    stored = platform.get_rollout_record(endpoint_name)
    if stored is not None and stored.variant == record.variant and stored.rollout_id == record.rollout_id:
        record.pause = stored.pause
        if record.in_progress:
            record.message = stored.message
    platform.put_rollout_record(endpoint_name, record)


def roll_back(platform: DeploymentPlatform, handle: EndpointHandle, record: RolloutRecord, message: str) -> None:
    """End ``record``'s rollout in the weights from before it (the adapter's ``rollback``: the new variant removed,
    ``record.previous`` serving) and record it as ``rolled_back`` with ``message`` — what a failed step, a killed
    walk and the LLMOps page's action all do."""
    platform.rollback(handle, failed_variant=record.variant, previous=record.previous)
    record.state = "rolled_back"
    record.step_started_at = None
    record.message = message
    save_record(platform, handle.endpoint_name, record)


@dataclass(frozen=True)
class StepCheck:
    """Where one step stands: ``passed`` (baked and within the SLO), ``breach``, ``timeout`` (too little traffic
    to judge by bake + max_wait), ``paused_too_long`` (held by a pause past ``max_pause_s``: rolled back),
    ``paused`` (held: judged, but neither passed nor timed out) or ``wait``."""

    status: str
    step: int
    percent: float
    elapsed_s: float
    verdict: Verdict

    pause: dict[str, Any] | None = None
    max_pause_s: float = DEFAULT_MAX_PAUSE_S

    @property
    def done(self) -> bool:
        return self.status not in ("wait", "paused")

    @property
    def message(self) -> str:
        if self.status == "paused_too_long":
            return (
                f"step {self.percent:g}%: {pause_message(self.pause or {})}; paused longer than "
                f"max_pause_s={self.max_pause_s:g}s"
            )
        if self.status == "paused":
            return f"step {self.percent:g}%: {pause_message(self.pause or {})}; holding ({self.verdict.message})"
        if self.status == "timeout":
            return f"step {self.percent:g}%: too little traffic to judge ({self.verdict.message})"
        return f"step {self.percent:g}%: {self.verdict.message}"

    def to_event(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "step": self.step,
            "percent": self.percent,
            "elapsed_s": round(self.elapsed_s, 1),
            **self.verdict.to_dict(),
            "message": self.message,  # the step's (it says the percentage, a timeout or a pause), not the verdict's
        }


def check_step(
    platform: DeploymentPlatform,
    handle: EndpointHandle,
    record: RolloutRecord,
    plan: RolloutPlan,
    *,
    max_wait_s: float,
    now: float | None = None,
    max_pause_s: float = DEFAULT_MAX_PAUSE_S,
) -> StepCheck:
    """Judge the current step from the endpoint's numbers since the step began, or since the rollout was resumed
    after it began (read-only: safe in a trigger).

    While ``record`` is paused the step is still judged (a breach is a breach) but neither passes nor times out:
    ``paused``, and ``paused_too_long`` once the pause is older than ``max_pause_s``.

    With ``native_guardrails`` the platform walks the steps and judges them on its alarms: the single step here
    passes when its deployment finished and is a breach when it rolled back."""
    assert record.step_started_at is not None, "the step's traffic is not set yet"
    if plan.native_guardrails:
        return _check_guarded(platform, handle, record, plan, max_wait_s=max_wait_s, now=now)
    percent = plan.steps()[record.step]
    old = [name for name in record.previous if name != record.variant]
    start = step_start(record)
    rows = platform.read_metrics(handle, variants=[record.variant, *old], since=start)
    verdict = judge(rows[0], combined(rows[1:]), plan.slo)
    now = time.time() if now is None else now
    elapsed = now - start
    pause = active_pause(record)
    if verdict.ok is False:
        status = "breach"
    elif pause is not None:
        held = now - float(pause.get("at") or now)
        status = "paused_too_long" if held >= max_pause_s else "paused"
        return StepCheck(status, record.step, percent, elapsed, verdict, pause, max_pause_s)
    elif verdict.ok and elapsed >= plan.bake_seconds:
        status = "passed"
    elif elapsed >= plan.bake_seconds + max_wait_s:
        status = "timeout"
    else:
        status = "wait"
    return StepCheck(status, record.step, percent, elapsed, verdict)


def guarded_budget(plan: RolloutPlan) -> float:
    """How long a platform's own guarded deployment may take to walk ``plan`` before we call it stuck."""
    return plan.bake_seconds * (len(plan.steps()) + 1)


def _check_guarded(
    platform: DeploymentPlatform,
    handle: EndpointHandle,
    record: RolloutRecord,
    plan: RolloutPlan,
    *,
    max_wait_s: float,
    now: float | None,
) -> StepCheck:
    from airflow_llmops.platforms.base import GuardedDeploymentPlatform

    assert record.step_started_at is not None
    if not isinstance(platform, GuardedDeploymentPlatform):
        raise TypeError(f"platform {platform.name!r} has no guarded deployment")
    state, message = platform.guarded_deployment_state(handle, variant=record.variant)
    elapsed = (time.time() if now is None else now) - record.step_started_at
    status = {"succeeded": "passed", "rolled_back": "breach"}.get(state, "wait")
    if status == "wait" and elapsed >= guarded_budget(plan) + max_wait_s:
        status = "timeout"
        message = f"{message}; still not finished after {elapsed:.0f}s"
    ok = {"passed": True, "breach": False}.get(status)
    verdict = Verdict(ok, message, {"variant": record.variant, "guarded": state}, None)
    return StepCheck(status, record.step, 100.0, elapsed, verdict)
