"""The local platform runs real torchrun jobs: submit, follow, re-attach, kill and resume, cancel; and the
trigger that polls them from the triggerer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import prepare_chatterbot

from airflow_llmops.platforms import JobState, get_platform
from airflow_llmops.platforms.base import JobHandle
from airflow_llmops.platforms.local import job_processes
from airflow_llmops.specs import TrainingSpec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("dataset"), topics="ai,food,greetings,money")


def _spec(dataset: Path, **overrides) -> TrainingSpec:
    base = {
        "dataset_uri": str(dataset),
        "max_steps": 12,
        "per_device_batch_size": 8,
        "max_seq_length": 32,
        "checkpoint_every_steps": 4,
        "log_every_steps": 2,
        "distributed": {"nproc_per_node": 2},
    }
    return TrainingSpec.parse({**base, **overrides})


def _wait(platform, handle, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = platform.get_training_status(handle)
        if status.state.is_terminal:
            return status
        time.sleep(1)
    raise TimeoutError(platform.describe_training(handle))


def test_submit_runs_torchrun_and_reattaches_instead_of_starting_twice(tmp_path, dataset):
    platform = get_platform("local", jobs_root=str(tmp_path))
    handle = platform.submit_training(_spec(dataset), job_name="job-a")
    again = platform.submit_training(_spec(dataset), job_name="job-a")
    assert again.job_id == handle.job_id  # still running: same launcher, no duplicate
    status = _wait(platform, handle)
    assert status.state is JobState.SUCCEEDED, platform.describe_training(handle)
    assert Path(status.model_uri).is_dir() and status.metrics["eval_accuracy"] >= 0
    described = platform.describe_training(handle)
    assert described["status"]["world_size"] == 2
    # The logged loss is the job's mean loss, not world_size times it (4 labels: about ln 4 = 1.39 at the start).
    first = json.loads((tmp_path / "job-a" / "progress.jsonl").read_text().splitlines()[0])
    assert 0 < first["loss"] < 1.9, first
    finished = platform.submit_training(_spec(dataset), job_name="job-a")
    assert finished.extra["attempt"] == 1  # a finished job is not rerun
    assert JobHandle.from_dict(json.loads(json.dumps(handle.to_dict()))) == handle


def test_a_killed_job_restarts_in_place_and_resumes_from_its_checkpoint(tmp_path, dataset):
    platform = get_platform("local", jobs_root=str(tmp_path))
    spec = _spec(dataset, max_steps=40, checkpoint_every_steps=5)
    handle = platform.submit_training(spec, job_name="job-b")
    job_dir = tmp_path / "job-b"
    deadline = time.monotonic() + 240
    while not any((p / "trainer_state.json").exists() for p in (job_dir / "checkpoints").glob("checkpoint-*")):
        assert time.monotonic() < deadline, platform.describe_training(handle)
        assert platform.get_training_status(handle).state is not JobState.FAILED, platform.describe_training(handle)
        time.sleep(0.5)
    os.killpg(int(handle.job_id), signal.SIGKILL)  # the launcher dies without clean-up: a crashed worker
    time.sleep(1)
    assert job_processes(job_dir), "torchrun's workers outlive their launcher (each has a session of its own)"
    crashed = platform.get_training_status(handle)
    assert crashed.state is JobState.FAILED and "exited without a result" in crashed.message
    retry = platform.submit_training(spec, job_name="job-b")
    assert retry.extra["attempt"] == 2 and retry.job_id != handle.job_id
    assert all(p.environ().get("LLMOPS_RUN_KEY") == "job-b" for p in job_processes(job_dir))
    status = _wait(platform, retry)
    assert status.state is JobState.SUCCEEDED, platform.describe_training(retry)
    final = json.loads((job_dir / "status.json").read_text())
    assert final["resumed_from_step"] >= 5


def test_two_torchrun_nodes_meet_over_a_loopback_rendezvous(tmp_path, dataset):
    from airflow_llmops.processes import free_port

    platform = get_platform("local", jobs_root=str(tmp_path))
    endpoint = f"127.0.0.1:{free_port()}"
    handles = []
    for node in (0, 1):
        distributed = {"nproc_per_node": 1, "nnodes": 2, "node_rank": node, "rdzv_endpoint": endpoint}
        spec = _spec(dataset, max_steps=6, distributed=distributed)
        handles.append(platform.submit_training(spec, job_name=f"node-{node}"))
    results = [_wait(platform, handle) for handle in handles]
    assert [r.state for r in results] == [JobState.SUCCEEDED] * 2, [platform.describe_training(h) for h in handles]
    # The rendezvous, not --node_rank, decides which node gets global rank 0: it holds the model and metrics.
    main = [r for r in results if r.model_uri]
    assert len(main) == 1 and Path(main[0].model_uri).is_dir() and "eval_accuracy" in main[0].metrics
    statuses = [platform.describe_training(h)["status"] for h in handles]
    assert all(s["world_size"] == 2 for s in statuses)
    assert sorted(s.get("role", "main") for s in statuses) == ["main", "worker-node"]
    for handle in handles:
        assert "--rdzv_endpoint" in platform.describe_training(handle)["launcher"]["argv"]


def test_cancel_stops_the_whole_process_group(tmp_path, dataset):
    platform = get_platform("local", jobs_root=str(tmp_path))
    handle = platform.submit_training(_spec(dataset, max_steps=500), job_name="job-c")
    job_dir = tmp_path / "job-c"
    deadline = time.monotonic() + 120
    while len(job_processes(job_dir)) < 3:  # the launcher and its two workers
        assert time.monotonic() < deadline, platform.describe_training(handle)
        time.sleep(0.5)
    platform.cancel_training(handle)
    assert job_processes(job_dir) == []
    assert platform.get_training_status(handle).state is JobState.CANCELLED


def test_trigger_round_trips_and_fires_when_the_job_ends(tmp_path, dataset):
    from airflow_llmops.triggers.training import TrainingJobTrigger

    platform = get_platform("local", jobs_root=str(tmp_path))
    handle = platform.submit_training(_spec(dataset, max_steps=6), job_name="job-d")
    trigger = TrainingJobTrigger(
        platform="local", platform_kwargs={"jobs_root": str(tmp_path)}, handle=handle.to_dict(), poll_interval=0.5
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_llmops.triggers.training.TrainingJobTrigger"
    rebuilt = TrainingJobTrigger(**json.loads(json.dumps(kwargs)))

    async def first_event():
        async for event in rebuilt.run():
            return event.payload
        return None

    payload = asyncio.run(asyncio.wait_for(first_event(), timeout=300))
    assert payload["status"]["state"] == "succeeded" and payload["handle"] == handle.to_dict()


def test_unknown_and_unimplemented_platforms_say_so(monkeypatch):
    with pytest.raises(ValueError, match="unknown platform 'mainframe'"):
        get_platform("mainframe")
    from airflow_llmops import platforms

    # A platform the project names whose adapter this installation lacks (every named one has one today).
    monkeypatch.setattr(platforms, "_BUILTIN", {k: v for k, v in platforms._BUILTIN.items() if k != "azureml"})
    monkeypatch.setattr(platforms, "entry_points", lambda group: [])
    with pytest.raises(ValueError, match="'azureml' has no adapter"):
        get_platform("azureml")
