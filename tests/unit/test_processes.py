"""ProcessRecord tells a process from a later one that got its pid; child_env keeps Airflow's secrets at home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from airflow_llmops.processes import ProcessRecord, child_env


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not the one a record names, but holds its pid (as after pid reuse)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _forged(pid: int, **fields) -> ProcessRecord:
    """A record of a process that had ``pid`` before: created 1000 s before the one holding it now."""
    return ProcessRecord(pid=pid, create_time=psutil.Process(pid).create_time() - 1000, **fields)


def test_a_reused_pid_is_not_the_recorded_process():
    assert ProcessRecord.of(os.getpid()).alive()
    assert not _forged(os.getpid()).alive()


def test_stop_leaves_a_process_that_got_the_pid_alone(stranger):
    assert _forged(stranger.pid).stop(grace=0.5) is False
    time.sleep(0.3)
    assert stranger.poll() is None


def test_a_record_follows_its_process_through_exit(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    record = ProcessRecord.of(proc)
    assert record.alive() and record.argv[0] == sys.executable
    assert record.stop(grace=5) is True
    deadline = time.monotonic() + 10
    while record.alive():  # a zombie until reaped: alive() says no and reaps it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert record.stop(grace=1) is False
    with pytest.raises(ProcessLookupError):
        ProcessRecord.of(proc.pid)


def test_a_zombie_is_not_alive():
    proc = subprocess.Popen(["true"], start_new_session=True)
    record = ProcessRecord.of(proc)
    deadline = time.monotonic() + 10
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not record.alive()


def test_records_round_trip_through_json(tmp_path):
    record = ProcessRecord.of(os.getpid(), argv=["python", "-m", "x"])
    assert ProcessRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    path = tmp_path / "sub" / "launcher.json"
    record.write(path, attempt=2, url="http://127.0.0.1:1")
    assert ProcessRecord.read(path) == record
    data = json.loads(path.read_text())
    assert data["attempt"] == 2 and data["pid"] == os.getpid() and data["create_time"] == record.create_time
    with pytest.raises(ValueError, match="clash"):
        record.write(path, pid=1)
    assert ProcessRecord.read(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text('{"pid": "x"}')
    assert ProcessRecord.read(tmp_path / "bad.json") is None


def test_a_record_from_another_machine_names_no_process_here():
    record = ProcessRecord.of(os.getpid())
    assert not ProcessRecord(record.pid, record.create_time, host="elsewhere.invalid").alive()


def test_legacy_records_are_judged_by_when_they_were_written(tmp_path, stranger):
    me = psutil.Process(os.getpid()).create_time()
    # launcher.json of an older version: pid, argv, attempt, started_at; no create_time.
    legacy = {"pid": os.getpid(), "argv": ["python"], "attempt": 1, "started_at": time.time()}
    assert ProcessRecord.from_dict(legacy).alive()
    # Written before this process existed: the pid was someone else's then.
    assert not ProcessRecord.from_dict({**legacy, "started_at": me - 100}).alive()
    assert ProcessRecord.from_dict({"pid": stranger.pid, "started_at": me - 100}).stop(grace=0.5) is False
    # A plain pid file: its write time stands in for started_at.
    pid_file = tmp_path / "server.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    assert ProcessRecord.read(pid_file).alive()
    os.utime(pid_file, (me - 100, me - 100))
    assert not ProcessRecord.read(pid_file).alive()
    # Nothing to judge by: counted as running (no duplicate is started), never signalled (it may be a stranger).
    blind = ProcessRecord.from_dict({"pid": stranger.pid})
    assert blind.alive() and blind.stop(grace=0.5) is False
    time.sleep(0.3)
    assert stranger.poll() is None


def test_local_platform_does_not_take_a_reused_launcher_pid_for_the_job(tmp_path):
    from airflow_llmops.platforms.base import JobHandle, JobState
    from airflow_llmops.platforms.local import LocalPlatform

    platform = LocalPlatform(tmp_path)
    handle = JobHandle(platform="local", job_id="0", job_name="job", console_url=None, extra={})
    (tmp_path / "job").mkdir()
    launcher = tmp_path / "job" / "launcher.json"
    _forged(os.getpid()).write(launcher, attempt=1)
    assert platform.get_training_status(handle).state is JobState.FAILED
    me = psutil.Process(os.getpid()).create_time()
    legacy = {"pid": os.getpid(), "argv": [], "attempt": 1, "started_at": me - 100}
    launcher.write_text(json.dumps(legacy))
    assert platform.get_training_status(handle).state is JobState.FAILED
    launcher.write_text(json.dumps({**legacy, "started_at": time.time()}))
    assert platform.get_training_status(handle).state is JobState.RUNNING


def test_stop_process_group_never_signals_the_callers_own_group(tmp_path):
    # In a session of its own, so that the old behaviour (SIGTERM to the caller's group) kills only the helper.
    script = textwrap.dedent(
        """
        import subprocess, sys
        from airflow_llmops.processes import stop_process_group
        child = subprocess.Popen(["sleep", "30"])  # in the helper's own group
        print(stop_process_group(child.pid, timeout=1), child.poll() is None)
        child.kill()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, start_new_session=True, check=False
    )
    assert (done.returncode, done.stdout.split()) == (0, ["False", "True"]), done.stderr


