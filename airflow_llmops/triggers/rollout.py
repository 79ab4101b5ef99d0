"""RolloutTrigger: walk a rollout plan's steps on an endpoint, judge each from live metrics, roll back on a breach."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_llmops.platforms.base import EndpointHandle, VariantMetrics


def _combined(rows: list[VariantMetrics]) -> VariantMetrics | None:
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


async def run_rollout(
    platform_kwargs: dict[str, Any],
    handle_data: dict[str, Any],
    plan_data: dict[str, Any],
    *,
    poll_interval: float = 5.0,
    max_wait_s: float = 600.0,
) -> dict[str, Any]:
    """Every step of the plan: set the traffic, bake, judge. Returns the outcome (``succeeded``,
    ``rolled_back`` or ``failed``) with the numbers of each step; blocking client calls run in threads."""
    from airflow_llmops.platforms.local_serving import LocalEndpoints
    from airflow_llmops.platforms.rollout import judge, step_weights
    from airflow_llmops.specs import RolloutPlan

    platform = LocalEndpoints(**platform_kwargs)
    handle = EndpointHandle.from_dict(handle_data)
    plan = RolloutPlan.parse(plan_data)
    new = str(handle.extra["variant"])
    previous = {str(k): float(v) for k, v in (handle.extra.get("previous") or {}).items()}
    steps: list[dict[str, Any]] = []

    async def fail(message: str, state: str) -> dict[str, Any]:
        if plan.auto_rollback:
            await asyncio.to_thread(platform.rollback, handle, failed_variant=new)
            message += f"; rolled back: {new} removed, {sorted(previous)} serving as before"
            state = "rolled_back"
        return {"state": state, "message": message, "steps": steps, "variant": new}

    if not previous:
        # The endpoint's first model took all traffic when it loaded: there is no other version to protect or to
        # compare with, and no traffic to judge before it is announced.
        message = f"{new}: first model of endpoint {handle.endpoint_name}, serving all traffic"
        return {"state": "succeeded", "message": message, "steps": [], "variant": new}
    for percent in plan.steps():
        await asyncio.to_thread(platform.set_traffic, handle, step_weights(plan, percent, new, previous))
        started = time.time()
        while True:
            await asyncio.sleep(poll_interval)
            rows = await asyncio.to_thread(platform.read_metrics, handle, variants=[new, *previous], since=started)
            verdict = judge(rows[0], _combined(rows[1:]), plan.slo)
            elapsed = time.time() - started
            if verdict.ok is False:
                steps.append({"percent": percent, "elapsed_s": round(elapsed, 1), **verdict.to_dict()})
                return await fail(f"step {percent:g}%: {verdict.message}", "failed")
            if verdict.ok and elapsed >= plan.bake_seconds:
                steps.append({"percent": percent, "elapsed_s": round(elapsed, 1), **verdict.to_dict()})
                break
            if elapsed >= plan.bake_seconds + max_wait_s:
                steps.append({"percent": percent, "elapsed_s": round(elapsed, 1), **verdict.to_dict()})
                return await fail(f"step {percent:g}%: too little traffic to judge ({verdict.message})", "failed")
    await asyncio.to_thread(platform.finish, handle, new_variant=new, keep_new=plan.strategy != "shadow")
    return {"state": "succeeded", "message": f"{new}: every step met the SLO", "steps": steps, "variant": new}


class RolloutTrigger(BaseTrigger):
    """Runs :func:`run_rollout` in the triggerer and fires once with its outcome."""

    def __init__(
        self,
        *,
        platform_kwargs: dict[str, Any],
        handle: dict[str, Any],
        plan: dict[str, Any],
        poll_interval: float = 5.0,
        max_wait_s: float = 600.0,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.platform_kwargs = platform_kwargs
        self.handle = handle
        self.plan = plan
        self.poll_interval = poll_interval
        self.max_wait_s = max_wait_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "platform_kwargs": self.platform_kwargs,
                "handle": self.handle,
                "plan": self.plan,
                "poll_interval": self.poll_interval,
                "max_wait_s": self.max_wait_s,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            outcome = await run_rollout(
                self.platform_kwargs,
                self.handle,
                self.plan,
                poll_interval=self.poll_interval,
                max_wait_s=self.max_wait_s,
            )
        except Exception as err:  # the sensor turns it into a task failure with the message
            outcome = {"state": "error", "message": f"{type(err).__name__}: {err}", "steps": []}
        yield TriggerEvent(outcome)  # type: ignore[no-untyped-call]
