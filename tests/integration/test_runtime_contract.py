"""The runtime image's contract, run as SageMaker runs it but outside a container: ``python -m
airflow_llmops.ml.runtime train`` and ``serve`` with ``$LLMOPS_OPT_ML`` as ``/opt/ml`` laid out by hand (config,
dataset channel, checkpoints, model), on one host and on two, failing, stopped and resumed; and the server's
SageMaker routes, ``GET /ping`` and ``POST /invocations``.

Kept small for a 2-core machine: MiniLM with 6 steps of 8 short texts, one thread per process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import prepare_chatterbot
from test_serving_models import LABELS, build_classifier, build_tiny_lm

from airflow_llmops.processes import ManagedProcess, free_port, http_ok
from airflow_llmops.specs import TrainingSpec

pytestmark = pytest.mark.integration
TIMEOUT = 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("runtime-data") / "topics")


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


def _opt_ml(root: Path, spec: TrainingSpec, dataset: Path | None, hosts: list[str], current: str) -> Path:
    """``/opt/ml`` as SageMaker lays it out before it starts the container."""
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps({"llmops_spec": spec.to_json()}))
    resources = {"current_host": current, "hosts": hosts, "network_interface_name": "eth0"}
    (config / "resourceconfig.json").write_text(json.dumps(resources))
    channel = root / "input" / "data" / "dataset"
    if dataset is not None and not channel.exists():
        shutil.copytree(dataset, channel)
    channel.mkdir(parents=True, exist_ok=True)
    return root


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMOPS_", "SM_", "AIP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(LLMOPS_OPT_ML=str(root), **extra)
    return env


RUNTIME = [sys.executable, "-m", "airflow_llmops.ml.runtime"]


def _train(root: Path, **env: str) -> subprocess.Popen[str]:
    log = (root / "container.log").open("a")
    return subprocess.Popen([*RUNTIME, "train"], env=_env(root, **env), stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str], root: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise AssertionError(f"train did not end in {TIMEOUT}s:\n{_log(root)}") from None


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the runtime forwards it to torchrun, which stops its workers
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _log(root: Path) -> str:
    return (root / "container.log").read_text(errors="replace")[-4000:]


def _status(root: Path) -> dict[str, Any]:
    return json.loads((root / "output" / "data" / "status.json").read_text())


def _model_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "model").iterdir()) if (root / "model").is_dir() else []


def test_a_failing_job_names_the_problem_in_output_failure(tmp_path: Path) -> None:
    # The dataset channel exists but holds no prepared dataset: the training entry point's own message.
    root = _opt_ml(tmp_path / "no-data", _spec(), None, ["algo-1"], "algo-1")
    code = _finish(_train(root), root)
    assert code != 0
    failure = (root / "output" / "failure").read_text()
    assert "manifest" in failure and str(root / "input" / "data" / "dataset") in failure, failure
    assert _status(root)["state"] == "failed"
    assert _model_files(root) == []
    # No spec at all: the container's contract is broken, exit 2 before anything starts.
    bare = tmp_path / "no-spec"
    (bare / "input" / "config").mkdir(parents=True)
    (bare / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"epochs": "1"}))
    assert _finish(_train(bare), bare) == 2
    assert "has no 'llmops_spec'" in (bare / "output" / "failure").read_text()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``runtime serve`` with a classifier where SageMaker extracts model.tar.gz."""
    root = tmp_path / "opt-ml"
    shutil.copytree(build_classifier(), root / "model")
    port = free_port()
    env = _env(root, LLMOPS_SERVE_PORT=str(port), LLMOPS_SERVE_HOST="127.0.0.1")
    process = ManagedProcess("runtime-serve", [*RUNTIME, "serve"], tmp_path / "serve.log", env=env).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(lambda: http_ok(f"{url}/ping"), timeout=120, what="/ping", interval=0.3)
        yield url
    finally:
        process.stop()


def test_serve_answers_ping_and_invocations(served: str) -> None:
    with httpx.Client(base_url=served, timeout=60, trust_env=False) as client:
        ping = client.get("/ping")
        assert ping.status_code == 200 and ping.json()["ready"] is True
        one = client.post("/invocations", json={"inputs": "do you like pizza?"})
        assert one.status_code == 200, one.text
        assert one.headers["X-LLMOps-Variant"] == "model"
        body = one.json()
        assert body["variant"] == "model" and body["results"][0]["label"] in LABELS.values()
        many = client.post("/invocations", json=["hello there", "my bank account"])
        assert many.status_code == 200 and len(many.json()["results"]) == 2
        # The server's own routes are still there.
        assert client.post("/v1/classify", json={"inputs": "hello"}).status_code == 200
        for bad in ('{"inputs": ', '{"inputs": 3}', '{"input": "x"}', "[]"):
            answer = client.post("/invocations", content=bad, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, (bad, answer.text)
            assert answer.json()["error"]["type"] == "invalid_request_error" and "Traceback" not in answer.text
        assert "send {" in client.post("/invocations", json={"input": "x"}).json()["error"]["message"]
        csv = client.post("/invocations", content="a,b", headers={"Content-Type": "text/csv"})
        assert csv.status_code == 415 and "application/json" in csv.json()["error"]["message"]


def test_serve_without_a_model_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    done = subprocess.run(
        [*RUNTIME, "serve"], env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert f"{tmp_path / 'model'} is empty" in done.stderr and "ModelDataUrl" in done.stderr


def test_invocations_of_a_causal_lm_answer_as_completions_and_count_like_the_server_routes(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from airflow_llmops.serving.app import create_app
    from airflow_llmops.serving.config import ServerConfig, VariantSpec
    from airflow_llmops.serving.request_log import read_request_log

    config = ServerConfig(
        variants=[VariantSpec(name="lm", source=str(build_tiny_lm()), weight=1)],
        request_log=tmp_path / "requests",
        max_tokens_limit=32,
        wait_for_models_s=120,
    )
    with TestClient(create_app(config)) as client:
        answer = client.post("/invocations", json={"inputs": "hello there", "parameters": {"max_new_tokens": 4}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "text_completion" and body["model"] == "lm"
        assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] <= 4
        assert answer.headers["X-LLMOps-Variant"] == "lm"
        two = client.post("/invocations", json={"inputs": ["hi", "good morning"], "parameters": {"temperature": 0}})
        assert [c["index"] for c in two.json()["choices"]] == [0, 1]
        too_many = client.post("/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 999}})
        assert too_many.status_code == 400 and "--max-tokens-limit" in too_many.json()["error"]["message"]
        unknown = client.post("/invocations", json={"inputs": "hi", "parameters": {"top_k": 5}})
        assert unknown.status_code == 400 and "max_new_tokens" in unknown.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert 'llmops_requests_total{endpoint="/invocations",shadow="false",variant="lm"} 3.0' in metrics
        client.app.state.llmops.request_log.flush()  # type: ignore[attr-defined]
    logged = list(read_request_log(tmp_path / "requests"))
    assert [(r["endpoint"], r["input"], r["variant"]) for r in logged] == [
        ("/invocations", "hello there", "lm"),
        ("/invocations", "hi", "lm"),
        ("/invocations", "good morning", "lm"),
    ]
    assert all(isinstance(r["output"], str) and r["latency_ms"] > 0 for r in logged)
