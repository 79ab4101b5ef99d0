"""The README's main job: `airflow-llmops demo` runs the local pipeline through a real airflow standalone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_llmops.devstack.processes import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _demo(root: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("airflow-llmops")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return subprocess.run(
        [str(cli), "demo", *args, "--root", str(root), "--port", str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_demo_runs_the_pipeline_and_reuses_airflow_on_rerun(tmp_path: Path):
    (tmp_path / "dags").symlink_to(ROOT / "dags")
    port = free_port()
    try:
        first = _demo(tmp_path, port)
        log = (tmp_path / ".airflow" / "standalone.log").read_text(errors="replace")[-3000:]
        assert first.returncode == 0, first.stdout + first.stderr + log
        assert "starting airflow standalone" in first.stdout
        assert ": success" in first.stdout
        assert f"http://127.0.0.1:{port}" in first.stdout and "login admin /" in first.stdout
        plans = list((tmp_path / ".llmops" / "artifacts" / "llmops_local").glob("manual__*/plan.json"))
        # Unpausing also lets the daily schedule create its latest run; the demo's own runs are manual.
        assert len(plans) == 1 and json.loads(plans[0].read_text())["platform"] == "local"

        second = _demo(tmp_path, port, "--conf", json.dumps({"rollout_strategy": "shadow"}))
        assert second.returncode == 0, second.stdout + second.stderr
        assert "reusing the Airflow already running" in second.stdout
        plans = sorted((tmp_path / ".llmops" / "artifacts" / "llmops_local").glob("manual__*/plan.json"))
        assert len(plans) == 2
        assert {json.loads(p.read_text())["specs"]["rollout"]["strategy"] for p in plans} == {"canary", "shadow"}
    finally:
        stopped = _demo(tmp_path, port, "stop")
    assert "stopped airflow standalone" in stopped.stdout
    assert not (tmp_path / ".airflow" / "standalone.pid").exists()
