"""Reference DAGs are what users copy: they import cleanly, follow our conventions and run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    files = {Path(p).name for p in (ROOT / "dags").glob("*.py")}
    assert files, "no reference DAGs"
    assert {Path(d.fileloc).name for d in dagbag.dags.values()} == files


def test_no_cycles_and_conventions(dagbag):
    for dag_id, dag in dagbag.dags.items():
        dag.check_cycle()
        assert dag.tags and "llmops" in dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        for task in dag.tasks:
            assert task.owner == "llmops", (dag_id, task.task_id)


def test_local_dag_params_are_typed_and_validated():
    from airflow.sdk import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError
    from dags_under_test import load_dag

    dag = load_dag("llmops_local")
    params = dag.params
    assert isinstance(params, ParamsDict)
    for name in ("model", "platform", "rollout_strategy", "task"):
        assert params.get_param(name).schema.get("type"), name
    with pytest.raises(ParamValidationError):
        params.get_param("platform").resolve("mainframe")
    with pytest.raises(ParamValidationError):
        params.get_param("max_steps").resolve("many")
    with pytest.raises(ParamValidationError):
        params.get_param("canary_steps").resolve(["ten"])
    assert params.get_param("rollout_strategy").resolve("blue_green") == "blue_green"


def test_local_dag_runs_and_writes_a_plan_per_run(airflow_db, own_mlflow, monkeypatch):
    from dags_under_test import load_dag

    monkeypatch.setenv("AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI", own_mlflow.url)
    dag = load_dag("llmops_local")
    conf = {
        "rollout_strategy": "linear",
        "learning_rate": 1e-4,
        "max_steps": 30,
        "quantization_methods": ["torch_dynamic_int8"],
        "max_quality_drop": 100.0,  # this checks the wiring; quality gates have their own tests
    }
    run = dag.test(run_conf=conf)
    assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}
    plan_files = sorted((airflow_db / "artifacts" / "llmops_local").glob("*/plan.json"))
    assert plan_files
    plan = json.loads(plan_files[-1].read_text())
    assert plan["run_id"] == run.run_id
    assert plan["platform"] == "local"
    assert plan["specs"]["rollout"]["strategy"] == "linear"
    assert plan["specs"]["rollout"]["traffic_steps"] == []
    assert plan["specs"]["training"]["learning_rate"] == 1e-4
    assert plan["specs"]["dataset"]["source"].startswith("chatterbot://english?topics=ai,")

    prepared = run.get_task_instance("prepare").xcom_pull(task_ids="prepare")
    assert sum(prepared["rows"].values()) > 1000 and prepared["removed"]["exact_duplicate"] > 0
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:  # the classifier's data, through the DAG's dataset alias, on its own Asset
        published = session.execute(
            select(AssetModel.uri, AssetEvent.extra)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .where(AssetEvent.source_run_id == run.run_id, AssetModel.uri.like("x-llmops://datasets/%"))
        ).all()
    assert [(uri, extra["task"]) for uri, extra in published] == [
        ("x-llmops://datasets/chatterbot-topics", "classification")
    ], published
    validated = run.get_task_instance("validate").xcom_pull(task_ids="validate")
    summary = validated["summary"]
    assert summary["success"] and summary["token_count_source"] == "n_tokens"
    manifest = json.loads(Path(validated["dataset_uri"].removeprefix("file://"), "manifest.json").read_text())
    assert (
        manifest["output_rows"]
        == summary["clean_count"]
        == sum(prepared["rows"].values()) - summary["quarantined_count"]
    )
    assert len(manifest["splits"]["train"]["labels"]) == 16

    trained = run.get_task_instance("train").xcom_pull(task_ids="train")
    assert Path(trained["model_uri"], "model.safetensors").is_file()
    assert trained["metrics"]["eval_accuracy"] > 1 / 16  # better than chance after 30 steps

    quantized = run.get_task_instance("quantize").xcom_pull(task_ids="quantize")
    assert quantized["chosen_method"] == "torch_dynamic_int8"
    evaluated = run.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    assert evaluated["passed"] and evaluated["model_uri"] == quantized["chosen_model_uri"]
    registered = run.get_task_instance("register").xcom_pull(task_ids="register")
    assert registered["run_id"] == trained["mlflow_run_id"]  # logged into the training run
    deployed = run.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    rolled = run.get_task_instance("rollout").xcom_pull(task_ids="rollout")
    assert rolled["state"] == "succeeded" and rolled["promoted"]["version"] == registered["version"]
    from airflow_llmops.platforms import get_platform

    endpoints = get_platform("local", endpoints_root=deployed["platform_kwargs"]["endpoints_root"])
    try:
        import httpx

        answer = httpx.post(f"{deployed['url']}/v1/classify", json={"inputs": "do you like pizza?"}, timeout=30)
        assert answer.status_code == 200 and answer.json()["variant"] == deployed["variant"]
        assert answer.json()["results"][0]["label"] in manifest["splits"]["train"]["labels"]
    finally:
        endpoints.stop_endpoint("chatterbot-topics")


def test_bad_params_fail_the_plan_task_with_the_field_named(airflow_db, capfd):
    from dags_under_test import load_dag

    dag = load_dag("llmops_local")
    run = dag.test(run_conf={"canary_steps": [50, 10, 100], "dataset_source": "ftp://nowhere/x.csv"})
    assert run.state == "failed"
    out, err = capfd.readouterr()
    log = out + err
    assert "RolloutPlan" in log and "increase strictly" in log
    assert "DatasetSpec.source" in log and "ftp" in log
