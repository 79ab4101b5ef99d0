"""The README's main job: `airflow-llmops demo` runs the local pipeline through a real airflow standalone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_llmops.processes import free_port, port_open

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _demo(root: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("airflow-llmops")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["LLMOPS_MLFLOW_PORT"] = str(port + 1)
    return subprocess.run(
        [str(cli), "demo", *args, "--root", str(root), "--port", str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def _check_report_is_served_behind_auth(root: Path, port: int, stdout: str) -> None:
    """The extra link's URL opens the GX report through the plugin, only for a logged-in user."""
    import urllib.error
    import urllib.request

    from airflow_llmops.devstack.airflow_api import AirflowClient
    from airflow_llmops.devstack.env import generated_admin_password

    url = next(line.split()[-1] for line in stdout.splitlines() if "validation report (GX)" in line)
    assert url.startswith(f"http://127.0.0.1:{port}/llmops/artifacts/llmops_local/"), url
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url, timeout=10)
    assert denied.value.code in (401, 403)
    client = AirflowClient(f"http://127.0.0.1:{port}", "admin", generated_admin_password(root / ".airflow") or "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {client.token()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/html")
        assert b"Expectation" in response.read()
    escape = url.replace("/llmops_local/", "/llmops_local/..%2F..%2F..%2F")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(urllib.request.Request(escape, headers={"Authorization": f"Bearer {client.token()}"}))
    assert bad.value.code in (400, 404)


def test_demo_runs_the_pipeline_and_reuses_airflow_on_rerun(tmp_path: Path):
    (tmp_path / "dags").symlink_to(ROOT / "dags")
    port = free_port()
    while port_open(port + 1):
        port = free_port()
    try:
        quick = {"max_steps": 10, "quantization_methods": ["torch_dynamic_int8"]}
        first = _demo(tmp_path, port, "--conf", json.dumps(quick))
        log = (tmp_path / ".airflow" / "standalone.log").read_text(errors="replace")[-3000:]
        assert first.returncode == 0, first.stdout + first.stderr + log
        assert "starting airflow standalone" in first.stdout
        assert ": success" in first.stdout
        assert f"http://127.0.0.1:{port}" in first.stdout and "login admin /" in first.stdout
        assert "validation report (GX)" in first.stdout and "quarantined" in first.stdout
        _check_report_is_served_behind_auth(tmp_path, port, first.stdout)
        plans = list((tmp_path / ".llmops" / "artifacts" / "llmops_local").glob("manual__*/plan.json"))
        # Unpausing also lets the daily schedule create its latest run; the demo's own runs are manual.
        assert len(plans) == 1 and json.loads(plans[0].read_text())["platform"] == "local"

        assert "endpoint" in first.stdout and "curl -s -X POST http://127.0.0.1:" in first.stdout
        # Ten training steps each: the second model need not beat the first to be shadowed.
        conf = {**quick, "rollout_strategy": "shadow", "min_improvement": -1.0}
        second = _demo(tmp_path, port, "--conf", json.dumps(conf))
        assert second.returncode == 0, second.stdout + second.stderr
        assert "reusing the Airflow already running" in second.stdout
        plans = sorted((tmp_path / ".llmops" / "artifacts" / "llmops_local").glob("manual__*/plan.json"))
        assert len(plans) == 2
        assert {json.loads(p.read_text())["specs"]["rollout"]["strategy"] for p in plans} == {"canary", "shadow"}
    finally:
        stopped = _demo(tmp_path, port, "stop")
    assert "stopped airflow standalone" in stopped.stdout and "stopped mlflow server" in stopped.stdout
    assert "stopped endpoint chatterbot-topics" in stopped.stdout
    assert not (tmp_path / ".airflow" / "standalone.pid").exists()
