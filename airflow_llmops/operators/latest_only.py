"""LatestOnlyGateOperator: the steps that change live systems (deploy, rollout) run for the latest interval only.

Airflow's ``LatestOnlyOperator`` (standard provider 1.21, Airflow 3.3.2) lets ``manual`` runs through and sends
every other run type through its time-window check, which passes when "now" lies between the run's interval and
the next one. So a backfilled run of the most recent interval passes (and would deploy), and a run started by
``TriggerDagRunOperator`` (``operator_triggered`` since Airflow 3.3, how ``llmops_retrain`` starts the pipeline)
or by an Asset passes or not depending on the data interval it happened to get. This gate decides by run type
first and says why it skips.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.latest_only import LatestOnlyOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

BACKFILL = "backfill"
SCHEDULED = "scheduled"
#: Run types a person or an event asked for: they always go on.
TRIGGERED = ("manual", "operator_triggered", "asset_triggered", "asset_materialization")


def _run_type(dag_run: Any) -> str:
    value = getattr(dag_run, "run_type", None)
    return str(getattr(value, "value", value) or "")


def _interval(dag_run: Any) -> str:
    start, end = getattr(dag_run, "data_interval_start", None), getattr(dag_run, "data_interval_end", None)
    if start is not None and end is not None:
        # A cron schedule makes point-in-time intervals in Airflow 3 (CronTriggerTimetable): start == end.
        return start.isoformat() if start == end else f"{start.isoformat()} to {end.isoformat()}"
    for name in ("logical_date", "partition_key", "run_after"):
        value = getattr(dag_run, name, None)
        if value is not None:
            return value.isoformat() if hasattr(value, "isoformat") else str(value)
    return str(getattr(dag_run, "run_id", "?"))


class LatestOnlyGateOperator(LatestOnlyOperator):
    """Skip everything downstream (e.g. deploy and rollout) for backfilled runs and for scheduled runs of an
    interval other than the latest; let manual, ``TriggerDagRunOperator`` and Asset-triggered runs through.

    The upstream work (train, evaluate, register) still runs for every interval; the skip is logged with its
    reason, e.g. ``backfilled run for interval 2026-11-20T00:00:00+00:00 to 2026-11-21T00:00:00+00:00: deploy and
    rollout run only for the latest interval and for manual or asset-triggered runs; the model is registered as
    version 3``.

    :param model_version: what the run produced upstream, quoted in the skip message (templated), e.g.
        ``"{{ (ti.xcom_pull(task_ids='register') or {}).get('version', '') }}"``.
    """

    template_fields: Sequence[str] = ("model_version",)
    ui_color = "#e9ffdb"

    def __init__(self, *, model_version: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_version = model_version

    def gated_task_ids(self) -> list[str]:
        """Every task the gate holds back, nearest first."""
        seen: list[str] = []
        frontier = list(self.downstream_list)
        while frontier:
            task = frontier.pop(0)
            if task.task_id not in seen:
                seen.append(task.task_id)
                frontier.extend(task.downstream_list)
        return seen

    def skip_message(self, dag_run: Any) -> str:
        """Why the gated tasks do not run for ``dag_run``."""
        gated = self.gated_task_ids()
        names = " and ".join([", ".join(gated[:-1]), gated[-1]] if len(gated) > 1 else gated) or "nothing"
        which = f"run for interval {_interval(dag_run)}"
        which = f"backfilled {which}" if _run_type(dag_run) == BACKFILL else f"scheduled {which} is not the latest"
        message = f"{which}: {names} run only for the latest interval and for manual or asset-triggered runs"
        if self.model_version not in (None, ""):
            message += f"; the model is registered as version {self.model_version}"
        return message

    def choose_branch(self, context: Context) -> str | Iterable[str]:  # type: ignore[override]
        dag_run = context["dag_run"]
        run_type = _run_type(dag_run)
        downstream = list(self.get_direct_relative_ids(upstream=False))
        if run_type == BACKFILL:
            self.log.info("%s", self.skip_message(dag_run))
            return []
        if run_type in TRIGGERED:
            self.log.info("%s run: %s go on", run_type, ", ".join(self.gated_task_ids()) or "nothing")
            return downstream
        # Scheduled (or a run type this gate does not know): Airflow's check of the latest interval decides.
        chosen = list(super().choose_branch(context))
        if not chosen:
            self.log.info("%s", self.skip_message(dag_run))
        return chosen
