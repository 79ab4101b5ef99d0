"""``dags/llmops_sagemaker.py`` end to end under ``dag.test()`` against the SageMaker stand-in: data to S3, a
two-instance spot training job (the real runtime, a real model), quantize, evaluate, register in MLflow, deploy;
then rollouts of later versions that pass and that roll back, stepwise and through SageMaker's guarded deployment.

The stand-in (``tests/standins/sagemaker.py``) runs moto in this process with real training containers and real
model servers behind InvokeEndpoint; CloudWatch numbers come from real requests, alarms are driven by the test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloud_pipeline import Traffic, register_again

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("sagemaker-pipeline")]

MODEL = "chatterbot-topics-classifier"
ENDPOINT = "chatterbot-topics"


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import os

    from standins.sagemaker import SageMakerStandIn

    with SageMakerStandIn(tmp_path_factory.mktemp("sagemaker"), container_env={"OMP_NUM_THREADS": "1"}) as standin:
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(standin.connection())
        try:
            yield standin
        finally:
            os.environ.pop("AIRFLOW_CONN_AWS_DEFAULT", None)
    assert standin.errors == [], standin.errors


@pytest.fixture
def sagemaker_env(aws: Any, airflow_db: Path, mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "ARTIFACT_ROOT": aws.s3_uri("artifacts"),
        "ARTIFACT_CONN_ID": "aws_default",
        "SAGEMAKER_ROLE_ARN": aws.role_arn,
        "SAGEMAKER_IMAGE_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/airflow-llmops-runtime:test",
        "SAGEMAKER_S3_PREFIX": aws.s3_uri("sagemaker"),
    }.items():
        monkeypatch.setenv(f"AIRFLOW__LLMOPS__{key}", value)
    return aws


def _rollout(conf: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_sagemaker", folder="tests/dags")
    run = dag.test(run_conf=conf)
    rolled = run.get_task_instance("rollout").xcom_pull(task_ids="rollout") or {}
    return run, rolled


def _platform() -> Any:
    import os

    from airflow_llmops.platforms import get_platform

    return get_platform(
        "sagemaker",
        role_arn=os.environ["AIRFLOW__LLMOPS__SAGEMAKER_ROLE_ARN"],
        image_uri=os.environ["AIRFLOW__LLMOPS__SAGEMAKER_IMAGE_URI"],
        s3_prefix=os.environ["AIRFLOW__LLMOPS__SAGEMAKER_S3_PREFIX"],
        max_attempts=2,
    )


def test_llmops_sagemaker_end_to_end(sagemaker_env: Any, mlflow_server: Any) -> None:
    from dags_under_test import load_dag

    from airflow_llmops.platforms import EndpointHandle

    aws = sagemaker_env
    dag = load_dag("llmops_sagemaker")
    conf = {
        "dataset_source": "chatterbot://english?topics=ai,food,greetings,money,sports",
        "max_steps": 12,
        "instance_count": 2,
        "use_spot": True,
        "training_instance_type": "ml.m5.large",
        "quantization_methods": ["torch_dynamic_int8"],
        "max_quality_drop": 100.0,  # wiring, not quality: quality gates have their own tests
        "bake_seconds": 0,
    }
    run = dag.test(run_conf=conf)
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert run.state == "success", states

    prepared = run.get_task_instance("prepare").xcom_pull(task_ids="prepare")
    assert prepared["dataset_uri"].startswith(aws.s3_uri("artifacts/llmops_sagemaker/"))
    trained = run.get_task_instance("train").xcom_pull(task_ids="train")
    assert trained["model_uri"].startswith("s3://") and trained["model_uri"].endswith("model.tar.gz")
    assert trained["metrics"]["eval_accuracy"] > 0 and trained["mlflow_run_id"]
    train_ti = run.get_task_instance("train")
    console = train_ti.xcom_pull(task_ids="train", key="_link_CloudConsoleLink")
    assert console.startswith("https://us-east-1.console.aws.amazon.com/sagemaker/") and trained["job_name"] in console
    job = aws.client("sagemaker").describe_training_job(TrainingJobName=trained["job_name"])
    assert job["ResourceConfig"]["InstanceCount"] == 2 and job["EnableManagedSpotTraining"] is True
    assert job["TrainingJobStatus"] == "Completed"
    hosts = sorted(p.name for p in aws.training_root(trained["job_name"]).parent.glob("algo-*"))
    assert hosts == ["algo-1", "algo-2"]  # one container per instance, torchrun across them

    registered = run.get_task_instance("register").xcom_pull(task_ids="register")
    deployed = run.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    assert deployed["platform"] == "sagemaker" and deployed["variant"] == f"v{registered['version']}"
    assert "aws_access_key_id" not in json.dumps(deployed) and "testing" not in json.dumps(deployed)
    rolled = run.get_task_instance("rollout").xcom_pull(task_ids="rollout")
    assert rolled["state"] == "succeeded"  # the endpoint's first model serves everything
    status, answer, variant = aws.invoke(ENDPOINT, {"inputs": "what is your favourite food?"})
    assert status == 200 and variant == deployed["variant"], answer

    # -- a later version, canary 50 -> 100 judged on CloudWatch numbers from live traffic: passes ---------------
    v1 = deployed["variant"]
    uri = register_again(mlflow_server.url, MODEL, registered["version"])
    with Traffic(lambda i: aws.invoke(ENDPOINT, {"inputs": f"do you like pizza {i}?"})):
        scaling = {"min_instances": 1, "max_instances": 3, "target_invocations_per_instance": 50}
        run2, rolled2 = _rollout({"model_uri": uri, "traffic_steps": [50, 100], "autoscaling": scaling})
    assert run2.state == "success", rolled2
    v2 = rolled2["variant"]
    assert rolled2["state"] == "succeeded" and [s["status"] for s in rolled2["steps"]] == ["passed", "passed"]
    assert rolled2["steps"][0]["new"]["requests"] >= 4  # judged on real requests
    assert rolled2["steps"][0]["old"]["variant"] == v1 and rolled2["steps"][0]["old"]["requests"] > 0
    platform = _platform()
    handle = EndpointHandle(platform="sagemaker", endpoint_name=ENDPOINT)
    assert platform.get_traffic(handle) == {v2: 100.0}
    scaled = platform.scaling(ENDPOINT, v2)  # the promoted version follows the load
    assert [(t["MinCapacity"], t["MaxCapacity"]) for t in scaled["targets"]] == [(1, 3)]
    policy = scaled["policies"][0]["TargetTrackingScalingPolicyConfiguration"]
    assert policy["TargetValue"] == 50 and "InvocationsPerInstance" in str(policy["PredefinedMetricSpecification"])

    # -- the next version answers errors: the canary breaches, the old weights come back -------------------------
    uri3 = register_again(mlflow_server.url, MODEL, registered["version"])
    v3 = f"v{uri3.rsplit('/', 1)[1]}"
    aws.fail_variant(ENDPOINT, v3, status=500)
    with Traffic(lambda i: aws.invoke(ENDPOINT, {"inputs": f"do you like pizza {i}?"})):
        run3, _ = _rollout({"model_uri": uri3, "traffic_steps": [50, 100]})
    aws.clear_faults()
    assert run3.state == "failed"
    record = platform.get_rollout_record(ENDPOINT)
    assert record.variant == v3 and record.state == "rolled_back" and "error rate" in record.message
    assert platform.get_traffic(handle) == {v2: 100.0}
    assert [v["name"] for v in platform.describe_endpoint(handle)["variants"]] == [v2]

    # -- native guardrails: SageMaker's blue/green canary with alarms from the SLO; no alarm: it completes ------
    uri4 = register_again(mlflow_server.url, MODEL, registered["version"])
    with Traffic(lambda i: aws.invoke(ENDPOINT, {"inputs": f"do you like pizza {i}?"})):
        run4, rolled4 = _rollout({"model_uri": uri4, "traffic_steps": [10, 100], "native_guardrails": True})
    assert run4.state == "success", rolled4
    v4 = rolled4["variant"]
    assert platform.get_traffic(handle) == {v4: 100.0}
    assert platform.scaling(ENDPOINT, v2)["targets"] == []  # deregistered before SageMaker replaced its fleet
    update = aws.client("sagemaker").describe_endpoint(EndpointName=ENDPOINT)
    assert update["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "CANARY"
    alarms = aws.client("cloudwatch").describe_alarms(AlarmNamePrefix=f"llmops-{ENDPOINT}-{v4}")["MetricAlarms"]
    assert alarms == []  # made for the deployment, removed after it

    # -- native guardrails again, and the error alarm fires during the bake: SageMaker rolls back, we report it ---
    uri5 = register_again(mlflow_server.url, MODEL, registered["version"])
    v5 = f"v{uri5.rsplit('/', 1)[1]}"
    alarm = f"llmops-{ENDPOINT}-{v5}-errors"

    def fire() -> None:
        cw = aws.client("cloudwatch")
        for _ in range(300):
            if cw.describe_alarms(AlarmNames=[alarm])["MetricAlarms"]:
                cw.set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="test: 5XX rate above the SLO")
                return
            time.sleep(0.2)

    firing = threading.Thread(target=fire, daemon=True)
    firing.start()
    run5, _ = _rollout({"model_uri": uri5, "traffic_steps": [10, 100], "native_guardrails": True, "bake_seconds": 20})
    firing.join(timeout=5)
    assert run5.state == "failed"
    record = platform.get_rollout_record(ENDPOINT)
    assert record.variant == v5 and record.state == "rolled_back", record
    assert "SageMaker rolled the deployment" in record.message and alarm in record.message
    assert platform.get_traffic(handle) == {v4: 100.0}  # the previous version serves, as before
    status, _, variant = aws.invoke(ENDPOINT, {"inputs": "hello"})
    assert status == 200 and variant == v4

    # -- drift: the endpoint's Data Capture (every request above) read by the drift check, with a verdict -------
    from dags_under_test import load_dag as load_test_dag

    aws.flush_capture()
    validated = run.get_task_instance("validate").xcom_pull(task_ids="validate")
    drift_dag = load_test_dag(
        "llmops_test_drift_capture", folder="tests/dags", module="llmops_test_drift_capture", attr="capture_dag"
    )
    captured = f"{aws.s3_uri('sagemaker')}/datacapture/{ENDPOINT}"
    ti = drift_dag.test(
        run_conf={
            "reference_uri": validated["dataset_uri"],
            "capture_uri": captured,
            "window_end": time.time() + 60,
            "artifact_root": aws.s3_uri("drift"),
            "policy": {"window_minutes": 60, "min_rows": 20, "checks": ["text_descriptors", "prediction"]},
        }
    ).get_task_instance("drift")
    assert ti.state == "success"
    out = ti.xcom_pull(task_ids="drift")
    assert out["capture_uri"] == captured and out["capture_files"] >= 1 and out["rows"] >= 20, out
    assert out["verdict"] in ("drift", "no_drift"), out  # judged on the captured requests, not "too_few_rows"


def test_tuning_on_sagemaker_hands_on_the_best_trial(sagemaker_env: Any, tmp_path: Path) -> None:
    from conftest import prepare_chatterbot
    from dags_under_test import load_dag

    aws = sagemaker_env
    dataset = aws.upload_folder(prepare_chatterbot(tmp_path / "data", topics="ai,food,greetings,money"), "data/tune")
    dag = load_dag("llmops_test_sagemaker_tune", folder="tests/dags", module="llmops_test_sagemaker", attr="tune_dag")
    run = dag.test(run_conf={"dataset_uri": dataset, "n_trials": 2})
    ti = run.get_task_instance("tune")
    assert ti.state == "success"
    out = ti.xcom_pull(task_ids="tune")
    job = aws.client("sagemaker").describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=out["job_name"])
    assert job["HyperParameterTuningJobStatus"] == "Completed" and len(out["job_name"]) <= 32
    values = [t["value"] for t in out["trials"]]
    assert len(values) == 2 and out["best_value"] == max(v for v in values if v is not None)
    best = out["best_params"]
    assert 1e-5 <= best["learning_rate"] <= 1e-3 and best["warmup_ratio"] in (0.0, 0.1)
    assert out["best_training_spec"]["learning_rate"] == best["learning_rate"]
    assert out["best_training_spec"]["dataset_uri"] == dataset
    # The best trial's container trained with those values (the runtime applied them to the spec).
    root = aws.training_root(out["best_training_job"])
    tuned = json.loads((root / "input/config/hyperparameters.json").read_text())
    assert float(tuned["learning_rate"]) == pytest.approx(best["learning_rate"])
    used = json.loads((root / "output/data/spec.json").read_text())
    assert used["learning_rate"] == pytest.approx(best["learning_rate"])
