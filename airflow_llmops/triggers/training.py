"""TrainingJobTrigger: poll any platform's training job from the triggerer until it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_llmops.platforms.base import JobHandle, JobStatus


def progress_line(status: JobStatus) -> str:
    """``step 120/400 (30%) loss 0.4123 tokens/s 10,512 ETA 2m05s``: what the task log shows while training."""
    parts = []
    if status.progress is not None:
        parts.append(f"{status.progress:.0%} done")
    metrics = status.metrics
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "tokens_per_s" in metrics:
        parts.append(f"tokens/s {metrics['tokens_per_s']:,.0f}")
    if "eta_s" in metrics:
        minutes, seconds = divmod(int(metrics["eta_s"]), 60)
        parts.append(f"ETA {minutes}m{seconds:02d}s")
    return ", ".join(parts) or status.state.value


class TrainingJobTrigger(BaseTrigger):
    """Fires once the job reaches a terminal state (or ``timeout`` seconds pass).

    Holds no state beyond its arguments, so it survives a triggerer restart: the platform is rebuilt from
    ``platform`` and ``platform_kwargs`` and the job found again from ``handle``.
    """

    def __init__(
        self,
        *,
        platform: str,
        platform_kwargs: dict[str, Any],
        handle: dict[str, Any],
        poll_interval: float = 10.0,
        timeout: float | None = None,
        started_at: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.platform = platform
        self.platform_kwargs = platform_kwargs
        self.handle = handle
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.started_at = started_at if started_at is not None else time.time()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "platform": self.platform,
                "platform_kwargs": self.platform_kwargs,
                "handle": self.handle,
                "poll_interval": self.poll_interval,
                "timeout": self.timeout,
                "started_at": self.started_at,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_llmops.platforms import get_platform

        platform = get_platform(self.platform, **self.platform_kwargs)
        handle = JobHandle.from_dict(self.handle)
        while True:
            status = await asyncio.to_thread(platform.get_training_status, handle)
            if status.state.is_terminal:
                yield TriggerEvent(  # type: ignore[no-untyped-call]
                    {"status": status.to_dict(), "handle": self.handle}
                )
                return
            self.log.info("%s: %s", handle.job_name, progress_line(status))
            if self.timeout is not None and time.time() - self.started_at > self.timeout:
                yield TriggerEvent(  # type: ignore[no-untyped-call]
                    {
                        "status": {"state": "timeout", "message": f"no result after {self.timeout:.0f}s"},
                        "handle": self.handle,
                    }
                )
                return
            await asyncio.sleep(self.poll_interval)
