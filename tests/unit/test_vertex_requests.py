"""The Vertex AI requests our adapter sends, read as data, and what is refused before any API call."""

from __future__ import annotations

import json

import pytest

from airflow_llmops.platforms import get_platform
from airflow_llmops.platforms.vertex import VertexConfigError, VertexSettings
from airflow_llmops.platforms.vertex import requests as R
from airflow_llmops.specs import RolloutPlan, TrainingSpec

SETTINGS = VertexSettings(
    staging_uri="gs://bucket/llmops/",
    image_uri="us-docker.pkg.dev/p/llmops/runtime:1",
    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
)


def _spec(**overrides: object) -> TrainingSpec:
    return TrainingSpec.parse({"dataset_uri": "gs://bucket/data/prepared", "epochs": 2, **overrides})


def test_a_two_replica_spot_job_is_a_chief_pool_and_a_worker_pool() -> None:
    spec = _spec(distributed={"nnodes": 2, "rdzv_endpoint": "workerpool0-0:29500", "use_spot": True})
    job = R.custom_job(spec, job_name="llmops-train-abc", settings=SETTINGS)
    pools = job["job_spec"]["worker_pool_specs"]
    assert [p["replica_count"] for p in pools] == [1, 1]
    assert pools[0]["machine_spec"] == {"machine_type": "n1-standard-8"}
    env = {e["name"]: e["value"] for e in pools[0]["container_spec"]["env"]}
    assert TrainingSpec.from_json(env["LLMOPS_SPEC"]).epochs == 2
    assert env["LLMOPS_DATASET_URI"] == "gs://bucket/data/prepared"
    assert env["LLMOPS_RESULT_URI"] == "gs://bucket/llmops/training/llmops-train-abc/llmops/result.json"
    assert pools[0]["container_spec"]["args"] == ["train"]
    assert job["job_spec"]["scheduling"] == {"strategy": "SPOT", "restart_job_on_worker_restart": True}
    assert job["job_spec"]["base_output_directory"] == {
        "output_uri_prefix": "gs://bucket/llmops/training/llmops-train-abc"
    }
    assert job["labels"]["llmops-job"] == "llmops-train-abc" and job["display_name"] == "llmops-train-abc"
    single = R.custom_job(_spec(), job_name="j", settings=SETTINGS)
    assert len(single["job_spec"]["worker_pool_specs"]) == 1
    assert single["job_spec"]["scheduling"]["strategy"] == "STANDARD"


@pytest.mark.parametrize(
    ("settings", "spec", "message"),
    [
        (VertexSettings(image_uri="i"), _spec(), "staging_uri"),
        (VertexSettings(staging_uri="gs://b"), _spec(), "image_uri"),
        (VertexSettings(staging_uri="s3://b", image_uri="i"), _spec(), "gs:// URI"),
        (SETTINGS, _spec(dataset_uri="s3://other/data"), "reads the dataset from Cloud Storage"),
        (SETTINGS, _spec(distributed={"instance_type": "ml.m5.large"}), "not a Compute Engine machine type"),
        (
            VertexSettings(**{**SETTINGS.__dict__, "accelerator_type": "NVIDIA_TESLA_A100", "accelerator_count": 1}),
            _spec(),
            "cannot take accelerator NVIDIA_TESLA_A100",
        ),
    ],
)
def test_bad_training_input_is_refused_before_any_api_call(
    settings: VertexSettings, spec: TrainingSpec, message: str
) -> None:
    with pytest.raises(VertexConfigError, match=message):
        R.custom_job(spec, job_name="job", settings=settings)


