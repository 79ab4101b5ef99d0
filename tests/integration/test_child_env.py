"""A training job started by the local platform does not inherit the worker's Airflow secrets, while what it
needs (the tracking server, Hugging Face's offline mode) still reaches it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from airflow_llmops.platforms.local import LocalPlatform, job_processes
from airflow_llmops.specs import TrainingSpec

SECRETS = {
    "AIRFLOW__CORE__FERNET_KEY": "fernet-key-of-the-worker",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:db-password@db/airflow",
    "AIRFLOW_CONN_SECRET": "aws://AKIA:secret-key@",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password",
    "HF_TOKEN": "hf_token_of_the_worker",
}


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of an Airflow worker: secrets, and what a job legitimately needs."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")  # nothing listens: the job is not tracked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _spec(tmp_path: Path) -> TrainingSpec:
    return TrainingSpec.parse({"dataset_uri": str(tmp_path / "no-dataset"), "distributed": {"nproc_per_node": 1}})


def _assert_minimal(env: dict[str, str], job_dir: Path) -> None:
    assert not [name for name in env if name.startswith("AIRFLOW")]
    assert not set(SECRETS) & set(env)
    assert not [value for value in env.values() if any(secret in value for secret in SECRETS.values())]
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9/"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["LLMOPS_LOCAL_JOB_DIR"] == str(job_dir) and env["LLMOPS_RUN_KEY"] == job_dir.name
    assert env["PATH"] == os.environ["PATH"]


def test_the_job_sees_an_allow_listed_environment(tmp_path, worker_env):
    # An "interpreter" that writes down the environment it was given: the platform's own doing, no torch in the way.
    recorder = tmp_path / "python"
    recorder.write_text(
        f"#!{sys.executable}\n"
        "import json, os\n"
        "with open(os.path.join(os.environ['LLMOPS_LOCAL_JOB_DIR'], 'child-env.json'), 'w') as f:\n"
        "    json.dump(dict(os.environ), f)\n"
    )
    recorder.chmod(0o755)
    platform = LocalPlatform(
        tmp_path / "jobs", python=str(recorder), env={"MLFLOW_TRACKING_TOKEN": "passed-on-purpose"}
    )
    platform.submit_training(_spec(tmp_path), job_name="recorded")
    job_dir = tmp_path / "jobs" / "recorded"
    dump = job_dir / "child-env.json"
    deadline = time.monotonic() + 60
    while not dump.exists() or not dump.read_text().endswith("}"):
        assert time.monotonic() < deadline, (job_dir / "launcher.log").read_text()
        time.sleep(0.1)
    env = json.loads(dump.read_text())
    _assert_minimal(env, job_dir)
    assert env["MLFLOW_TRACKING_TOKEN"] == "passed-on-purpose"  # the platform's env is the caller's explicit choice


def test_the_torchrun_launcher_sees_no_airflow_secrets(tmp_path, worker_env):
    platform = LocalPlatform(tmp_path / "jobs")
    handle = platform.submit_training(_spec(tmp_path), job_name="real")
    job_dir = tmp_path / "jobs" / "real"
    try:
        # Read while the launcher still imports torch (seconds); it fails later, on the missing dataset.
        env = psutil.Process(int(handle.job_id)).environ()
        _assert_minimal(env, job_dir)
        assert all(not p.environ().keys() & SECRETS.keys() for p in job_processes(job_dir))
    finally:
        platform.cancel_training(handle)
