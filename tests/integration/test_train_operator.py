"""TrainModelOperator in a real Airflow run: deferred to the trigger, tracked in a real MLflow server."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import prepare_chatterbot


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("dataset"), topics="ai,food,greetings")


def _run(conf):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_train", folder="tests/dags", module="llmops_test_train", attr="train_dag")
    return dag.test(run_conf=conf).get_task_instance("train")


def test_deferred_training_reports_model_metrics_and_its_mlflow_run(airflow_db, tmp_path, dataset, mlflow_server):
    import mlflow

    ti = _run({"dataset_uri": str(dataset), "jobs_root": str(tmp_path), "tracking_uri": mlflow_server.url})
    assert ti.state == "success"
    out = ti.xcom_pull(task_ids="train")
    assert Path(out["model_uri"]).joinpath("model.safetensors").is_file()
    assert 0 <= out["metrics"]["eval_accuracy"] <= 1 and out["metrics"]["train_tokens"] > 0
    link = ti.xcom_pull(task_ids="train", key="_link_MLflowRunLink")
    assert link.startswith(mlflow_server.url) and out["mlflow_run_id"] in link

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    mlrun = client.get_run(out["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["max_steps"] == "8"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")] == [2, 4, 6, 8]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "model")}
    assert "model/model.safetensors" in artifacts
    assert mlrun.data.tags["llmops.run_key"] == out["job_name"]


def test_an_unknown_model_fails_the_task_with_the_reason(airflow_db, tmp_path, dataset, capfd):
    ti = _run({"dataset_uri": str(dataset), "jobs_root": str(tmp_path), "model": "no-such-org/no-such-model"})
    assert ti.state == "failed"
    out, err = capfd.readouterr()
    assert "no-such-org/no-such-model" in out + err
