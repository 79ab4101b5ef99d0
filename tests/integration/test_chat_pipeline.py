"""The conversational-AI pipeline (dags/llmops_chat.py) end to end under dag.test(): chatterbot dialogs as
conversations through every stage to its own registered model and endpoint, which the ``openai`` client then talks
to (a chat completion, and the same one streamed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import require_module

TOPICS = "greetings,humor,food"


def _conf(**overrides: Any) -> dict[str, Any]:
    """A quick run of the chat DAG: a few training steps, a few evaluated conversations, no bake time."""
    return {
        "dataset_source": f"chatterbot://english?topics={TOPICS}",
        "max_steps": 8,
        "generation_rows": 4,
        "max_new_tokens": 8,
        "bake_seconds": 0,
        "max_quality_drop": 1000.0,  # the wiring; quality gates have their own tests
        **overrides,
    }


def _chat_exchange(openai: Any, deployed: dict[str, Any]) -> None:
    """The openai client against the deployed endpoint: a reply, and the same reply streamed in pieces; then the
    endpoint is stopped."""
    from airflow_llmops.platforms import get_platform

    endpoints = get_platform("local", endpoints_root=deployed["platform_kwargs"]["endpoints_root"])
    try:
        client = openai.OpenAI(base_url=f"{deployed['url']}/v1", api_key="unused", timeout=60, max_retries=0)
        messages = [{"role": "user", "content": "Hello, how are you?"}]
        # Seeded sampling (a few steps of training often make the end of turn the likeliest first token): the same
        # seed gives the same reply, whole or streamed.
        sampling: dict[str, Any] = {"max_tokens": 8, "temperature": 0.8, "seed": 7}
        reply = client.chat.completions.create(model=deployed["variant"], messages=messages, **sampling)
        text = reply.choices[0].message.content
        assert reply.model == deployed["variant"] and text, reply
        stream = client.chat.completions.create(model=deployed["variant"], messages=messages, stream=True, **sampling)
        chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert "".join(chunks) == text, (chunks, text)
    finally:
        endpoints.stop_endpoint("chatterbot-chat")


def test_chat_dag_params_offer_only_the_chat_task() -> None:
    from airflow.sdk.exceptions import ParamValidationError
    from dags_under_test import load_dag

    params = load_dag("llmops_chat").params
    assert params.get_param("task").resolve("chat") == "chat"
    with pytest.raises(ParamValidationError):
        params.get_param("task").resolve("classification")
    assert params.get_param("gate_metric").resolve("rouge_l") == "rouge_l"
    with pytest.raises(ParamValidationError):
        params.get_param("gate_metric").resolve("accuracy")


def test_chat_pipeline_runs_end_to_end_and_serves_the_openai_chat_api(
    airflow_db: Path, own_mlflow: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    openai = require_module("openai")
    from dags_under_test import load_dag

    monkeypatch.setenv("AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI", own_mlflow.url)
    dag = load_dag("llmops_chat")
    run = dag.test(run_conf=_conf(canary_steps=[50, 100]))
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert run.state == "success", states

    prepared = run.get_task_instance("prepare").xcom_pull(task_ids="prepare")
    manifest = json.loads(Path(prepared["dataset_uri"].removeprefix("file://"), "manifest.json").read_text())
    assert manifest["task"] == "chat" and manifest["splits"]["train"]["conversations"] > 0, manifest
    assert Path(prepared["dataset_uri"].removeprefix("file://")).parent.name != "chatterbot-topics"
    trained = run.get_task_instance("train").xcom_pull(task_ids="train")
    assert Path(trained["model_uri"], "tokenizer_config.json").is_file()
    quantized = run.get_task_instance("quantize").xcom_pull(task_ids="quantize")
    assert quantized["chosen_method"] == "torch_dynamic_int8", quantized
    evaluated = run.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    assert evaluated["passed"] and evaluated["champion"] is None, evaluated  # its own first version
    assert evaluated["challenger"]["perplexity"] > 1 and "rouge_l" in evaluated["challenger"], evaluated
    registered = run.get_task_instance("register").xcom_pull(task_ids="register")
    assert registered["uri"].startswith("models:/chatterbot-chat-assistant/"), registered
    deployed = run.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    rolled = run.get_task_instance("rollout").xcom_pull(task_ids="rollout")
    assert deployed["handle"]["endpoint_name"] == "chatterbot-chat", deployed
    assert rolled["state"] == "succeeded" and rolled["promoted"]["version"] == registered["version"], rolled
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:  # the promotion is an event on the chat model's own champion Asset
        uris = session.scalars(select(AssetModel.uri).join(AssetEvent, AssetEvent.asset_id == AssetModel.id)).all()
    assert "x-llmops://models/chatterbot-chat-assistant/champion" in uris, uris
    assert "x-llmops://datasets/chatterbot-conversations" in uris, uris

    _chat_exchange(openai, deployed)


def test_chat_pipeline_serves_an_onnx_int8_chat_model(
    airflow_db: Path, own_mlflow: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``onnx_dynamic_int8``, offered by the chat DAG, is chosen, evaluated with the generation metrics and served:
    the openai client gets the same greedy reply whole and streamed."""
    openai = require_module("openai")
    from dags_under_test import load_dag

    monkeypatch.setenv("AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI", own_mlflow.url)
    dag = load_dag("llmops_chat")
    # The second run of the module: the first one's model is the champion. gate_metric=rouge_l (another value the
    # Param offers) with room to be worse than it: this checks the ONNX wiring, the gates have their own tests.
    conf = _conf(canary_steps=[100], quantization_methods=["onnx_dynamic_int8"], gate_metric="rouge_l")
    conf["min_improvement"] = -1000.0
    run = dag.test(run_conf=conf)
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert run.state == "success", states
    quantized = run.get_task_instance("quantize").xcom_pull(task_ids="quantize")
    assert quantized["chosen_method"] == "onnx_dynamic_int8", quantized
    evaluated = run.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    assert evaluated["passed"] and evaluated["model_uri"] == quantized["chosen_model_uri"], evaluated
    assert evaluated["metric"] == "rouge_l" and evaluated["champion"] is not None, evaluated  # judged on ROUGE-L
    challenger = evaluated["challenger"]
    assert challenger["perplexity"] > 1 and {"rouge_l", "bleu", "chrf"} <= set(challenger), evaluated
    deployed = run.get_task_instance("deploy").xcom_pull(task_ids="deploy")
    rolled = run.get_task_instance("rollout").xcom_pull(task_ids="rollout")
    assert rolled["state"] == "succeeded", rolled

    _chat_exchange(openai, deployed)


def test_quantization_measures_conversations_as_chat_training_renders_them(tmp_path: Path) -> None:
    """A chat dataset has a ``messages`` column, no prompt/response: quantization measures perplexity on each
    well-formed conversation rendered by the model's chat template (malformed ones are left out)."""
    import pandas as pd

    from airflow_llmops.ml.data.chat import render_chat
    from airflow_llmops.ml.quantization.compare import eval_texts

    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"role": "assistant", "content": "nobody asked"}]
    pd.DataFrame({"record_id": ["a", "b"], "messages": [json.dumps(good), json.dumps(bad)]}).to_parquet(
        tmp_path / "validation.parquet"
    )
    texts, labels = eval_texts(tmp_path, "validation", 10, task="causal_lm")
    assert texts == [render_chat(good)] and labels is None
