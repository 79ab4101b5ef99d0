"""The runtime image's Vertex AI contract, run as Vertex AI runs it but outside a container: ``python -m
airflow_llmops.ml.runtime train`` with ``$CLUSTER_SPEC``, ``$LLMOPS_SPEC``, ``$LLMOPS_DATASET_URI``,
``$AIP_MODEL_DIR`` and ``$AIP_CHECKPOINT_DIR`` (``file://`` folders here, ``gs://`` on Vertex AI), on one replica
and on two, preempted and resumed, and failing; and ``serve`` with ``$AIP_STORAGE_URI``, ``$AIP_HEALTH_ROUTE``
and ``$AIP_PREDICT_ROUTE``.

Kept small for a 2-core machine: MiniLM with 6 steps of 8 short texts, one thread per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import prepare_chatterbot
from test_serving_models import LABELS, build_classifier, build_tiny_lm

from airflow_llmops.ml.runtime import FAILURE_PREFIX, train_vertex
from airflow_llmops.processes import ManagedProcess, free_port, http_ok
from airflow_llmops.specs import TrainingSpec

pytestmark = pytest.mark.integration
TIMEOUT = 300
RUNTIME = [sys.executable, "-m", "airflow_llmops.ml.runtime"]
HEALTH = "/v1/endpoints/123/deployedModels/456"
PREDICT = "/v1/endpoints/123/deployedModels/456:predict"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("vertex-data") / "topics")


def _spec(**overrides: Any) -> TrainingSpec:
    base = {
        "max_steps": 6,
        "per_device_batch_size": 8,
        "max_seq_length": 32,
        "checkpoint_every_steps": 3,
        "log_every_steps": 2,
        "distributed": {"nproc_per_node": 1},
    }
    return TrainingSpec.parse({**base, **overrides})


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment Vertex AI gives a CustomJob replica (minus what only the cloud has)."""
    prefixes = ("MLFLOW_", "LLMOPS_", "SM_", "AIP_", "CLUSTER_SPEC", "CLOUD_ML_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(
        LLMOPS_WORK_DIR=str(tmp / "work"),
        AIP_MODEL_DIR=(tmp / "model").as_uri(),
        AIP_CHECKPOINT_DIR=(tmp / "checkpoints").as_uri(),
        AIP_TENSORBOARD_LOG_DIR=(tmp / "logs").as_uri(),
        CLOUD_ML_JOB_ID="1234567890",
        LLMOPS_SPEC=_spec().to_json(),
        LLMOPS_RESULT_URI=(tmp / "llmops" / "result.json").as_uri(),
    )
    env.update(extra)
    return env


def _train(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[str]:
    """``<image> train ARGS`` with stdout and stderr kept apart (the failure line is stderr's last)."""
    return subprocess.Popen(
        [*RUNTIME, "train", *args],
        env=env,
        stdout=log.with_suffix(".out").open("w"),
        stderr=log.with_suffix(".err").open("w"),
        text=True,
    )


def _finish(proc: subprocess.Popen[str], log: Path) -> tuple[int, str, str]:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = -9
    return code, log.with_suffix(".out").read_text(errors="replace"), log.with_suffix(".err").read_text()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_missing_dataset_fails_with_the_reason_as_the_last_stderr_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    env = _env(tmp_path, LLMOPS_DATASET_URI=missing.as_uri())  # AIP_MODEL_DIR alone: Vertex AI, one replica
    code, out, err = _finish(_train(env, tmp_path / "run"), tmp_path / "run")
    assert code == 2, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(FAILURE_PREFIX) and str(missing) in last and "LLMOPS_DATASET_URI" in last, err
    assert _names(tmp_path / "model") == []
    record = json.loads((tmp_path / "llmops" / "result.json").read_text())
    assert record["state"] == "failed" and record["exit_code"] == 2 and str(missing) in record["message"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"LLMOPS_SPEC": ""}, "LLMOPS_SPEC is not set"),
        ({"LLMOPS_SPEC": '{"learning_rate": -1}'}, "LLMOPS_SPEC is not a valid TrainingSpec"),
        ({"CLUSTER_SPEC": "{"}, "CLUSTER_SPEC is not JSON"),
        ({"LLMOPS_MASTER_PORT": "x"}, "LLMOPS_MASTER_PORT must be a port number"),
    ],
)
def test_unusable_inputs_exit_2_with_a_failure_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], reason: str
) -> None:
    assert train_vertex({**_env(tmp_path, LLMOPS_DATASET_URI=str(tmp_path)), **change}) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(FAILURE_PREFIX) and reason in last


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``runtime serve`` as Vertex AI starts a deployed model's container."""
    port = free_port()
    env = _env(
        tmp_path,
        AIP_STORAGE_URI=build_classifier().as_uri(),
        AIP_HTTP_PORT=str(port),
        AIP_HEALTH_ROUTE=HEALTH,
        AIP_PREDICT_ROUTE=PREDICT,
        AIP_DEPLOYED_MODEL_ID="456",
        AIP_ENDPOINT_ID="123",
        LLMOPS_SERVE_HOST="127.0.0.1",
        LLMOPS_OPT_ML=str(tmp_path / "no-opt-ml"),
    )
    for name in ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "LLMOPS_SPEC"):
        env.pop(name)
    process = ManagedProcess("runtime-serve", [*RUNTIME, "serve"], tmp_path / "serve.log", env=env).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(lambda: http_ok(url + HEALTH), timeout=120, what=HEALTH, interval=0.3)
        yield url
    finally:
        process.stop()


