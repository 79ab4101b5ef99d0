"""The LLMOps page's readers and its plugin declaration, without servers: alias history from registry tags, the
request-log time series (written by the server's real RequestLogWriter), the rollout view, and plugin loading
staying light."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_alias_history_from_tags_orders_moves_and_skips_junk() -> None:
    from airflow_llmops.plugins.ui_data import alias_history_from_tags

    tags = {
        "llmops.alias.champion.2000": json.dumps({"alias": "champion", "version": "2", "previous": "1", "at_ms": 2000}),
        "llmops.alias.champion.1000": json.dumps(
            {"alias": "champion", "version": "1", "previous": None, "at_ms": 1000}
        ),
        "llmops.alias.challenger.1500": json.dumps({"alias": "challenger", "version": "2", "at_ms": 1500}),
        "llmops.alias.champion.3000": "{not json",
        "other": "x",
    }
    history = alias_history_from_tags(tags)
    assert [r["version"] for r in history["champion"]] == ["1", "2"]
    assert [r["version"] for r in history["challenger"]] == ["2"]


def test_request_series_buckets_the_servers_request_log(tmp_path: Path) -> None:
    from airflow_llmops.plugins.ui_data import request_series
    from airflow_llmops.serving.request_log import RequestLogWriter

    now = time.time()
    writer = RequestLogWriter(tmp_path / "requests")
    try:
        for i in range(20):  # v1: 20 requests over ~10 min, every 5th fails, latency i ms
            writer.append(
                {
                    "ts": now - 600 + i * 30,
                    "variant": "v1",
                    "request_id": f"a{i}",
                    "status": 500 if i % 5 == 0 else 200,
                    "latency_ms": float(i),
                    "input": "secret text",
                }
            )
        for index in range(3):  # one request of three inputs: counted once
            writer.append(
                {"ts": now - 10, "variant": "v2", "request_id": "b", "index": index, "status": 200, "latency_ms": 7.0}
            )
        writer.append(
            {"ts": now - 5, "variant": "v2", "request_id": "s", "shadow": True, "status": 200, "latency_ms": 1}
        )
        writer.append({"ts": now - 7200, "variant": "v1", "request_id": "old", "status": 200, "latency_ms": 1})
        writer.flush()
    finally:
        writer.close()
    series = request_series(tmp_path / "requests", now=now)
    assert sum(b["requests"] for b in series["v1"]) == 20
    assert sum(b["errors"] for b in series["v1"]) == 4
    assert len(series["v1"]) > 5  # short-lived traffic: buckets shorter than a minute draw a line
    assert [b["requests"] for b in series["v2"]] == [1] and series["v2"][0]["p95_ms"] == 7.0
    assert "secret" not in json.dumps(series)
    fixed = request_series(tmp_path / "requests", now=now, bucket_s=3600)
    (bucket,) = fixed["v1"]
    assert bucket["p50_ms"] == 9.0 and bucket["p95_ms"] == 18.0 and bucket["error_rate"] == 0.2


def test_rollout_view_computes_step_bake_left_and_owner() -> None:
    from airflow_llmops.platforms import RolloutRecord
    from airflow_llmops.plugins.ui_data import rollout_view
    from airflow_llmops.specs import RolloutPlan

    plan = RolloutPlan(strategy="canary", traffic_steps=[10, 50, 100], bake_seconds=300)
    record = RolloutRecord(
        rollout_id="llmops_local/manual__1/rollout",
        variant="v2",
        model_uri="models:/m/2",
        previous={"v1": 100.0},
        plan=plan.to_dict(),
        step=1,
        step_started_at=1000.0,
        steps=[{"status": "passed", "step": 0, "percent": 10.0, "elapsed_s": 300.0, "message": "ok", "ok": True}],
    )
    view = rollout_view(record.to_dict(), now=1100.0)
    assert view is not None
    assert view["owner_dag_id"] == "llmops_local" and view["steps"] == [10.0, 50.0, 100.0]
    assert view["step_percent"] == 50.0 and view["bake_left_s"] == 200.0
    assert view["verdicts"][0]["status"] == "passed"
    record.state = "rolled_back"
    assert rollout_view(record.to_dict(), now=1100.0)["bake_left_s"] is None  # type: ignore[index]


def test_rollout_view_shows_a_pause_and_a_resume_restarts_the_bake() -> None:
    from airflow_llmops.platforms import RolloutRecord
    from airflow_llmops.plugins.ui_data import rollout_view
    from airflow_llmops.specs import RolloutPlan

    plan = RolloutPlan(strategy="canary", traffic_steps=[10, 100], bake_seconds=300)
    record = RolloutRecord(
        rollout_id="llmops_local/manual__1/rollout",
        variant="v2",
        model_uri="models:/m/2",
        previous={"v1": 100.0},
        plan=plan.to_dict(),
        step_started_at=1000.0,
        pause={"state": "paused", "by": "ann", "at": 1050.0, "reason": "<img src=x> p95", "step": 0},
    )
    view = rollout_view(record.to_dict(), now=1100.0)
    assert view is not None and view["paused"] == {"by": "ann", "at": 1050.0, "reason": "<img src=x> p95"}
    assert view["bake_left_s"] is None  # held: no bake is running
    record.pause = {"state": "resumed", "by": "bob", "at": 1090.0, "paused_by": "ann", "paused_at": 1050.0}
    view = rollout_view(record.to_dict(), now=1100.0)
    assert view is not None and view["paused"] is None and view["bake_left_s"] == 290.0  # restarted at the resume


def test_drift_windows_are_parsed_once_and_again_when_the_file_changes(tmp_path: Path) -> None:
    import json
    import os

    from airflow_llmops.plugins import ui_data

    folder = tmp_path / "llmops_drift" / "scheduled__1" / "drift"
    folder.mkdir(parents=True)
    summary = {"model": "m", "verdict": "no_drift", "drift": False, "window": {"end": 10}, "checks": {}}
    (folder / "drift.json").write_text(json.dumps(summary))
    (first,) = ui_data.list_drift(tmp_path)["models"][0]["windows"]
    assert first["verdict"] == "no_drift" and first["report"].endswith("/drift.json")
    assert tmp_path.joinpath(folder, "drift.json") in ui_data._DRIFT_CACHE
    (folder / "drift.json").write_text(json.dumps({**summary, "verdict": "drift", "drift": True, "rows": 12}))
    os.utime(folder / "drift.json", ns=(1, 1))  # even with a time in the past: the size changed
    (folder / "drift-report.html").write_text("<p>report</p>")
    (again,) = ui_data.list_drift(tmp_path)["models"][0]["windows"]
    assert again["verdict"] == "drift" and again["rows"] == 12 and again["report"].endswith("/drift-report.html")


def test_plugin_declares_views_airflow_accepts_and_loads_light() -> None:
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse, ReactAppResponse

    from airflow_llmops.plugins.artifacts import LLMOpsPlugin

    (warm_up,) = LLMOpsPlugin.fastapi_root_middlewares
    assert callable(warm_up["middleware"]) and warm_up["name"]
    (widget,) = [ReactAppResponse.model_validate(v) for v in LLMOpsPlugin.react_apps]
    assert widget.destination == "dashboard" and widget.bundle_url.startswith("/llmops/ui/static/")
    views = [ExternalViewResponse.model_validate(v) for v in LLMOpsPlugin.external_views]
    assert {v.destination for v in views} == {"nav", "task_instance"}
    task_view = next(v for v in views if v.destination == "task_instance")
    assert all(k in task_view.href for k in ("{DAG_ID}", "{RUN_ID}", "{TASK_ID}", "{MAP_INDEX}"))
    code = (
        "import sys; import airflow_llmops.plugins.artifacts as a; a.LLMOpsPlugin.external_views; "
        "names = ('fastapi', 'mlflow', 'airflow_llmops.plugins.ui_data', 'airflow_llmops.plugins.ui'); "
        "heavy = [m for m in names if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.parametrize(
    "name", ["llmops.html", "task.html", "widget.html", "llmops.js", "charts.js", "widget.js", "llmops.css"]
)
def test_static_files_ship_and_never_write_markup_from_data(name: str) -> None:
    from airflow_llmops.plugins.ui import STATIC

    text = (STATIC / name).read_text()
    assert "innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # no CDN
    if name.endswith(".html"):
        assert "<script>" not in text and " style=" not in text  # the page's CSP allows neither inline