def test_model_upload_per_source_and_autoscaling_from_the_plan() -> None:
    folder = R.model_upload("chat", "v1", "gs://b/models/m1/", settings=SETTINGS)
    assert folder["artifact_uri"] == "gs://b/models/m1" and folder["container_spec"]["args"] == ["serve"]
    registry = R.model_upload("chat", "v3", "models:/chat/3", settings=SETTINGS)
    env = {e["name"]: e["value"] for e in registry["container_spec"]["env"]}
    assert env["LLMOPS_MODEL_URI"] == "models:/chat/3" and "artifact_uri" not in registry
    assert env["LLMOPS_REQUEST_LOG_SHIP_URI"] == "gs://bucket/llmops/endpoints/chat/requests"  # drift reads it there
    assert (
        registry["labels"]["llmops-source"]
        != R.model_upload("chat", "v3", "models:/chat/4", settings=SETTINGS)["labels"]["llmops-source"]
    )
    with pytest.raises(VertexConfigError, match="cannot reach an endpoint"):
        R.model_upload("chat", "v1", "/tmp/model", settings=SETTINGS)
    plan = RolloutPlan.parse(
        {"strategy": "blue_green", "autoscaling": {"min_instances": 1, "max_instances": 4, "target_cpu_percent": 60}}
    )
    resources = R.dedicated_resources(plan, SETTINGS)
    assert (resources["min_replica_count"], resources["max_replica_count"]) == (1, 4)
    assert resources["autoscaling_metric_specs"] == [{"metric_name": R.CPU_METRIC, "target": 60}]


def test_traffic_becomes_whole_percentages_summing_to_100() -> None:
    assert R.integer_split({"a": 33.4, "b": 33.3, "c": 33.3}) == {"a": 34, "b": 33, "c": 33}
    assert R.integer_split({"a": 12.5, "b": 87.5}) in ({"a": 13, "b": 87}, {"a": 12, "b": 88})
    assert sum(R.integer_split({"a": 10.0, "b": 90.0}).values()) == 100


def test_labels_are_valid_and_shadow_is_refused() -> None:
    assert R.label_value("Chat_Topics v2") == "chat_topics-v2"
    assert len(R.label_value("x" * 80)) <= 63
    vertex = get_platform("vertex", staging_uri="gs://b", image_uri="i")
    assert "cannot mirror traffic" in vertex.capabilities.refuse(RolloutPlan.parse({"strategy": "shadow"}), "vertex")
    with pytest.raises(VertexConfigError, match=r"unknown vertex platform options \['zone'\]"):
        get_platform("vertex", zone="x")
    assert json.loads(json.dumps(SETTINGS.__dict__))["region"] == "us-central1"


def test_a_tuning_spec_is_a_study_over_the_training_job() -> None:
    from google.cloud import aiplatform_v1

    from airflow_llmops.specs.tuning import TuningSpec

    tuning = TuningSpec.parse(
        {
            "training": {
                "dataset_uri": "gs://bucket/data/prepared",
            },
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                "lora.r": {"type": "int", "low": 4, "high": 16},
                "warmup_ratio": {"type": "categorical", "choices": [0.1, 0.0]},
                "weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.05},
                "lora.target_modules": {"type": "categorical", "choices": ["auto", ["q", "v"]]},
            },
            "n_trials": 5,
            "metric": "eval_loss",
            "sampler": "random",
        }
    )
    job = R.tuning_job(tuning, job_name="llmops-tune-abc", settings=SETTINGS)
    aiplatform_v1.HyperparameterTuningJob(job)  # every field name is the API's
    study = job["study_spec"]
    assert study["metrics"] == [{"metric_id": "eval_loss", "goal": "MINIMIZE"}]
    assert study["algorithm"] == "RANDOM_SEARCH" and "median_automated_stopping_spec" in study
    params = {p["parameter_id"]: p for p in study["parameters"]}
    assert params["learning_rate"]["double_value_spec"] == {"min_value": 1e-5, "max_value": 1e-3}
    assert params["learning_rate"]["scale_type"] == "UNIT_LOG_SCALE"
    assert params["lora.r"]["integer_value_spec"] == {"min_value": 4, "max_value": 16}
    assert params["warmup_ratio"]["discrete_value_spec"] == {"values": [0.0, 0.1]}
    assert params["weight_decay"]["discrete_value_spec"] == {"values": [0.0, 0.05, 0.1]}
    assert params["lora.target_modules"]["categorical_value_spec"] == {"values": ["auto", '["q", "v"]']}
    assert job["max_trial_count"] == 5 and job["parallel_trial_count"] == 2
    pools = job["trial_job_spec"]["worker_pool_specs"]
    assert [p["replica_count"] for p in pools] == [1]
    env = {e["name"]: e["value"] for e in pools[0]["container_spec"]["env"]}
    assert env["LLMOPS_HP_METRIC"] == "eval_loss" and "LLMOPS_RESULT_URI" not in env  # per trial: no shared record
    assert job["labels"]["llmops-job"] == "llmops-tune-abc"
    with pytest.raises(VertexConfigError, match="initial_trials"):
        R.tuning_job(
            tuning.model_copy(update={"initial_trials": [{"learning_rate": 1e-4}]}), job_name="j", settings=SETTINGS
        )