def test_serve_answers_vertex_ais_health_and_predict_routes(served: str) -> None:
    with httpx.Client(base_url=served, timeout=60, trust_env=False) as client:
        health = client.get(HEALTH)
        assert health.status_code == 200 and health.json()["ready"] is True
        answer = client.post(PREDICT, json={"instances": ["do you like pizza?", {"inputs": "my bank account"}]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["deployedModelId"] == "456" and len(body["predictions"]) == 2
        for prediction in body["predictions"]:
            assert prediction["label"] in LABELS.values() and 0 <= prediction["score"] <= 1
            assert set(prediction["scores"]) == set(LABELS.values())
        # The same texts through /v1/classify: the same answers.
        classify = client.post("/v1/classify", json={"inputs": ["do you like pizza?", "my bank account"]}).json()
        assert [p["label"] for p in body["predictions"]] == [r["label"] for r in classify["results"]]
        text = client.post(PREDICT, json={"instances": [{"text": "hello"}], "parameters": {"temperature": 0}})
        assert text.status_code == 200 and len(text.json()["predictions"]) == 1
        bad_bodies = [
            "{",
            "[]",
            '{"inputs": "x"}',
            '{"instances": []}',
            '{"instances": [3]}',
            '{"instances": [{"prompt": "x"}]}',
            '{"instances": ["x"], "parameters": {"top_k": 5}}',
        ]
        for bad in bad_bodies:
            reply = client.post(PREDICT, content=bad, headers={"Content-Type": "application/json"})
            assert reply.status_code == 400, (bad, reply.text)
            assert reply.json()["error"]["type"] == "invalid_request_error" and "Traceback" not in reply.text
        assert '"instances"' in client.post(PREDICT, json={"inputs": "x"}).json()["error"]["message"]
        assert client.get("/ping").status_code == 200  # SageMaker's routes are still there
        metrics = client.get("/metrics").text
        assert f'llmops_requests_total{{endpoint="{PREDICT}",shadow="false",variant="model"}} 2.0' in metrics


def test_predictions_of_a_causal_lm_are_generated_texts_logged_like_the_other_routes(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from airflow_llmops.serving.app import create_app
    from airflow_llmops.serving.config import ServerConfig, VariantSpec
    from airflow_llmops.serving.request_log import read_request_log

    config = ServerConfig(
        variants=[VariantSpec(name="lm", source=str(build_tiny_lm()), weight=1)],
        request_log=tmp_path / "requests",
        max_tokens_limit=32,
        wait_for_models_s=120,
        health_route="/health",
        predict_route="/predict",
    )
    with TestClient(create_app(config)) as client:
        assert client.get("/health").status_code == 200
        answer = client.post(
            "/predict", json={"instances": ["hello there", {"text": "hi"}], "parameters": {"max_new_tokens": 4}}
        )
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert "deployedModelId" not in answer.json()  # no AIP_DEPLOYED_MODEL_ID here
        assert len(predictions) == 2 and all(isinstance(p["text"], str) and p["finish_reason"] for p in predictions)
        assert answer.headers["X-LLMOps-Variant"] == "lm"
        too_many = client.post("/predict", json={"instances": ["hi"], "parameters": {"max_new_tokens": 999}})
        assert too_many.status_code == 400 and "--max-tokens-limit" in too_many.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert 'llmops_requests_total{endpoint="/predict",shadow="false",variant="lm"} 2.0' in metrics
        client.app.state.llmops.request_log.flush()  # type: ignore[attr-defined]
    logged = [(r["endpoint"], r["input"]) for r in read_request_log(tmp_path / "requests")]
    assert logged == [("/predict", "hello there"), ("/predict", "hi")]


def test_vertex_routes_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_llmops.serving.config import ServerConfig

    monkeypatch.setenv("AIP_HEALTH_ROUTE", HEALTH)
    monkeypatch.setenv("AIP_PREDICT_ROUTE", PREDICT)
    monkeypatch.setenv("AIP_DEPLOYED_MODEL_ID", "456")
    config = ServerConfig().with_env_defaults()
    assert (config.health_route, config.predict_route, config.deployed_model_id) == (HEALTH, PREDICT, "456")
    assert ServerConfig(predict_route="/mine").with_env_defaults().predict_route == "/mine"  # explicit wins
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "predict")
    with pytest.raises(ValueError, match="AIP_PREDICT_ROUTE='predict' is not a URL path"):
        ServerConfig().with_env_defaults()
