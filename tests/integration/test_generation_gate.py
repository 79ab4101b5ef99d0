"""The generation gate in a real Airflow run: a tiny chat model (GPT-2 built from a config, the byte-level BPE tokenizer
trained on the conversations, the default chat template saved with it, as chat training saves it) evaluated by
``EvaluateModelOperator`` under ``dag.test()`` on held-out conversations: perplexity on the assistant's tokens,
ROUGE-L, BLEU and chrF of greedy answers, an LLM judge on a local OpenAI-compatible server reached over HTTP, the
metrics in MLflow, the samples in the report, and a ROUGE-L bound that cannot be met failing the gate."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from conftest import prepare_chatterbot, require_module

require_module("transformers")
require_module("openai")

from standins.openai_compatible import OpenAICompatibleStandIn  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("generation-gate")]

API_KEY = "sk-judge-secret-4f9c"
CONN_ID = "llmops_test_judge"


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = prepare_chatterbot(
        tmp_path_factory.mktemp("chats") / "chatterbot-chat", kind="chat", topics="ai,food,greetings,conversations"
    )
    assert json.loads((folder / "manifest.json").read_text())["splits"]["test"]["conversations"] >= 8
    return folder


@pytest.fixture(scope="module")
def chat_model(chat_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What TrainingSpec(task="chat") saves for tiny-gpt2, untrained: the model folder with chat_template.jinja."""
    import pandas as pd
    import torch
    from transformers import GPT2LMHeadModel

    from airflow_llmops.ml.data.chat import ROLE_MARKERS
    from airflow_llmops.ml.training import data as D
    from airflow_llmops.ml.training import models as M

    train = pd.read_parquet(chat_dataset / "train.parquet")
    tokenizer = M.train_bpe_tokenizer(D.chat_corpus(train), 64, ROLE_MARKERS)
    assert D.ensure_chat_template(tokenizer)
    torch.manual_seed(0)
    config = M.tiny_gpt2_config(
        vocab_size=len(tokenizer), max_seq_length=64, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
    )
    folder = tmp_path_factory.mktemp("chat-model") / "model"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "chat_template.jinja").is_file()
    return folder


def _run(conf: dict):
    from dags_under_test import load_dag

    dag = load_dag(
        "llmops_test_generation", folder="tests/dags", module="llmops_test_generation", attr="generation_dag"
    )
    run = dag.test(run_conf=conf)
    return run, run.get_task_instance("evaluate")


def _report(evaluated: dict) -> str:
    return Path(evaluated["report_uri"].removeprefix("file://")).read_text()


def test_chat_model_scored_and_judged_over_http(
    airflow_db, chat_model, chat_dataset, mlflow_server, monkeypatch, capfd
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "http", "password": API_KEY}))
    with OpenAICompatibleStandIn(lambda body: "Grade: 6") as judge:
        conf = {
            "model_uri": str(chat_model),
            "dataset_uri": str(chat_dataset),
            "tracking_uri": mlflow_server.url,
            "registered_model_name": f"chat-gate-{uuid.uuid4().hex[:8]}",  # no champion yet
            "metric": "rouge_l",
            "judge": {"base_url": judge.base_url, "model": "judge-1", "conn_id": CONN_ID},
        }
        run, ti = _run(conf)
    assert run.state == "success", ti.state
    evaluated = ti.xcom_pull(task_ids="evaluate")
    metrics = evaluated["challenger"]
    assert evaluated["passed"] and evaluated["metric"] == "rouge_l" and "no champion" in evaluated["message"]
    assert metrics["perplexity"] > 1 and metrics["scored_tokens"] > 0 and metrics["generated"] == 8
    assert all(0.0 <= metrics[name] <= 1.0 for name in ("rouge_l", "bleu", "chrf", "generation_ok_rate"))
    assert metrics["judge_score"] == 6.0 and metrics["judge_ungraded"] == 0

    # The judge got each answer once, with the connection's password as the bearer token and the rubric.
    assert len(judge.requests) == 8
    assert {r["authorization"] for r in judge.requests} == {f"Bearer {API_KEY}"}
    first = judge.requests[0]["body"]["messages"][1]["content"]
    assert "<|user|>" in first and "Reference answer:\n" in first and "Answer to grade:\n" in first

    report = _report(evaluated)
    assert "Samples (8 held-out prompts" in report and "challenger answer" in report
    assert "&lt;|user|&gt;" in report and "<|user|>" not in report  # prompts rendered by the chat template, escaped
    assert "judge" in report

    client = MlflowClient(tracking_uri=mlflow_server.url)
    logged = client.get_run(evaluated["mlflow_run_id"])
    assert logged.data.tags["llmops.gate"] == "pass" and logged.data.tags["llmops.task"] == "chat"
    assert {"challenger.rouge_l", "challenger.bleu", "challenger.chrf", "challenger.judge_score"} <= set(
        logged.data.metrics
    )
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "evaluation")}
    assert {"evaluation/index.html", "evaluation/samples.json"} <= artifacts

    # The key is never in XCom, the report or the task log.
    out, err = capfd.readouterr()
    assert API_KEY not in json.dumps(evaluated) + report + out + err


def test_unreachable_rouge_l_bound_fails_the_gate_against_the_champion(
    airflow_db, chat_model, chat_dataset, mlflow_server, capfd
) -> None:
    from airflow_llmops.ml import registry

    name = f"chat-gate-{uuid.uuid4().hex[:8]}"
    registry.register_model(chat_model, name, tracking_uri=mlflow_server.url, alias="champion")
    conf = {
        "model_uri": str(chat_model),
        "dataset_uri": str(chat_dataset),
        "tracking_uri": mlflow_server.url,
        "registered_model_name": name,
        "metric": "rouge_l",
        "min_score": 1.5,  # ROUGE-L is at most 1
    }
    _, ti = _run(conf)
    assert ti.state == "failed"
    out, err = capfd.readouterr()
    assert "evaluation gate failed" in out + err and "must be at least 1.5000" in out + err
    evaluated = ti.xcom_pull(task_ids="evaluate", key="evaluation")
    assert evaluated["champion_uri"] == f"models:/{name}/1"
    assert evaluated["challenger"]["rouge_l"] == evaluated["champion"]["rouge_l"]  # the same model, greedy
    assert "judge_score" not in evaluated["challenger"]  # the judge is off by default
    report = _report(evaluated)
    assert "Gate: FAIL" in report and "champion answer" in report


def test_auto_metric_is_perplexity_and_judge_score_without_a_judge_is_explained(
    airflow_db, chat_model, chat_dataset, capfd
) -> None:
    conf = {
        "model_uri": str(chat_model),
        "dataset_uri": str(chat_dataset),
        "registered_model_name": "",
        "metric": "judge_score",
        "generation_rows": 2,
    }
    _, ti = _run(conf)
    assert ti.state == "failed"
    out, err = capfd.readouterr()
    assert "metric 'judge_score' not computed" in out + err and "judge_score needs judge=" in out + err
    _, ti = _run({**conf, "metric": "auto"})
    assert ti.state == "success"
    evaluated = ti.xcom_pull(task_ids="evaluate")
    assert evaluated["metric"] == "perplexity" and evaluated["passed"]
    assert evaluated["challenger"]["generated"] == 2
