"""The artifacts plugin serves HTML reports sandboxed (``Content-Security-Policy: sandbox``, ``nosniff``), through
its real FastAPI app and Airflow's real auth (a JWT from the auth manager), without an API server."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_reports_are_served_sandboxed_behind_airflow_auth(
    airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    from airflow_llmops.plugins.artifacts import create_app

    report = tmp_path / "llmops_local" / "run-1" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html><script>fetch('/api/v2/variables')</script></html>")
    (report.parent / "index.html").write_text("<p>index</p>")
    monkeypatch.setenv("AIRFLOW__LLMOPS__ARTIFACT_ROOT", str(tmp_path))
    token = init_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    client = TestClient(create_app())
    auth = {"Authorization": f"Bearer {token}"}

    for path in ("/artifacts/llmops_local/run-1/report.html", "/artifacts/llmops_local/run-1/"):
        response = client.get(path, headers=auth)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["Content-Security-Policy"] == "sandbox"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Refusals and misses carry them too (a 404 echoes the path it was asked for).
    for path, headers, status in (
        ("/artifacts/llmops_local/run-1/report.html", {}, 401),
        ("/artifacts/llmops_local/missing.html", auth, 404),
    ):
        response = client.get(path, headers=headers)
        assert response.status_code == status
        assert response.headers["Content-Security-Policy"] == "sandbox"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
