"""The runtime's Azure ML contract: which environment means Azure ML, and the nodes it reads from it."""

from __future__ import annotations

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
