"""Rollout plan and service-level objectives for putting a model version behind an endpoint."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec

Strategy = Literal["all_at_once", "blue_green", "canary", "linear", "shadow"]


class SLO(Spec):
    """What the new variant must meet at every rollout step to go on."""

    p95_latency_ms: float = Field(default=500.0, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    min_requests: int = Field(default=20, ge=0, description="a step is judged only after this many requests")
    max_latency_ratio: float | None = Field(
        default=None, gt=0, description="new p95 may be at most this multiple of the old variant's p95"
    )


class AutoscalingSpec(Spec):
    """Instances follow the load: between ``min_instances`` and ``max_instances``, aiming at
    ``target_invocations_per_instance`` requests per instance per minute (SageMaker's target-tracking metric)."""

    min_instances: int = Field(default=1, ge=1, le=1000)
    max_instances: int = Field(default=2, ge=1, le=1000)
    target_invocations_per_instance: float = Field(default=100.0, gt=0, description="SageMaker's target")
    target_cpu_percent: int | None = Field(default=None, ge=1, le=100, description="Vertex AI's CPU target")
    scale_in_cooldown_s: int = Field(default=300, ge=0)
    scale_out_cooldown_s: int = Field(default=60, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.max_instances < self.min_instances:
            raise ValueError(f"max_instances {self.max_instances} is below min_instances {self.min_instances}")
        return self


class RolloutPlan(Spec):
    """How traffic moves from the serving version to the new one.

    ``native_guardrails`` hands the walk to the platform's own guarded deployment (SageMaker blue/green with alarm
    rollback, alarms made from ``slo``); the rollout then watches it and reports the same verdicts. ``autoscaling``
    makes the new version's instances follow the load where the platform can.

    ``traffic_steps`` are the new variant's percentages (``canary``: e.g. ``[10, 50, 100]``; ``linear``: built
    from ``linear_step_percent`` when empty). ``shadow`` mirrors ``shadow_percent`` of the traffic to the new
    variant without returning its answers. Each step bakes for ``bake_seconds`` and is judged against ``slo``.
    """

    strategy: Strategy = "canary"
    traffic_steps: list[float] = Field(default_factory=list)
    linear_step_percent: float = Field(default=25.0, gt=0, le=100)
    bake_seconds: float = Field(default=60.0, ge=0)
    shadow_percent: float = Field(default=100.0, gt=0, le=100)
    slo: SLO = Field(default_factory=SLO)
    auto_rollback: bool = True
    promote_on_success: bool = True
    native_guardrails: bool = False
    autoscaling: AutoscalingSpec | None = None

    @model_validator(mode="after")
    def _steps_fit_strategy(self) -> Self:
        steps = self.traffic_steps
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"traffic_steps must lie in (0, 100], got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"traffic_steps must increase strictly, got {steps}")
        if self.strategy == "canary":
            if not steps:
                raise ValueError("strategy 'canary' needs traffic_steps, e.g. [10, 50, 100]")
            if steps[-1] != 100:
                raise ValueError(f"canary traffic_steps must end at 100, got {steps}")
        elif self.strategy in ("all_at_once", "blue_green", "shadow") and steps:
            raise ValueError(f"strategy {self.strategy!r} takes no traffic_steps, got {steps}")
        elif self.strategy == "linear" and steps and steps[-1] != 100:
            raise ValueError(f"linear traffic_steps must end at 100, got {steps}")
        if self.native_guardrails and not self.auto_rollback:
            raise ValueError("native_guardrails always roll back on an alarm; auto_rollback=False cannot hold there")
        return self

    def steps(self) -> list[float]:
        """The new variant's traffic share at each step, in percent (shadow: the mirrored share)."""
        if self.strategy == "canary":
            return list(self.traffic_steps)
        if self.strategy == "linear":
            if self.traffic_steps:
                return list(self.traffic_steps)
            out: list[float] = []
            share = 0.0
            while share < 100:
                share = min(100.0, share + self.linear_step_percent)
                out.append(round(share, 6))
            return out
        if self.strategy == "shadow":
            return [self.shadow_percent]
        return [100.0]
