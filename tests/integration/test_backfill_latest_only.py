"""A backfill of the pipeline must not roll each past interval's model out to the live endpoint in turn.

``airflow backfill create`` makes real backfill runs (run_type ``backfill``, with a backfill id) in the metadata
database; Airflow's scheduler would then run them. Here ``dag.test()`` runs each of those runs in this process
instead of a manual run of its own (its ``get_or_create_dagrun`` hands it the run we pick), so the gate sees
exactly the run a scheduler would give it. Stand-in tasks keep every run cheap; the gate is the real operator.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TODAY = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
# Three past days, well before the latest interval.
BACKFILL = [TODAY - timedelta(days=d) for d in (10, 9, 8)]
REASON = "deploy and rollout run only for the latest interval and for manual or asset-triggered runs"


def _load(dag_id: str, attr: str):
    from dags_under_test import load_dag

    return load_dag(dag_id, folder="tests/dags", module="llmops_test_latest_only", attr=attr)


def _run_as(dag, make_run: Callable[[Any, Any], Any], logical_date: datetime, monkeypatch):
    """``dag.test()`` on the DagRun ``make_run(scheduler_dag, session)`` returns, not on a new manual run."""
    import airflow.models.dagrun as dagrun_module

    def hand_over(*, dag: Any, session: Any, **_: Any) -> Any:
        run = make_run(dag, session)
        run.dag = dag
        return run

    with monkeypatch.context() as patch:
        patch.setattr(dagrun_module, "get_or_create_dagrun", hand_over)
        return dag.test(logical_date=logical_date)


def _existing_run(logical_date: datetime) -> Callable[[Any, Any], Any]:
    """The queued run that ``airflow backfill create`` made for ``logical_date``, started as a scheduler would."""

    def make(dag: Any, session: Any) -> Any:
        from airflow.models.dagrun import DagRun
        from airflow.utils.state import DagRunState
        from sqlalchemy import select

        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.logical_date == logical_date))
        assert run is not None, f"no run of {dag.dag_id} at {logical_date}"
        run.set_state(DagRunState.RUNNING)
        session.commit()
        return run

    return make


def _scheduled(dag, earliest: datetime | None = None):
    """The run info the scheduler computes: with ``earliest``, the first run from then on (as under catchup);
    without, the latest one due now (the run ``catchup=False`` makes)."""
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import TimeRestriction

    restriction = TimeRestriction(earliest=earliest, latest=None, catchup=earliest is not None)
    info = coerce_to_core_timetable(dag.timetable).next_dagrun_info(
        last_automated_data_interval=None, restriction=restriction
    )
    assert info is not None and info.logical_date is not None
    return info


def _scheduled_run(info: Any) -> Callable[[Any, Any], Any]:
    """The run the scheduler makes from the timetable's ``info``."""

    def make(dag: Any, session: Any) -> Any:
        from airflow.models.dagrun import DagRun
        from airflow.utils.state import DagRunState
        from airflow.utils.types import DagRunTriggeredByType, DagRunType

        return dag.create_dagrun(
            run_id=DagRun.generate_run_id(
                run_type=DagRunType.SCHEDULED, logical_date=info.logical_date, run_after=info.run_after
            ),
            logical_date=info.logical_date,
            data_interval=info.data_interval,
            run_after=info.run_after,
            run_type=DagRunType.SCHEDULED,
            triggered_by=DagRunTriggeredByType.TIMETABLE,
            state=DagRunState.RUNNING,
            start_date=datetime.now(timezone.utc),
            session=session,
        )

    return make


def _backfill(dag_id: str, first: datetime, last: datetime) -> None:
    """``airflow backfill create``, as a user would run it (it only records the runs; a scheduler runs them)."""
    airflow = Path(sys.executable).with_name("airflow")
    argv = [str(airflow), "backfill", "create", "--dag-id", dag_id]
    argv += ["--from-date", first.isoformat(), "--to-date", last.isoformat(), "--max-active-runs", "3"]
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy(), timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _states(run) -> dict[str, str | None]:
    return {
        ti.task_id: (str(getattr(ti.state, "value", ti.state)) if ti.state else None) for ti in run.get_task_instances()
    }


def _runs_of(dag_id: str) -> dict[datetime, Any]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)).all()
        return {r.logical_date: SimpleNamespace(run_type=str(r.run_type), backfill_id=r.backfill_id) for r in runs}


@pytest.fixture(scope="module")
def manual_run(airflow_db):
    """A manual run of the gated DAG (it also writes the test DAGs to the metadata database, which a backfill
    needs)."""
    run = _load("llmops_test_latest_only", "gated_dag").test()
    return run


