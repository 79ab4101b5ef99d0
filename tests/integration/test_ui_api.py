"""The LLMOps page's data API and its rollback action, through the plugin's real FastAPI app and Airflow's real auth
(JWTs from the simple auth manager), over stores filled by the real code paths (ui_stores.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture()
def stores(airflow_db: Path, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ui_stores

    from airflow_llmops.platforms import get_platform

    endpoints, artifacts = tmp_path / "endpoints", tmp_path / "artifacts"
    monkeypatch.setenv("AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT", str(endpoints))
    monkeypatch.setenv("AIRFLOW__LLMOPS__ARTIFACT_ROOT", str(artifacts))
    monkeypatch.setenv("AIRFLOW__LLMOPS__UI_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin,viewer:viewer")
    versions = ui_stores.register_versions(mlflow_server.url, tmp_path)
    try:
        ui_stores.start_rollout(endpoints, requests=20)
        ui_stores.write_drift_windows(artifacts)
        yield {"versions": versions, "endpoints": endpoints, "audit": tmp_path / "audit.jsonl"}
    finally:
        get_platform("local", endpoints_root=str(endpoints)).stop_endpoint(ui_stores.ENDPOINT)


def _client_and_tokens():
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    from airflow_llmops.plugins.artifacts import create_app

    manager = init_auth_manager()
    tokens = {
        role: {"Authorization": f"Bearer {manager.generate_jwt(SimpleAuthManagerUser(username=role, role=role))}"}
        for role in ("admin", "viewer")
    }
    return TestClient(create_app()), tokens


def test_page_data_and_rollback_behind_airflow_auth(stores) -> None:
    import ui_stores

    from airflow_llmops.platforms import EndpointHandle, get_platform

    client, tokens = _client_and_tokens()
    # Nothing without a login: the page, its script and every data route.
    for path in ("/ui/", "/ui/static/llmops.js", "/ui/api/models", "/ui/api/endpoints", "/ui/api/drift"):
        assert client.get(path).status_code == 401, path

    page = client.get("/ui/", headers=tokens["viewer"])
    assert page.status_code == 200 and "llmops.js" in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/ui/static/../artifacts.py", headers=tokens["viewer"]).status_code == 404

    models = client.get("/ui/api/models", headers=tokens["viewer"]).json()
    (model,) = [m for m in models["models"] if m["name"] == ui_stores.MODEL]
    assert [v["version"] for v in model["versions"]] == ["2", "1"]
    v2, v1 = model["versions"]
    assert v2["quantization"] == "int8_dynamic" and v1["data_manifest_hash"] == ui_stores.MANIFEST_HASH
    assert v2["metrics"]["eval_accuracy"] == pytest.approx(0.84) and v1["dag_run"] == f"{ui_stores.DAG_ID}/manual__run1"
    assert model["aliases"] == {"champion": "1", "challenger": "2"}
    assert [m["version"] for m in model["alias_history"]["challenger"]] == ["1", "2"]
    assert model["alias_history"]["champion"][0]["reason"] == "first champion"
    assert v2["can_promote"] is False  # a viewer

    endpoints = client.get("/ui/api/endpoints", headers=tokens["viewer"]).json()["endpoints"]
    (ep,) = [e for e in endpoints if e["name"] == ui_stores.ENDPOINT]
    assert ep["up"] and ep["weights"] == {"v1": 90.0, "v2": 10.0}
    assert ep["rollout"]["state"] == "in_progress" and ep["rollout"]["step_percent"] == 10.0
    assert 0 < ep["rollout"]["bake_left_s"] <= 600 and ep["owner_dag_id"] == ui_stores.DAG_ID
    assert ep["can_edit"] is False
    assert sum(b["requests"] for s in ep["series"].values() for b in s) == 20
    assert all(b["p95_ms"] is not None for s in ep["series"].values() for b in s)

    drift = client.get("/ui/api/drift", headers=tokens["viewer"]).json()
    (dm,) = [m for m in drift["models"] if m["name"] == ui_stores.MODEL]
    assert [w["verdict"] for w in dm["windows"]] == ["no_drift"] * 3 + ["drift"]
    assert dm["windows"][-1]["checks"]["embedding"]["threshold"] == 0.1
    report = client.get(f"/artifacts/{dm['windows'][-1]['report']}", headers=tokens["viewer"])
    assert report.status_code == 200 and "Drift report 3" in report.text
    assert report.headers["Content-Security-Policy"] == "sandbox"

    action = {**tokens["viewer"], "X-LLMOps-Action": "1"}
    url = f"/ui/api/endpoints/local/{ui_stores.ENDPOINT}/rollback"
    refused = client.post(url, headers=action, json={"reason": "viewer tries"})
    assert refused.status_code == 403
    # Without the action header (what a cross-site form would send) even an admin is refused.
    assert client.post(url, headers=tokens["admin"], json={}).status_code == 400

    admin_endpoints = client.get("/ui/api/endpoints", headers=tokens["admin"]).json()["endpoints"]
    assert [e["can_edit"] for e in admin_endpoints if e["name"] == ui_stores.ENDPOINT] == [True]

    # Pause and resume: the same rules as the rollback; the request lands in the rollout record the walk reads.
    admin = {**tokens["admin"], "X-LLMOps-Action": "1"}
    pause, resume = url.replace("/rollback", "/pause"), url.replace("/rollback", "/resume")
    platform = get_platform("local", endpoints_root=str(stores["endpoints"]))
    assert client.post(pause, headers=action, json={"reason": "viewer tries"}).status_code == 403
    assert client.post(pause, headers=tokens["admin"], json={}).status_code == 400
    assert platform.get_rollout_record(ui_stores.ENDPOINT).pause is None
    paused = client.post(pause, headers=admin, json={"reason": "<b>look</b> at p95"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["message"].startswith("paused by admin at ")
    held = platform.get_rollout_record(ui_stores.ENDPOINT)
    assert held.in_progress and held.pause["state"] == "paused" and held.pause["reason"] == "<b>look</b> at p95"
    (ep,) = [e for e in client.get("/ui/api/endpoints", headers=tokens["viewer"]).json()["endpoints"]]
    assert ep["rollout"]["paused"]["by"] == "admin" and ep["rollout"]["paused"]["reason"] == "<b>look</b> at p95"
    assert ep["rollout"]["bake_left_s"] is None and ep["weights"] == {"v1": 90.0, "v2": 10.0}
    assert client.post(pause, headers=admin, json={}).status_code == 409  # already paused
    assert client.post(resume, headers=action, json={}).status_code == 403
    resumed = client.post(resume, headers=admin, json={})
    assert resumed.status_code == 200, resumed.text
    record = platform.get_rollout_record(ui_stores.ENDPOINT)
    assert record.pause["state"] == "resumed" and record.pause["paused_by"] == "admin" and record.in_progress
    (ep,) = [e for e in client.get("/ui/api/endpoints", headers=tokens["viewer"]).json()["endpoints"]]
    assert ep["rollout"]["paused"] is None and 0 < ep["rollout"]["bake_left_s"] <= 600
    assert client.post(resume, headers=admin, json={}).status_code == 409  # nothing paused
    done = client.post(url, headers={**tokens["admin"], "X-LLMOps-Action": "1"}, json={"reason": "bad canary"})
    assert done.status_code == 200, done.text
    assert done.json()["before"] == {"v1": 90.0, "v2": 10.0} and done.json()["after"] == {"v1": 100.0}
    server = json.loads((stores["endpoints"] / ui_stores.ENDPOINT / "server.json").read_text())
    assert platform.get_traffic(EndpointHandle("local", ui_stores.ENDPOINT, url=server["url"])) == {"v1": 100.0}
    record = platform.get_rollout_record(ui_stores.ENDPOINT)
    assert record.state == "rolled_back" and "by admin: bad canary" in record.message
    # A second rollback has nothing to roll back.
    again = client.post(url, headers={**tokens["admin"], "X-LLMOps-Action": "1"}, json={})
    assert again.status_code == 409

    # Promote v2 to champion: refused to a viewer, done for an admin, recorded in the alias history.
    promote = f"/ui/api/models/{ui_stores.MODEL}/promote"
    assert client.post(promote, headers=action, json={"version": "2"}).status_code == 403
    moved = client.post(promote, headers={**tokens["admin"], "X-LLMOps-Action": "1"}, json={"version": "2"})
    assert moved.status_code == 200, moved.text
    models = client.get("/ui/api/models", headers=tokens["admin"]).json()
    (model,) = [m for m in models["models"] if m["name"] == ui_stores.MODEL]
    assert model["aliases"]["champion"] == "2"
    assert model["alias_history"]["champion"][-1]["reason"] == "promoted from the LLMOps page by admin"

    actions = [json.loads(line) for line in stores["audit"].read_text().splitlines()]
    assert [(a["user"], a["action"], a["outcome"]) for a in actions] == [
        ("viewer", "rollback", "refused"),
        ("viewer", "pause", "refused"),
        ("admin", "pause", "done"),
        ("admin", "pause", "failed"),
        ("viewer", "resume", "refused"),
        ("admin", "resume", "done"),
        ("admin", "resume", "failed"),
        ("admin", "rollback", "done"),
        ("admin", "rollback", "failed"),
        ("viewer", "promote", "refused"),
        ("admin", "promote", "done"),
    ]
    audit = client.get("/ui/api/audit", headers=tokens["viewer"]).json()["actions"]
    assert audit[0]["action"] == "promote" and audit[3]["reason"] == "bad canary"
    assert audit[8]["action"] == "pause" and audit[8]["reason"] == "<b>look</b> at p95"
