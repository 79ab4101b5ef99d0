"""Optimize and gate in a real Airflow run against a real MLflow server: quantize the fine-tuned MiniLM, evaluate
it against the registry's champion, register it and promote it; the alias history survives two promotions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import prepare_chatterbot, train_classifier

# The second test judges against the champion the first one promoted: one worker runs them in order.
pytestmark = pytest.mark.xdist_group("model-gate")

MODEL = "topics-test"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    dataset = prepare_chatterbot(tmp_path_factory.mktemp("dataset"), topics="ai,food,greetings,money")
    return train_classifier(tmp_path_factory.mktemp("job"), dataset, steps=20), dataset


def _run(conf):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_models", folder="tests/dags", module="llmops_test_models", attr="models_dag")
    return dag.test(run_conf=conf)


def test_quantize_evaluate_register_promote_twice_keeps_the_alias_history(airflow_db, trained, mlflow_server):
    import mlflow

    from airflow_llmops.ml import registry

    model, dataset = trained
    conf = {"model_uri": str(model), "dataset_uri": str(dataset), "tracking_uri": mlflow_server.url}

    first = _run(conf)
    assert first.state == "success", {t.task_id: t.state for t in first.get_task_instances()}
    quantized = first.get_task_instance("quantize").xcom_pull(task_ids="quantize")
    assert quantized["chosen_method"] == "torch_dynamic_int8" and quantized["passed"]
    int8 = quantized["methods"]["torch_dynamic_int8"]
    assert int8["size_ratio"] < 0.8 and int8["quality_drop"] <= 5.0
    assert Path(quantized["chosen_model_uri"], "quantization.json").is_file()
    evaluated = first.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    assert evaluated["champion"] is None and "no champion" in evaluated["message"]
    assert 0 < evaluated["challenger"]["accuracy"] <= 1
    report = Path(evaluated["report_uri"].removeprefix("file://")).read_text()
    assert "Gate: PASS" in report and "confusion" in report
    registered = first.get_task_instance("register").xcom_pull(task_ids="register")
    assert registered["version"] == "1" and registered["tags"]["llmops.quantization"] == "torch_dynamic_int8"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert registered["tags"]["llmops.data_manifest_hash"] == manifest["content_hash"]
    between = time.time()
    time.sleep(0.05)

    # The registered pyfunc model predicts through MLflow alone.
    mlflow.set_tracking_uri(mlflow_server.url)
    predictions = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(["what do you like to eat?"])
    assert predictions[0] in {"ai", "food", "greetings", "money"}

    second = _run(conf)
    assert second.state == "success", {t.task_id: t.state for t in second.get_task_instances()}
    evaluated = second.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    assert evaluated["champion_uri"] == f"models:/{MODEL}/1"
    assert evaluated["challenger"]["accuracy"] == evaluated["champion"]["accuracy"]  # the same model again
    promoted = second.get_task_instance("promote").xcom_pull(task_ids="promote")
    assert (promoted["version"], promoted["previous"]) == ("2", "1")

    history = registry.alias_history(MODEL, "champion", tracking_uri=mlflow_server.url)
    assert [(h["version"], h["previous"]) for h in history] == [("1", None), ("2", "1")]
    assert registry.version_at(MODEL, "champion", between, tracking_uri=mlflow_server.url) == "1"
    assert registry.version_at(MODEL, "champion", time.time(), tracking_uri=mlflow_server.url) == "2"
    assert registry.version_at(MODEL, "champion", 0, tracking_uri=mlflow_server.url) is None

    # Each promotion is an asset event carrying the version, for DAGs scheduled on a new champion.
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_dag_id == "llmops_test_models").all()
        assert [e.extra["version"] for e in sorted(events, key=lambda e: e.timestamp)][-2:] == ["1", "2"]


def test_the_gates_fail_with_both_numbers_and_the_threshold(airflow_db, trained, mlflow_server, capfd):
    model, dataset = trained
    conf = {"model_uri": str(model), "dataset_uri": str(dataset), "tracking_uri": mlflow_server.url}
    run = _run({**conf, "min_improvement": 0.5})  # the champion is this same model: no 50-point improvement
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert states["evaluate"] == "failed" and states["register"] != "success"
    out, err = capfd.readouterr()
    assert "required >= +0.5000" in out + err and "vs champion" in out + err

    # The tolerance gate itself (0 points fails on any loss) is checked on measured rows in test_quantize.py.
