"""The demo's failure reporting, without an Airflow: a fake of the REST client (the HTTP boundary) plays the runs.

A failed step names the run, the failed task and where its log is, and the demo exits non-zero without a Python
traceback (``LLMOPS_DEBUG=1`` lets it through). The retrain run's asset events are read only once the run has
started: Airflow 3.3.2 answers HTTP 500 for them while the run is queued (apache/airflow#71360).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_llmops.devstack import demo as demo_module
from airflow_llmops.devstack import demo_drift
from airflow_llmops.devstack.airflow_api import AirflowAPIError

BASE = "http://127.0.0.1:8080"
RUN = "manual__2026-11-26T11:20:02+00:00"


class FakeAirflow:
    """Answers like AirflowClient; ``states[(dag, run)]`` is the sequence of run states ``get_run`` reports (the
    last one repeats), ``tis[(dag, run)]`` the task instances."""

    base_url = BASE

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.tis: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.xcoms: dict[tuple[str, str, str, str], Any] = {}
        self.dag_runs: dict[str, list[dict[str, Any]]] = {}
        self.events: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.triggered: list[str] = []
        self.event_reads_before_start = 0
        self.fail_get_run: AirflowAPIError | None = None

    # -- AirflowClient's surface ---------------------------------------------------------------------------------
    def wait_for_dag(self, dag_id: str, *, timeout: float = 180.0) -> dict[str, Any]:
        return {"dag_id": dag_id}

    def unpause(self, dag_id: str) -> None:
        return None

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        self.triggered.append(dag_id)
        return RUN

    def runs(self, dag_id: str, *, limit: int = 20) -> list[dict[str, Any]]:
        return list(self.dag_runs.get(dag_id, []))

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        if self.fail_get_run is not None:
            raise self.fail_get_run
        sequence = self.states[(dag_id, run_id)]
        return sequence.pop(0) if len(sequence) > 1 else sequence[0]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return list(self.tis.get((dag_id, run_id), []))

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", *, missing_ok: bool = False
    ) -> Any:
        if (dag_id, run_id, task_id, key) in self.xcoms:
            return self.xcoms[(dag_id, run_id, task_id, key)]
        if missing_ok:
            return None
        raise AirflowAPIError("GET", f"{BASE}/xcom", 404, "not found")

    def upstream_asset_events(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        run = self.states[(dag_id, run_id)][0]
        if not run.get("start_date"):
            # What Airflow 3.3.2 does while a run created by the event is queued.
            self.event_reads_before_start += 1
            raise AirflowAPIError("GET", f"{BASE}/upstreamAssetEvents", 500, "Internal Server Error")
        return self.events[(dag_id, run_id)]


def _ti(task_id: str, state: str | None, try_number: int = 1, max_tries: int = 0) -> dict[str, Any]:
    return {"task_id": task_id, "state": state, "try_number": try_number, "max_tries": max_tries, "map_index": -1}


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(demo_drift.time, "sleep", lambda _s: None)


@pytest.fixture
def failed_pipeline() -> FakeAirflow:
    fake = FakeAirflow()
    fake.states[("llmops_local", RUN)] = [{"state": "running", "start_date": "x"}, {"state": "failed"}]
    fake.tis[("llmops_local", RUN)] = [
        _ti("plan", "success"),
        _ti("prepare", "success"),
        _ti("train", "failed", try_number=3, max_tries=2),
        _ti("quantize", "upstream_failed", try_number=0),
        _ti("evaluate", "upstream_failed", try_number=0),
    ]
    return fake


def test_a_failed_run_names_the_failed_task_and_where_its_log_is(failed_pipeline, tmp_path, capsys):
    log_file = tmp_path / "dag_id=llmops_local" / f"run_id={RUN}" / "task_id=train" / "attempt=3.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("ValueError: a batch too large for memory\n")

    state = demo_drift.follow(failed_pipeline, "llmops_local", RUN, timeout=60)
    lines = demo_drift.explain_run(failed_pipeline, "llmops_local", RUN, state, log_root=tmp_path)

    assert state == "failed"
    report = "\n".join(lines)
    assert f"!! llmops_local run {RUN}: failed" in report
    assert "failed task" in report and "train (try 3 of 3)" in report
    assert f"log file                {log_file}" in report
    quoted = "manual__2026-11-26T11%3A20%3A02%2B00%3A00"
    assert f"{BASE}/api/v2/dags/llmops_local/dagRuns/{quoted}/taskInstances/train/logs/3" in report
    assert f"{BASE}/dags/llmops_local/runs/{quoted}/tasks/train" in report
    assert "not run (upstream failed) quantize, evaluate" in report
    assert "prepare" not in report  # succeeded tasks are not blamed


def test_a_run_that_does_not_finish_names_its_unfinished_tasks(tmp_path):
    fake = FakeAirflow()
    fake.states[("llmops_local", RUN)] = [{"state": "running", "start_date": "x"}]
    fake.tis[("llmops_local", RUN)] = [_ti("train", "running", try_number=1, max_tries=2), _ti("quantize", None)]
    state = demo_drift.follow(fake, "llmops_local", RUN, timeout=0)
    report = "\n".join(demo_drift.explain_run(fake, "llmops_local", RUN, state, log_root=tmp_path))
    assert "running task" in report and "train (try 1 of 3)" in report and "/taskInstances/train/logs/1" in report


def _demo_with(monkeypatch, fake: FakeAirflow) -> None:
    monkeypatch.setattr(demo_module.Demo, "ensure_airflow", lambda self: None)

    def client(self):
        self.api = fake
        return fake

    monkeypatch.setattr(demo_module.Demo, "client", client)


def test_the_demo_exits_non_zero_on_a_failed_run_and_says_which_task(failed_pipeline, monkeypatch, tmp_path, capsys):
    _demo_with(monkeypatch, failed_pipeline)
    code = demo_module.main(["--root", str(tmp_path), "--port", "18080"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f">> run {RUN}: failed" in out
    assert "train (try 3 of 3)" in out and "/taskInstances/train/logs/3" in out
    assert "Traceback" not in out + err


def test_an_error_in_a_step_is_reported_without_a_traceback(monkeypatch, tmp_path, capsys):
    fake = FakeAirflow()
    fake.fail_get_run = AirflowAPIError("GET", f"{BASE}/api/v2/dags/llmops_local/dagRuns/x", 500, "boom")
    fake.tis[("llmops_local", RUN)] = [_ti("plan", "running")]
    _demo_with(monkeypatch, fake)
    monkeypatch.delenv("LLMOPS_DEBUG", raising=False)

    code = demo_module.main(["--root", str(tmp_path), "--port", "18080"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    assert "the demo failed while following the llmops_local run: AirflowAPIError" in err
    assert "HTTP 500: boom" in err
    assert f"!! llmops_local run {RUN}" in err and "running task" in err and "plan (try 1" in err
    assert str(tmp_path / ".airflow" / "standalone.log") in err
    assert "LLMOPS_DEBUG=1" in err

    monkeypatch.setenv("LLMOPS_DEBUG", "1")
    with pytest.raises(AirflowAPIError):
        demo_module.main(["--root", str(tmp_path), "--port", "18080"])


def test_bad_conf_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo_module.main(["--root", str(tmp_path), "--conf", "{epochs: 3}"])
    assert exit_.value.code == 2
    assert "--conf is not JSON" in capsys.readouterr().err


def _retrain_fake(retrain_state: str) -> FakeAirflow:
    fake = FakeAirflow()
    retrain = "asset_triggered__2026-11-26T11:40:00+00:00"
    fake.dag_runs["llmops_retrain"] = [{"dag_run_id": retrain, "run_type": "asset_triggered", "state": "queued"}]
    # Created, then queued for a few polls (no start date: the window of apache/airflow#71360), then started.
    fake.states[("llmops_retrain", retrain)] = [
        {"state": "queued", "start_date": None},
        {"state": "queued", "start_date": None},
        {"state": "running", "start_date": "2026-11-26T11:40:05+00:00"},
        {"state": retrain_state, "start_date": "2026-11-26T11:40:05+00:00"},
    ]
    fake.events[("llmops_retrain", retrain)] = [{"uri": "x-llmops://chatterbot-topics-classifier/drift"}]
    fake.tis[("llmops_retrain", retrain)] = [_ti("retrain", "success" if retrain_state == "success" else "failed")]
    if retrain_state == "success":
        fake.xcoms[("llmops_retrain", retrain, "retrain", "trigger_run_id")] = "manual__retrain"
        fake.states[("llmops_local", "manual__retrain")] = [{"state": "running", "start_date": "x"}]
    return fake


def test_the_retrain_run_s_events_are_read_once_it_has_started(capsys):
    fake = _retrain_fake("success")
    assert demo_drift.follow_retrain(fake, "", step=demo_drift.Step(), log_root=None)
    out = capsys.readouterr().out
    assert fake.event_reads_before_start == 0
    assert "(asset_triggered, 1 asset event(s))" in out
    assert "llmops_local run manual__retrain (running; conf.drift holds the event)" in out


def test_unreadable_events_do_not_end_the_demo(capsys):
    fake = _retrain_fake("success")
    fake.upstream_asset_events = lambda dag_id, run_id: (_ for _ in ()).throw(  # type: ignore[method-assign]
        AirflowAPIError("GET", f"{BASE}/upstreamAssetEvents", 500, "Internal Server Error")
    )
    assert demo_drift.follow_retrain(fake, "", step=demo_drift.Step(), log_root=None)
    assert "asset events unreadable: GET" in capsys.readouterr().out


def test_a_failed_retrain_run_is_reported_with_its_task_log(capsys):
    fake = _retrain_fake("failed")
    step = demo_drift.Step()
    assert not demo_drift.follow_retrain(fake, "", step=step, log_root=Path("/nowhere"))
    out = capsys.readouterr().out
    assert "!! llmops_retrain run asset_triggered__2026-11-26T11:40:00+00:00: failed" in out
    assert "failed task" in out and "retrain (try 1 of 1)" in out and "/taskInstances/retrain/logs/1" in out
    assert step.dag_id == "llmops_retrain" and step.run_id == "asset_triggered__2026-11-26T11:40:00+00:00"
