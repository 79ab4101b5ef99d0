"""The platform protocol's records survive JSON (triggers carry them) and job names are stable and valid."""

from __future__ import annotations

import json
import re

import pytest

from airflow_llmops.platforms import (
    DeploymentPlatform,
    EndpointHandle,
    JobHandle,
    JobState,
    JobStatus,
    TrainingPlatform,
    VariantMetrics,
    job_name_for,
    validate_weights,
)


@pytest.mark.parametrize(
    "record",
    [
        JobHandle(platform="local", job_id="123", job_name="n", extra={"pgid": 42}),
        JobStatus(state=JobState.RUNNING, progress=0.5, metrics={"loss": 1.25}),
        EndpointHandle(platform="sagemaker", endpoint_name="ep", url="https://x", console_url="https://c"),
        VariantMetrics(variant="v2", requests=200, errors=3, p95_latency_ms=120.5),
    ],
    ids=lambda r: type(r).__name__,
)
def test_records_round_trip_through_json(record):
    assert type(record).from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_job_status_state_from_string_and_terminal_states():
    assert JobStatus.from_dict({"state": "failed", "message": "OOM"}).state is JobState.FAILED
    assert {s for s in JobState if s.is_terminal} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    with pytest.raises(ValueError, match="'exploded'"):
        JobStatus(state="exploded")  # type: ignore[arg-type]


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown keys \['jobid'\]"):
        JobHandle.from_dict({"platform": "local", "jobid": "1", "job_name": "x"})


def test_error_rate():
    assert VariantMetrics(variant="a", requests=200, errors=3).error_rate == pytest.approx(0.015)
    assert VariantMetrics(variant="a", requests=0, errors=0).error_rate == 0.0


def test_job_names_are_deterministic_distinct_and_valid_everywhere():
    a = job_name_for("llmops_local", "manual__2026-11-26T10:00:00+00:00", "train")
    assert a == job_name_for("llmops_local", "manual__2026-11-26T10:00:00+00:00", "train")
    others = {
        job_name_for("llmops_local", "manual__2026-11-27T10:00:00+00:00", "train"),
        job_name_for("llmops_local", "manual__2026-11-26T10:00:00+00:00", "tune"),
        job_name_for("llmops_other", "manual__2026-11-26T10:00:00+00:00", "train"),
    }
    assert a not in others and len(others) == 3
    long_name = job_name_for("d" * 200, "r", "t" * 200)
    for name in (a, long_name, *others):
        assert len(name) <= 63
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", name), name


def test_validate_weights():
    assert validate_weights({"blue": 90, "green": 10}) == {"blue": 90.0, "green": 10.0}
    with pytest.raises(ValueError, match="sum to 100"):
        validate_weights({"blue": 90, "green": 20})
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        validate_weights({"blue": 120, "green": -20})
    with pytest.raises(ValueError, match="empty"):
        validate_weights({})


class _FakeLocal:
    """Only the shape matters here: a class with the protocol's methods satisfies it structurally."""

    name = "fake"

    def submit_training(self, spec, *, job_name): ...
    def get_training_status(self, handle): ...
    def cancel_training(self, handle): ...
    def describe_training(self, handle): ...


def test_protocols_are_structural():
    assert isinstance(_FakeLocal(), TrainingPlatform)
    assert not isinstance(_FakeLocal(), DeploymentPlatform)


def test_rollout_records_and_results_on_an_object_store(tmp_path):
    from airflow_llmops.platforms import RolloutRecord
    from airflow_llmops.platforms.base import load_rollout_record, read_json_uri, save_rollout_record

    uri = (tmp_path / "endpoints" / "chat" / "rollout.json").as_uri()
    assert load_rollout_record(uri) is None  # no rollout yet
    record = RolloutRecord(
        rollout_id="r1", variant="v3", model_uri="models:/m/3", previous={"v2": 100.0}, plan={}, message="step 1"
    )
    save_rollout_record(uri, record)
    loaded = load_rollout_record(uri)
    assert loaded is not None and loaded.variant == "v3" and loaded.updated_at == record.updated_at > 0
    assert read_json_uri(uri)["previous"] == {"v2": 100.0}
    (tmp_path / "broken.json").write_text("{not json")
    assert read_json_uri((tmp_path / "broken.json").as_uri()) == {} == read_json_uri(str(tmp_path / "missing.json"))