def test_child_env_keeps_what_a_job_needs_and_drops_airflow_and_secrets():
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "HF_HOME": "/cache/hf",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_secret",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
        "CUDA_VISIBLE_DEVICES": "0",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_TRACKING_TOKEN": "tok",
        "MLFLOW_RUN_ID": "someone-elses-run",
        "LLMOPS_COUNTRY_ISO": "FRA",
        "LLMOPS_API_KEY": "k",
        "LLMOPS_ADMIN_TOKEN": "t",
        "MASTER_ADDR": "10.0.0.1",
        "AIRFLOW_HOME": "/opt/airflow",
        "AIRFLOW__CORE__FERNET_KEY": "fernet",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:pw@db/airflow",
        "AIRFLOW_CONN_SECRET": "s3://key:secret@",
        "AIRFLOW_VAR_X": "x",
        "DATABASE_URL": "postgresql://u:p@db/x",
    }
    env = child_env({"LLMOPS_RUN_KEY": "job"}, environ=parent)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "HF_HOME": "/cache/hf",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
        "CUDA_VISIBLE_DEVICES": "0",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "LLMOPS_COUNTRY_ISO": "FRA",
        "LLMOPS_RUN_KEY": "job",
    }
    # A credential goes through when asked for by name, or passed in extra.
    asked = child_env({"MLFLOW_TRACKING_TOKEN": "mine"}, allow=["HF_TOKEN", "DATABASE_*"], environ=parent)
    assert asked["HF_TOKEN"] == "hf_secret" and asked["MLFLOW_TRACKING_TOKEN"] == "mine"
    assert asked["DATABASE_URL"].startswith("postgresql")
    # Airflow's own never does.
    with pytest.raises(ValueError, match="AIRFLOW__CORE__FERNET_KEY"):
        child_env(allow=["AIRFLOW__CORE__FERNET_KEY"], environ=parent)
    with pytest.raises(ValueError, match="AIRFLOW_CONN_X"):
        child_env({"AIRFLOW_CONN_X": "y"}, environ=parent)
    assert not any(name.startswith("AIRFLOW") for name in child_env(allow=["AIR*"], environ=parent))


def test_child_env_defaults_to_this_process_environment(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "fernet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = child_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == os.environ["PATH"]
    assert not any(name.startswith("AIRFLOW") for name in env)


def test_an_exited_process_record_written_to_disk_is_read_back_dead(tmp_path):
    proc = subprocess.Popen(["true"], start_new_session=True)
    ProcessRecord.of(proc).write(tmp_path / "p.json")
    proc.wait()
    record = ProcessRecord.read(Path(tmp_path / "p.json"))
    assert record is not None and not record.alive()


def test_a_job_launched_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    """The triggerer's container cannot see the worker's processes: a job whose files keep changing is running."""
    import json
    import os
    import time

    from airflow_llmops.platforms import JobHandle, JobState
    from airflow_llmops.platforms.local import HEARTBEAT_STALE_S, LocalPlatform

    platform = LocalPlatform(tmp_path)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    launcher = {"pid": 1, "create_time": 1.0, "started_at": time.time(), "host": "worker-container", "attempt": 1}
    (job_dir / "launcher.json").write_text(json.dumps(launcher))
    (job_dir / "launcher.log").write_text("step 1\n")
    handle = JobHandle(platform="local", job_id="1", job_name="job")
    assert platform.get_training_status(handle).state is JobState.RUNNING
    old = time.time() - HEARTBEAT_STALE_S - 5
    for name in ("launcher.json", "launcher.log"):
        os.utime(job_dir / name, (old, old))
    assert platform.get_training_status(handle).state is JobState.FAILED
