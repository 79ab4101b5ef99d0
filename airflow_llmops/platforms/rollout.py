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


@dataclass(frozen=True)
class StepCheck:
    """Where one step stands: ``passed`` (baked and within the SLO), ``breach``, ``timeout`` (too little traffic
    to judge by bake + max_wait) or ``wait``."""

    status: str
    step: int
    percent: float
    elapsed_s: float
    verdict: Verdict

    @property
    def done(self) -> bool:
        return self.status != "wait"

    @property
    def message(self) -> str:
        if self.status == "timeout":
            return f"step {self.percent:g}%: too little traffic to judge ({self.verdict.message})"
        return f"step {self.percent:g}%: {self.verdict.message}"

    def to_event(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "step": self.step,
            "percent": self.percent,
            "elapsed_s": round(self.elapsed_s, 1),
            "message": self.message,
            **self.verdict.to_dict(),
        }


def check_step(
    platform: DeploymentPlatform,
    handle: EndpointHandle,
    record: RolloutRecord,
    plan: RolloutPlan,
    *,
    max_wait_s: float,
    now: float | None = None,
) -> StepCheck:
    """Judge the current step from the endpoint's numbers since the step began (read-only: safe in a trigger).

    With ``native_guardrails`` the platform walks the steps and judges them on its alarms: the single step here
    passes when its deployment finished and is a breach when it rolled back."""
    assert record.step_started_at is not None, "the step's traffic is not set yet"
    if plan.native_guardrails:
        return _check_guarded(platform, handle, record, plan, max_wait_s=max_wait_s, now=now)
    percent = plan.steps()[record.step]
    old = [name for name in record.previous if name != record.variant]
    rows = platform.read_metrics(handle, variants=[record.variant, *old], since=record.step_started_at)
    verdict = judge(rows[0], combined(rows[1:]), plan.slo)
    elapsed = (time.time() if now is None else now) - record.step_started_at
    if verdict.ok is False:
        status = "breach"
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
