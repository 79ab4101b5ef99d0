"""TuneHyperparametersOperator in a real Airflow run: Optuna trials as MLflow child runs, pruning, best params to
XCom; and the study continuing where a previous attempt stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepare_chatterbot


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("dataset"), topics="ai,food,greetings,money")


def test_study_prunes_a_bad_trial_and_hands_on_the_best_params(airflow_db, tmp_path, dataset, mlflow_server):
    import mlflow
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_tune", folder="tests/dags", module="llmops_test_tune", attr="tune_dag")
    conf = {"dataset_uri": str(dataset), "jobs_root": str(tmp_path), "tracking_uri": mlflow_server.url}
    ti = dag.test(run_conf=conf).get_task_instance("tune")
    assert ti.state == "success"
    out = ti.xcom_pull(task_ids="tune")
    assert out["metric"] == "eval_loss" and out["direction"] == "minimize"
    assert out["best_params"]["learning_rate"] in (1e-4, 3e-4)
    assert (out["trials_complete"], out["trials_pruned"], out["trials_failed"]) == (2, 1, 0)
    pruned = next(t for t in out["trials"] if t["state"] == "PRUNED")
    assert pruned["params"] == {"learning_rate": 0.9}
    assert out["best_training_spec"]["learning_rate"] == out["best_params"]["learning_rate"]
    assert Path(out["best_model_uri"]).joinpath("model.safetensors").is_file()
    others = [t["number"] for t in out["trials"] if t["number"] != out["best_trial"]]
    assert not any((tmp_path / out["job_name"] / f"trial-{n:03d}" / "model").exists() for n in others)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_pruned"] == 1
    assert parent.data.tags["best.learning_rate"] == str(out["best_params"]["learning_rate"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    states = sorted((c.data.tags["llmops.trial_state"], c.info.status) for c in children)
    assert states == [("COMPLETE", "FINISHED"), ("COMPLETE", "FINISHED"), ("PRUNED", "KILLED")]
    best = next(c for c in children if c.info.run_id == pruned["mlflow_run_id"])
    assert [m.step for m in client.get_metric_history(best.info.run_id, "eval_loss")] == [2]  # stopped at once
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    assert not any(client.list_artifacts(c.info.run_id) for c in children)  # only the best model is uploaded
    link = ti.xcom_pull(task_ids="tune", key="_link_MLflowRunLink")
    assert link.startswith(mlflow_server.url) and out["mlflow_run_id"] in link


def _tune(spec: dict, job_dir: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "airflow_llmops.ml.tune", "--spec", json.dumps(spec), "--job-dir", str(job_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)


def test_a_second_attempt_continues_the_study(dataset, tmp_path, capsys):
    from airflow_llmops.ml.tune import main

    spec = {
        "training": {"dataset_uri": str(dataset), "max_steps": 1, "per_device_batch_size": 8, "max_seq_length": 16},
        "search_space": {"learning_rate": {"type": "categorical", "choices": [1e-4, 2e-4]}},
        "n_trials": 1,
        "eval_every_steps": 1,
        "pruner": "none",
    }
    args = ["--job-dir", str(tmp_path), "--spec"]
    assert main([*args, json.dumps(spec)]) == 0  # in-process: the study, not the interpreter start, is tested
    capsys.readouterr()
    assert main([*args, json.dumps({**spec, "n_trials": 2})]) == 0
    second = capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    assert [t["number"] for t in result["trials"]] == [0, 1]  # trial 0 was not run again
    assert "[tune] trial 0 " not in second and "[tune] trial 1 params" in second


def test_bad_input_is_reported_before_any_trial(dataset, tmp_path):
    spec = {
        "training": {"dataset_uri": str(dataset)},
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
        "metric": "eval_bleu",
    }
    done = _tune(spec, tmp_path)
    assert done.returncode == 2
    assert "metric 'eval_bleu' is not reported for classification" in done.stderr
    assert json.loads((tmp_path / "result.json").read_text())["state"] == "failed"
    assert not list(tmp_path.glob("trial-*"))