def test_manual_run_deploys(manual_run):
    assert str(manual_run.run_type) == "manual"
    assert _states(manual_run) == {
        "register": "success",
        "latest_only": "success",
        "deploy": "success",
        "rollout": "success",
    }


def test_backfill_stops_after_register_and_says_why_while_the_latest_interval_deploys(manual_run, monkeypatch, capfd):
    dag = _load("llmops_test_latest_only", "gated_dag")
    _backfill(dag.dag_id, BACKFILL[0], BACKFILL[-1])
    recorded = _runs_of(dag.dag_id)
    for day in BACKFILL:
        assert recorded[day].run_type == "backfill" and recorded[day].backfill_id is not None, recorded

    capfd.readouterr()
    for day in BACKFILL:
        run = _run_as(dag, _existing_run(day), day, monkeypatch)
        log = "".join(capfd.readouterr())
        assert str(run.run_type) == "backfill"
        assert _states(run) == {
            "register": "success",
            "latest_only": "success",
            "deploy": "skipped",
            "rollout": "skipped",
        }, (day, log[-3000:])
        # "@daily" in Airflow 3 is a CronTriggerTimetable: point-in-time intervals, logged as one time.
        expected = (
            f"backfilled run for interval {day.isoformat()}: {REASON}; the model is registered as version {day.day}"
        )
        assert expected in log, log[-3000:]
        assert "deploying version" not in log

    # The run a scheduler makes now, for the latest interval (with "@daily", Airflow 3's CronTriggerTimetable:
    # today 00:00, a point-in-time interval).
    info = _scheduled(dag, earliest=TODAY)  # today's run: the timetable's first from today on
    assert info.logical_date == TODAY, info
    latest = _run_as(dag, _scheduled_run(info), info.logical_date, monkeypatch)
    log = "".join(capfd.readouterr())
    assert str(latest.run_type) == "scheduled"
    assert _states(latest)["deploy"] == "success" and _states(latest)["rollout"] == "success", log[-3000:]
    assert f"deploying version {info.logical_date.day}" in log


def test_an_older_scheduled_interval_does_not_deploy(manual_run, monkeypatch, capfd):
    dag = _load("llmops_test_latest_only", "gated_dag")
    info = _scheduled(dag, earliest=TODAY - timedelta(days=3))
    capfd.readouterr()
    run = _run_as(dag, _scheduled_run(info), info.logical_date, monkeypatch)
    log = "".join(capfd.readouterr())
    assert _states(run)["deploy"] == "skipped" and _states(run)["rollout"] == "skipped", log[-3000:]
    assert f"scheduled run for interval {info.logical_date.isoformat()}" in log and "is not the latest" in log


def test_without_the_gate_a_backfill_would_deploy(manual_run, monkeypatch, capfd):
    """The harness is not vacuous: the same tail without ``latest_only`` deploys a backfilled interval."""
    dag = _load("llmops_test_no_gate", "ungated_dag")
    day = BACKFILL[0]
    _backfill(dag.dag_id, day, day)
    capfd.readouterr()
    run = _run_as(dag, _existing_run(day), day, monkeypatch)
    log = "".join(capfd.readouterr())
    assert str(run.run_type) == "backfill"
    assert _states(run)["deploy"] == "success", log[-3000:]
    assert f"deploying version {day.day}" in log


@pytest.mark.parametrize("run_type", ["manual", "operator_triggered", "asset_triggered"])
def test_triggered_runs_go_on_whatever_their_interval(run_type):
    """Airflow's LatestOnlyOperator lets only ``manual`` through unconditionally; a retrain started by
    TriggerDagRunOperator (``operator_triggered``) or an Asset must deploy too."""
    dag = _load("llmops_test_latest_only", "gated_dag")
    gate = dag.get_task("latest_only")
    old = TODAY - timedelta(days=30)
    dag_run = SimpleNamespace(
        run_type=run_type,
        data_interval_start=old,
        data_interval_end=old + timedelta(days=1),
        logical_date=old,
        run_after=old,
        run_id="r",
    )
    assert gate.choose_branch({"dag_run": dag_run}) == ["deploy"]


def test_the_reference_pipeline_is_gated_between_register_and_deploy():
    from dags_under_test import load_dag

    dag = load_dag("llmops_local")
    gate = dag.get_task("latest_only")
    assert type(gate).__name__ == "LatestOnlyGateOperator"
    assert gate.upstream_task_ids == {"register"} and gate.downstream_task_ids == {"deploy"}
    assert dag.get_task("deploy").upstream_task_ids == {"latest_only"}
    assert gate.gated_task_ids() == ["deploy", "rollout"]
