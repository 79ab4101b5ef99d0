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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import prepare_chatterbot
from test_serving_models import LABELS, build_classifier, build_tiny_lm

from airflow_llmops.ml.training.jobdir import JobDir
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


def test_one_host_trains_into_model_and_checkpoints(dataset: Path, tmp_path: Path) -> None:
    root = _opt_ml(tmp_path / "opt-ml", _spec(), dataset, ["algo-1"], "algo-1")
    code = _finish(_train(root), root)
    assert code == 0, _log(root)
    assert "model.safetensors" in _model_files(root) and "tokenizer.json" in _model_files(root)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    status = _status(root)
    assert status["state"] == "succeeded" and status["model_uri"] == str(root / "model")
    assert status["world_size"] == 1 and status["resumed_from_step"] is None
    spec = TrainingSpec.from_json((root / "output" / "data" / "spec.json").read_text())
    assert spec.dataset_uri == str(root / "input" / "data" / "dataset") and spec.output_uri == str(root / "model")
    progress = (root / "output" / "data" / "progress.jsonl").read_text().splitlines()
    assert json.loads(progress[-1])["step"] == 6 and json.loads(progress[-1])["final"] is True
    assert "[train] step 6/6" in (root / "output" / "data" / "train.log").read_text()
    assert not (root / "output" / "failure").exists()


def test_two_hosts_train_one_job_and_only_the_first_holds_the_model(dataset: Path, tmp_path: Path) -> None:
    hosts = ["algo-1", "algo-2"]
    port = str(free_port())
    roots = [_opt_ml(tmp_path / host, _spec(), dataset, hosts, host) for host in hosts]
    procs = [_train(root, LLMOPS_MASTER_ADDR="127.0.0.1", LLMOPS_MASTER_PORT=port) for root in roots]
    try:
        codes = [_finish(proc, root) for proc, root in zip(procs, roots, strict=True)]
    finally:
        for proc in procs:
            _stop(proc)
    assert codes == [0, 0], "\n\n".join(_log(root) for root in roots)
    first, second = roots
    assert "model.safetensors" in _model_files(first)
    assert _model_files(second) == []
    leader, worker = _status(first), _status(second)
    assert leader["state"] == "succeeded" and leader["world_size"] == 2
    assert worker["state"] == "succeeded" and worker["role"] == "worker-node" and worker["world_size"] == 2
    assert "(node 0 of 2)" in (first / "container.log").read_text()
    assert "(node 1 of 2)" in (second / "container.log").read_text()
    steps = [
        json.loads(line)["step"] for line in (first / "output" / "data" / "progress.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == 6  # one writer (global rank 0) for both hosts


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


def test_a_stopped_job_resumes_from_its_newest_checkpoint(dataset: Path, tmp_path: Path) -> None:
    root = _opt_ml(tmp_path / "opt-ml", _spec(max_steps=500, log_every_steps=1), dataset, ["algo-1"], "algo-1")
    job = JobDir(root / "output" / "llmops-job")
    first = _train(root)
    try:
        deadline = time.monotonic() + TIMEOUT
        while job.latest_checkpoint() is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        still_running = first.poll() is None
    finally:
        _stop(first)  # SIGTERM, as SageMaker stops a job or reclaims a spot instance
    assert still_running and job.latest_checkpoint() is not None, _log(root)
    assert first.returncode == 128 + signal.SIGTERM
    assert "SIGTERM" in (root / "output" / "failure").read_text()
    resumed_at = job.latest_checkpoint()
    assert resumed_at is not None and resumed_at.step < 500

    # The restart (SageMaker restores checkpoints/): same folder, a spec that stops two steps later.
    _opt_ml(root, _spec(max_steps=resumed_at.step + 2), dataset, ["algo-1"], "algo-1")
    second = _train(root)
    assert _finish(second, root) == 0, _log(root)
    status = _status(root)
    assert status["state"] == "succeeded" and status["resumed_from_step"] == resumed_at.step
    assert status["global_step"] == resumed_at.step + 2
    assert f"resuming from checkpoint {job.checkpoints}" in _log(root)
    assert not (root / "output" / "failure").exists()  # the successful attempt cleared the stopped one's reason


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
