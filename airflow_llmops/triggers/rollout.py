"""RolloutStepTrigger: watch one rollout step's live numbers for its bake period and fire with the verdict.

The trigger only waits and judges; it never changes traffic (the operator does that in the worker, with Airflow's
retries). It holds no state beyond its arguments: a restarted triggerer rebuilds it, reads the same numbers since
the same step start, and reaches the same verdict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)


async def watch_step(
    platform_name: str,
    platform_kwargs: dict[str, Any],
    handle_data: dict[str, Any],
    record_data: dict[str, Any],
    *,
    poll_interval: float = 5.0,
    max_wait_s: float = 600.0,
    max_read_errors: int = 3,
    max_pause_s: float | None = None,
) -> dict[str, Any]:
    """Poll the step until it passes, breaches or times out; an endpoint that changed under the step, or
    ``max_read_errors`` failed reads in a row, end it with status ``error``. Blocking calls run in threads.

    Each poll reads the endpoint's rollout record again: a pause requested there holds the step (status
    ``paused`` is not an answer; ``paused_too_long`` is), and a rollout ended by someone else (rolled back from the
    LLMOps page) ends the wait with status ``ended``."""
    from airflow_llmops.platforms import EndpointChangedError, EndpointHandle, RolloutRecord, deployment_platform
    from airflow_llmops.platforms.rollout import DEFAULT_MAX_PAUSE_S, check_step
    from airflow_llmops.specs import RolloutPlan

    platform = deployment_platform(platform_name, **platform_kwargs)
    handle = EndpointHandle.from_dict(handle_data)
    record = RolloutRecord.from_dict(record_data)
    plan = RolloutPlan.parse(record.plan)
    limit = DEFAULT_MAX_PAUSE_S if max_pause_s is None else max_pause_s
    errors = 0
    held = False
    while True:
        # Wait first: the operator checked just before deferring, and a trigger that fires at once races the
        # scheduler (apache/airflow#71580).
        await asyncio.sleep(poll_interval)
        try:
            stored = await asyncio.to_thread(platform.get_rollout_record, handle.endpoint_name)
            if stored is None or stored.rollout_id != record.rollout_id or not stored.in_progress:
                state = "gone" if stored is None else stored.state
                return {"status": "ended", "step": record.step, "message": f"the rollout record says {state}"}
            record.pause = stored.pause
            check = await asyncio.to_thread(
                check_step, platform, handle, record, plan, max_wait_s=max_wait_s, max_pause_s=limit
            )
        except EndpointChangedError as err:
            return {"status": "error", "step": record.step, "message": str(err)}
        except Exception as err:  # a read that failed: the endpoint may be restarting; give it a few polls
            errors += 1
            if errors >= max_read_errors:
                return {
                    "status": "error",
                    "step": record.step,
                    "message": f"reading the endpoint's metrics failed {errors} times in a row: "
                    f"{type(err).__name__}: {err}",
                }
        else:
            errors = 0
            if check.done:
                return check.to_event()
            if (check.status == "paused") != held:
                held = check.status == "paused"
                log.info(
                    "Rollout of %s: %s", record.variant, check.message if held else "resumed; the step bakes again"
                )


class RolloutStepTrigger(BaseTrigger):
    """Fires once with the step's verdict (``passed``, ``breach``, ``timeout`` or ``error``)."""

    def __init__(
        self,
        *,
        platform: str,
        platform_kwargs: dict[str, Any],
        handle: dict[str, Any],
        record: dict[str, Any],
        poll_interval: float = 5.0,
        max_wait_s: float = 600.0,
        max_read_errors: int = 3,
        max_pause_s: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.max_pause_s = max_pause_s
        self.platform = platform
        self.platform_kwargs = platform_kwargs
        self.handle = handle
        self.record = record
        self.poll_interval = poll_interval
        self.max_wait_s = max_wait_s
        self.max_read_errors = max_read_errors

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "platform": self.platform,
                "platform_kwargs": self.platform_kwargs,
                "handle": self.handle,
                "record": self.record,
                "poll_interval": self.poll_interval,
                "max_wait_s": self.max_wait_s,
                "max_read_errors": self.max_read_errors,
                "max_pause_s": self.max_pause_s,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await self.first_event())  # type: ignore[no-untyped-call]

    async def first_event(self) -> dict[str, Any]:
        """The verdict this trigger fires with (the operator awaits it directly when it does not defer)."""
        try:
            return await watch_step(
                self.platform,
                self.platform_kwargs,
                self.handle,
                self.record,
                poll_interval=self.poll_interval,
                max_wait_s=self.max_wait_s,
                max_read_errors=self.max_read_errors,
                max_pause_s=self.max_pause_s,
            )
        except Exception as err:  # the operator turns it into a rollback with the message
            return {"status": "error", "step": self.record.get("step"), "message": f"{type(err).__name__}: {err}"}