def test_request_response_logging_goes_to_a_bigquery_uri() -> None:
    assert R.logging_config(SETTINGS) is None
    on = VertexSettings(**{**SETTINGS.__dict__, "request_response_logging_uri": "bq://my-project.llmops.requests"})
    assert R.logging_config(on) == {
        "enabled": True,
        "sampling_rate": 1.0,
        "bigquery_destination": {"output_uri": "bq://my-project.llmops.requests"},
    }
    for bad in ("gs://bucket/logs", "bq://"):
        with pytest.raises(VertexConfigError, match="bq://project"):
            R.logging_config(VertexSettings(**{**SETTINGS.__dict__, "request_response_logging_uri": bad}))


def test_a_trial_reports_its_metric_as_hypertune_does(tmp_path: object) -> None:
    from pathlib import Path

    from airflow_llmops.ml import hypertune

    path = Path(str(tmp_path)) / "hypertune" / "output.metrics"
    env = {"LLMOPS_HP_METRIC": "eval_accuracy", "CLOUD_ML_HP_METRIC_FILE": str(path), "CLOUD_ML_TRIAL_ID": "3"}
    assert hypertune.report({"eval_accuracy": 0.5}, 10, env) is not None
    assert hypertune.report({"eval_accuracy": 0.75, "eval_loss": 1.2}, 20, env) is not None
    assert hypertune.report({"eval_loss": 1.0}, 30, env) is None  # not the tuned metric
    assert hypertune.report({"eval_accuracy": 0.9}, 40, {"CLOUD_ML_HP_METRIC_FILE": str(path)}) is None  # no trial
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["global_step"], r["eval_accuracy"], r["trial"]) for r in lines] == [
        ("10", "0.5", "3"),
        ("20", "0.75", "3"),
    ]


def test_a_throttled_call_may_be_retried_and_a_refused_one_not() -> None:
    from google.api_core import exceptions

    from airflow_llmops.platforms import PlatformApiError, PlatformRefusedError
    from airflow_llmops.platforms.vertex.adapter import _Calls

    class Client:  # the GAPIC client's surface: the service answers with google.api_core errors
        def create_custom_job(self, *, parent: str, custom_job: object) -> None:
            raise exceptions.ResourceExhausted(
                "Quota exceeded for aiplatform.googleapis.com/custom_model_training_cpus"
            )

        def get_endpoint(self, *, name: str) -> None:
            raise exceptions.NotFound(f"Endpoint {name} not found")

    calls = _Calls(Client(), "p")
    with pytest.raises(PlatformApiError, match=r"create_custom_job on projects/p/locations/r .*Quota exceeded") as err:
        calls.create_custom_job(parent="projects/p/locations/r", custom_job=object())
    assert not isinstance(err.value, PlatformRefusedError)
    with pytest.raises(PlatformApiError, match="get_endpoint on projects/p/locations/r/endpoints/9"):
        calls.get_endpoint(name="projects/p/locations/r/endpoints/9")
