"""RolloutHealthSensor: move traffic step by step to the new variant, judge each step live, roll back on a breach."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseSensorOperator, conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.operators.training import default_mlflow_tracking_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class RolloutHealthSensor(BaseSensorOperator):
    """Walk the rollout that :class:`~airflow_llmops.operators.deploy.DeployModelOperator` started.

    At each step of the plan (e.g. canary 10 → 50 → 100 %) the new variant gets its share, bakes for
    ``bake_seconds`` and is judged from the endpoint's metrics over that step against the SLO (p95 latency, error
    rate, optionally its p95 against the old variant's) once ``min_requests`` have arrived. A breach restores the
    old weights, removes the new variant and fails the task with the numbers that breached; success leaves the new
    variant serving alone and, for a registry version, moves its ``champion`` alias (recorded, and emitted on the
    task's outlets). ``deferrable=True`` runs the walk in the triggerer.

    :param rollout: the deploy task's return value (templated), e.g.
        ``"{{ ti.xcom_pull(task_ids='deploy') }}"``.
    :param max_wait_s: how long a step may wait, past its bake time, for ``min_requests``.
    """

    template_fields: Sequence[str] = ("rollout",)
    ui_color = "#f3e5f5"

    def __init__(
        self,
        *,
        rollout: Mapping[str, Any] | str,
        poll_interval: float = 5.0,
        max_wait_s: float = 600.0,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        mlflow_tracking_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poll_interval, **kwargs)
        self.rollout = rollout
        self.poll_interval = poll_interval
        self.max_wait_s = max_wait_s
        self.deferrable = deferrable
        self.mlflow_tracking_uri = mlflow_tracking_uri

    def _rollout(self) -> dict[str, Any]:
        if not isinstance(self.rollout, Mapping) or "handle" not in self.rollout:
            raise AirflowFailException(f"{self.task_id}: rollout must be the deploy task's XCom, got {self.rollout!r}")
        return dict(self.rollout)

    def execute(self, context: Context) -> Any:
        rollout = self._rollout()
        args = (rollout["platform_kwargs"], rollout["handle"], rollout["plan"])
        if self.deferrable:
            from airflow_llmops.triggers.rollout import RolloutTrigger

            self.defer(
                trigger=RolloutTrigger(
                    platform_kwargs=args[0],
                    handle=args[1],
                    plan=args[2],
                    poll_interval=self.poll_interval,
                    max_wait_s=self.max_wait_s,
                ),
                method_name="execute_complete",
            )
        from airflow_llmops.triggers.rollout import run_rollout

        outcome = asyncio.run(run_rollout(*args, poll_interval=self.poll_interval, max_wait_s=self.max_wait_s))
        return self.execute_complete(context, outcome)

    def poke(self, context: Context) -> bool:  # execute() drives the rollout; kept for the sensor interface
        return True

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        rollout = self._rollout()
        for step in event.get("steps", []):
            self.log.info("step %s%%: %s", step.get("percent"), step.get("message"))
        if event.get("state") != "succeeded":
            raise AirflowFailException(f"{self.task_id}: rollout {event.get('state')}: {event.get('message')}")
        result = {**event, "url": rollout.get("url"), "model_uri": rollout.get("model_uri")}
        plan = rollout["plan"]
        match = _VERSION.match(str(rollout.get("model_uri")))
        if match and plan.get("promote_on_success", True) and plan.get("strategy") != "shadow":
            result["promoted"] = self._promote(context, match["name"], match["version"])
        self.log.info("Rollout of %s succeeded: %s", rollout.get("variant"), event.get("message"))
        return result

    def _promote(self, context: Context, name: str, version: str) -> dict[str, Any]:
        from airflow_llmops.ml import registry

        tracking = self.mlflow_tracking_uri or default_mlflow_tracking_uri()
        reason = f"rolled out by {context['dag'].dag_id}/{context['run_id']}"
        if registry.current_version(name, "champion", tracking_uri=tracking) == version:
            record: dict[str, Any] = {"alias": "champion", "version": version, "previous": version}
        else:
            record = registry.move_alias(name, "champion", version, tracking_uri=tracking, reason=reason)
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = {"model": name, **record}
        self.log.info("%s@champion -> version %s", name, version)
        return record
