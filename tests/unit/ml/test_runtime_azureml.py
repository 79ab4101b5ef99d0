"""The runtime's Azure ML contract: which environment means Azure ML, and the nodes it reads from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_llmops.ml import runtime


def test_azure_ml_is_detected_by_its_run_id_and_vertex_wins_its_own_variables() -> None:
    assert runtime.is_azureml({"AZUREML_RUN_ID": "job-1"}) and not runtime.is_azureml({"CLUSTER_SPEC": "{}"})
    assert not runtime.is_vertex({"AZUREML_RUN_ID": "job-1"})


def test_the_nodes_come_from_azure_mls_pytorch_variables() -> None:
    env = {"AZUREML_NODE_COUNT": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.4", "WORLD_SIZE": "3"}
    cluster = runtime.azureml_cluster(env)
    assert (cluster.nnodes, cluster.node_rank, cluster.master_host) == (3, 2, "10.0.0.4")
    single = runtime.azureml_cluster({})
    assert (single.nnodes, single.node_rank) == (1, 0)
    assert runtime.azureml_cluster({"WORLD_SIZE": "2", "NODE_RANK": "1"}).nnodes == 2  # one process per node
    with pytest.raises(runtime.ContractError, match="NODE_RANK 2 is not a node"):
        runtime.azureml_cluster({"AZUREML_NODE_COUNT": "2", "NODE_RANK": "2"})
    with pytest.raises(runtime.ContractError, match="whole number"):
        runtime.azureml_cluster({"NODE_RANK": "x"})


def test_a_bad_input_fails_with_the_reason_in_the_result(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    env = {
        "AZUREML_RUN_ID": "job-1",
        "LLMOPS_SPEC": '{"max_steps": 1}',
        "LLMOPS_DATASET_URI": str(tmp_path / "no-such-dataset"),
        "LLMOPS_RESULT_URI": str(result),
        "LLMOPS_WORK_DIR": str(tmp_path / "work"),
    }
    assert runtime.train(env) == runtime.EXIT_BAD_INPUT
    assert "no-such-dataset" in result.read_text()


def test_serve_takes_the_deployments_model_folder(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    argv = runtime.serve_argv([], {"LLMOPS_MODEL_STORAGE_URI": model.as_uri(), "LLMOPS_VARIANT_NAME": "blue"})
    assert argv[argv.index("--model") + 1] == f"blue={model}" and argv[argv.index("--port") + 1] == "8080"


def test_a_sweep_trial_keeps_its_outputs_apart_and_reports_to_azure_mls_mlflow_run() -> None:
    azure = {
        "AZUREML_RUN_ID": "tune-1_3",
        "MLFLOW_TRACKING_URI": "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/s",
        "MLFLOW_RUN_ID": "tune-1_3",
        "MLFLOW_EXPERIMENT_ID": "e1",
        "MLFLOW_TRACKING_TOKEN": "workspace-token",
    }
    env = runtime.azureml_env(
        {
            **azure,
            "LLMOPS_TRIAL_OUTPUT_URI": "abfs://c@a.dfs.core.windows.net/llmops/tuning/tune-1/",
            "LLMOPS_HP_METRIC": "eval_accuracy",
            "LLMOPS_MLFLOW_TRACKING_URI": "http://mlflow:5000",
        }
    )
    assert env["LLMOPS_MODEL_DIR"] == "abfs://c@a.dfs.core.windows.net/llmops/tuning/tune-1/tune-1_3/model"
    assert env["LLMOPS_RESULT_URI"].endswith("/tune-1/tune-1_3/llmops/result.json")
    assert env["LLMOPS_CHECKPOINT_DIR"].endswith("/tune-1/tune-1_3/checkpoints")
    # The metric goes to the run Azure ML made for the trial; the training logs to the pipeline's server, and
    # neither Azure's run id nor its token reaches it.
    assert env["LLMOPS_HP_MLFLOW_URI"] == azure["MLFLOW_TRACKING_URI"] and env["LLMOPS_HP_MLFLOW_RUN_ID"] == "tune-1_3"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert not {"MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_TOKEN"} & set(env)
    assert env["LLMOPS_HP_MLFLOW_TOKEN"] == "workspace-token"  # for the metric's call to Azure's server only


def test_the_workspace_token_is_set_only_around_the_metrics_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_llmops.ml import hypertune

    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    seen: list[str | None] = []
    with hypertune._token("workspace-token"):
        seen.append(os.environ.get("MLFLOW_TRACKING_TOKEN"))
    assert seen == ["workspace-token"] and "MLFLOW_TRACKING_TOKEN" not in os.environ


def test_azure_mls_own_mlflow_stays_unless_the_pipeline_names_one() -> None:
    azure = {"AZUREML_RUN_ID": "job-1", "MLFLOW_TRACKING_URI": "azureml://x", "MLFLOW_RUN_ID": "job-1"}
    assert runtime.azureml_env(azure) == azure  # a user's own command job: Azure ML's tracking as usual
    untracked = runtime.azureml_env({**azure, "LLMOPS_MLFLOW_TRACKING_URI": ""})
    assert "MLFLOW_TRACKING_URI" not in untracked and "MLFLOW_RUN_ID" not in untracked
    with pytest.raises(runtime.ContractError, match="MLFLOW_RUN_ID are not set"):
        runtime.azureml_env({"AZUREML_RUN_ID": "job-1", "LLMOPS_HP_METRIC": "eval_accuracy"})


def test_the_requests_and_the_runtime_name_the_same_variables() -> None:
    from airflow_llmops.ml import hypertune
    from airflow_llmops.platforms.azureml import requests as R

    assert R.PIPELINE_TRACKING_ENV == runtime.ENV_PIPELINE_TRACKING_URI
    assert R.TRIAL_OUTPUT_ENV == runtime.ENV_TRIAL_OUTPUT_URI and R.HP_METRIC_ENV == hypertune.ENV_METRIC
