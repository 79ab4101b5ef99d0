"""The LLMOps page in a real browser (headless Debian Chromium through Playwright) inside a real Airflow api-server
with the provider's plugin, over stores filled by the real code paths (tests/integration/ui_stores.py): a viewer
sees models, alias history, endpoint weights, charts, drift reports and a task's report, and no action; an admin
rolls an endpoint back from the page and the endpoint's weights change. Screenshots: the test's tmp dir; with
LLMOPS_UPDATE_SCREENSHOTS=1 also docs/img/llmops-page.png for the README (a normal run leaves the tree clean)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DAGS, IN_CI, ROOT, require_module

pytestmark = pytest.mark.e2e
sys.path.insert(0, str(ROOT / "tests" / "integration"))

CHROMIUM = os.environ.get("LLMOPS_CHROMIUM", "/usr/bin/chromium")
README_SHOT = ROOT / "docs" / "img" / "llmops-page.png"
MODEL = "ui-page-topics"  # its own registered model: the session's MLflow server is shared


def _browser_or_skip() -> Any:
    sync_api = require_module("playwright.sync_api")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        message = f"no Chromium at {CHROMIUM} (scripts/bootstrap.sh installs Debian's chromium; LLMOPS_CHROMIUM=...)"
        if IN_CI:
            pytest.fail(f"{message}, and CI=true requires it", pytrace=False)
        pytest.skip(message)
    return sync_api


@pytest.fixture()
def stack(airflow_db: Path, airflow_home: Path, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ui_stores
    from dags_under_test import load_dag

    from airflow_llmops.devstack.cluster import AirflowCluster
    from airflow_llmops.platforms import get_platform

    endpoints, artifacts = tmp_path / "endpoints", tmp_path / "artifacts"
    settings = {
        "AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI": mlflow_server.url,
        "AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT": str(endpoints),
        "AIRFLOW__LLMOPS__ARTIFACT_ROOT": str(artifacts),
        "AIRFLOW__LLMOPS__UI_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    ui_stores.register_versions(mlflow_server.url, tmp_path, model=MODEL)
    try:
        ui_stores.start_rollout(endpoints, requests=40)
        ui_stores.write_drift_windows(artifacts)
        # A provider task's result in the metadata database the api-server reads (the session's SQLite file).
        dag = load_dag("llmops_ui_demo", folder="tests/dags", module="llmops_test_ui", attr="ui_dag")
        run = dag.test(run_conf={"endpoints_root": str(endpoints)})
        assert str(run.state) in ("success", "DagRunState.SUCCESS"), run.state
        passwords = tmp_path / "passwords.json"
        cluster = AirflowCluster(
            tmp_path / "airflow",
            DAGS,
            components=("api-server",),
            extra_env={
                **settings,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            },
        )
        passwords.write_text(json.dumps({"admin": cluster.password, "viewer": "viewer-pass"}))
        with cluster:
            yield {
                "cluster": cluster,
                "endpoints": endpoints,
                "run_id": run.run_id,
                "passwords": {"admin": cluster.password, "viewer": "viewer-pass"},
            }
    finally:
        get_platform("local", endpoints_root=str(endpoints)).stop_endpoint(ui_stores.ENDPOINT)


def _login(browser: Any, url: str, user: str, password: str) -> tuple[Any, Any, list[str]]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []

    def console(msg: Any) -> None:
        where = (msg.location or {}).get("url", "")
        if msg.type == "error" and "/llmops/" in where:
            errors.append(f"{where}: {msg.text}")

    page.on("console", console)
    page.on("pageerror", lambda err: errors.append(f"page error: {err}"))
    page.goto(f"{url}/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda u: "/auth/login" not in u, timeout=30_000)
    return context, page, errors


def _open_page(page: Any, url: str) -> Any:
    page.goto(f"{url}/plugin/llmops")
    frame = page.frame_locator("iframe[title='LLMOps']")
    frame.locator("body[data-loaded='1']").wait_for(timeout=60_000)
    return frame


def test_llmops_page_in_airflow_ui(stack: dict[str, Any], tmp_path: Path) -> None:
    import ui_stores

    from airflow_llmops.platforms import EndpointHandle, get_platform

    sync_api = _browser_or_skip()
    url = stack["cluster"].url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            # ---- a read-only user -------------------------------------------------------------------------
            context, page, errors = _login(browser, url, "viewer", stack["passwords"]["viewer"])
            # The widget on Airflow's home page: endpoints' health and the last drift verdicts.
            page.goto(f"{url}/")
            widget = page.frame_locator("iframe[title='LLMOps widget']")
            widget.locator("body[data-loaded='1']").wait_for(timeout=60_000)
            row = widget.locator(f"tr.widget-endpoint[data-endpoint='{ui_stores.ENDPOINT}']").inner_text()
            assert "up" in row and "v1 90.0%" in row and "in_progress" in row, row
            assert "drift" in widget.locator(f"tr.widget-drift[data-model='{ui_stores.MODEL}']").inner_text()
            page.screenshot(path=str(shots / "home-widget.png"), full_page=True)
            frame = _open_page(page, url)
            model = frame.locator(f".model[data-model='{MODEL}']")
            assert model.locator("tr.version").count() == 2
            assert model.locator("tr.version[data-version='2']").inner_text().count("int8_dynamic") == 1
            assert "first champion" in model.locator("table.alias-history").inner_text()
            assert model.locator("tr.alias-move").count() == 3  # challenger v1, champion v1, challenger v2
            assert model.locator(".chart circle.pt").count() >= 3
            page.screenshot(path=str(shots / "models.png"), full_page=True)

            frame.get_by_role("button", name="Endpoints").click()
            endpoint = frame.locator(f".endpoint[data-endpoint='{ui_stores.ENDPOINT}']")
            weights = {
                row.get_attribute("data-variant"): float(row.get_attribute("data-weight") or "nan")
                for row in endpoint.locator("tr.variant").all()
            }
            assert weights == {"v1": 90.0, "v2": 10.0}
            assert endpoint.locator(f".chart[data-chart='latency-{ui_stores.ENDPOINT}'] circle.pt").count() >= 2
            assert "in_progress" in endpoint.locator(".rollout").inner_text()
            assert frame.locator("button.rollback, button.pause").count() == 0  # read-only: no action button
            page.screenshot(path=str(shots / "endpoints-viewer.png"), full_page=True)
            refused = context.request.post(
                f"{url}/llmops/ui/api/endpoints/local/{ui_stores.ENDPOINT}/rollback",
                headers={"X-LLMOps-Action": "1", "Content-Type": "application/json"},
                data=json.dumps({"reason": "viewer tries"}),
            )
            assert refused.status == 403, refused.text()

            frame.get_by_role("button", name="Drift").click()
            drift = frame.locator(f".drift-model[data-model='{ui_stores.MODEL}']")
            assert drift.locator("tr.window").count() == 4
            assert drift.locator(".chart circle.pt").count() >= 8  # 4 windows x 2 checks
            drift.locator("a.report-link").first.click()  # newest window: the drifted one
            report = frame.frame_locator("iframe[title='LLMOps report']")
            assert "Drift report 3" in report.locator("h1").inner_text(timeout=30_000)
            page.screenshot(path=str(shots / "drift.png"), full_page=True)

            # The task-instance view, as Airflow's task page embeds it.
            run_id = stack["run_id"]
            page.goto(f"{url}/dags/llmops_ui_demo/runs/{run_id}/tasks/endpoint_metrics/plugin/llmops-report")
            task = page.frame_locator("iframe[title='LLMOps report']")
            task.locator("body[data-loaded='1']").wait_for(timeout=60_000)
            assert "endpoint.requests_per_minute" in task.locator("table.task-result").inner_text()
            page.screenshot(path=str(shots / "task-report.png"), full_page=True)
            assert errors == [], errors
            context.close()

            # ---- an admin rolls the canary back ---------------------------------------------------------
            context, page, errors = _login(browser, url, "admin", stack["passwords"]["admin"])
            frame = _open_page(page, url)
            frame.get_by_role("button", name="Endpoints").click()
            page.screenshot(path=str(shots / "endpoints-admin.png"), full_page=True)
            if os.environ.get("LLMOPS_UPDATE_SCREENSHOTS") == "1":
                README_SHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(README_SHOT), full_page=True)
            # Pause the canary (the rollout section says who paused it and why), then resume it.
            endpoint = frame.locator(f".endpoint[data-endpoint='{ui_stores.ENDPOINT}']")
            endpoint.locator("button.pause").click()
            endpoint.locator("input.reason").fill("checking <p95>")
            endpoint.locator("button.confirm-action").click()
            paused = endpoint.locator(".rollout-paused")
            paused.wait_for(timeout=60_000)
            assert "paused by admin" in paused.inner_text() and "checking <p95>" in paused.inner_text()
            page.screenshot(path=str(shots / "paused.png"), full_page=True)
            endpoint.locator("button.resume").click()
            endpoint.locator("button.pause").wait_for(timeout=60_000)
            assert paused.count() == 0 and "resumed by admin" in endpoint.locator(".rollout-message").inner_text()
            frame.locator("button.rollback").click()
            frame.locator("input.reason").fill("canary looks wrong")
            frame.locator("button.confirm-action").click()
            frame.locator("#notice.ok", has_text="rolled back").wait_for(timeout=60_000)
            endpoint = frame.locator(f".endpoint[data-endpoint='{ui_stores.ENDPOINT}']")
            endpoint.locator("tr.variant[data-variant='v1'][data-weight='100']").wait_for(timeout=30_000)
            assert endpoint.locator("tr.variant").count() == 1
            assert "rolled_back" in endpoint.locator(".rollout").inner_text()
            frame.get_by_role("button", name="Actions").click()
            audit = frame.locator("tr.audit").all_inner_texts()
            assert any("admin" in row and "done" in row for row in audit), audit
            assert any("viewer" in row and "refused" in row for row in audit), audit
            assert any("pause" in row and "done" in row for row in audit), audit
            page.screenshot(path=str(shots / "after-rollback.png"), full_page=True)
            assert errors == [], errors
            context.close()
        finally:
            browser.close()
    server = json.loads((stack["endpoints"] / ui_stores.ENDPOINT / "server.json").read_text())
    platform = get_platform("local", endpoints_root=str(stack["endpoints"]))
    assert platform.get_traffic(EndpointHandle("local", ui_stores.ENDPOINT, url=server["url"])) == {"v1": 100.0}
    assert sorted(p.name for p in shots.iterdir()) == [
        "after-rollback.png",
        "drift.png",
        "endpoints-admin.png",
        "endpoints-viewer.png",
        "home-widget.png",
        "models.png",
        "paused.png",
        "task-report.png",
    ]
