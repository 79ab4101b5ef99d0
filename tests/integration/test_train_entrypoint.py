"""The training entry point as its callers run it: ``python -m airflow_llmops.ml.train`` as a plain process and
under torchrun, on tiny prepared datasets built with the real prepare code from the chatterbot corpus.

Kept small for a 2-core machine: ~10-40 optimizer steps, short sequences, one thread per process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import prepare_chatterbot

from airflow_llmops.specs.training import TrainingSpec

CORPUS = "chatterbot://english?topics=ai,food,greetings,money"
PROGRESS_FIELDS = {
    "step",
    "total_steps",
    "epoch",
    "loss",
    "learning_rate",
    "tokens_per_s",
    "samples_per_s",
    "eta_s",
    "elapsed_s",
}
TIMEOUT = 240


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    return {
        "topics": prepare_chatterbot(root / "topics", kind="classification"),
        "dialog": prepare_chatterbot(root / "dialog", kind="dialog"),
        "no_validation": prepare_chatterbot(
            root / "no_validation", kind="classification", train=0.9, validation=0.0, test=0.1
        ),
        "two_topics": prepare_chatterbot(root / "two_topics", kind="classification", topics="ai,food"),
    }


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMOPS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _command(tmp: Path, spec: TrainingSpec, job: Path) -> list[str]:
    spec_file = tmp / f"spec-{job.name}.json"
    spec_file.write_text(spec.to_json(), encoding="utf-8")
    return [sys.executable, "-m", "airflow_llmops.ml.train", "--spec", str(spec_file), "--job-dir", str(job)]


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)  # type: ignore[call-overload]


def _status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


def _progress(job: Path, offset: int = 0) -> list[dict]:
    text = (job / "progress.jsonl").read_bytes()[offset:].decode()
    return [json.loads(line) for line in text.splitlines() if line]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _classifier_spec(dataset: Path, **overrides: object) -> TrainingSpec:
    base: dict[str, object] = {
        "task": "classification",
        "dataset_uri": str(dataset),
        "max_steps": 10,
        "per_device_batch_size": 8,
        "max_seq_length": 32,
        "log_every_steps": 3,
        "checkpoint_every_steps": 5,
        "learning_rate": 1e-4,
    }
    return TrainingSpec.parse({**base, **overrides})


@pytest.fixture(scope="module")
def classifier_job(datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("classifier")
    job = tmp / "job"
    result = _run(_command(tmp, _classifier_spec(datasets["topics"]), job), env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return job


def test_classification_with_minilm_single_process(classifier_job: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    status = _status(classifier_job)
    assert status["state"] == "succeeded"
    assert status["world_size"] == 1 and status["resumed_from_step"] is None and status["mlflow_run_id"] is None
    metrics = status["metrics"]
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_macro_f1"] <= 1
    assert metrics["train_tokens"] > 0 and metrics["tokens_per_s"] > 0 and math.isfinite(metrics["eval_loss"])
    for key in ("train_loss", "train_runtime_s", "energy_kwh", "emissions_kg", "energy_kwh_per_1k_tokens"):
        assert key in metrics

    model_dir = Path(status["model_uri"])
    assert model_dir == classifier_job / "model" and (model_dir / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.id2label == {0: "ai", 1: "food", 2: "greetings", 3: "money"}
    assert model.config.label2id == {"ai": 0, "food": 1, "greetings": 2, "money": 3}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logits = model(**tokenizer(["what is artificial intelligence?"], return_tensors="pt")).logits
    assert logits.shape == (1, 4)

    lines = _progress(classifier_job)
    assert [line["step"] for line in lines] == [3, 6, 9, 10]
    assert all(set(line) >= PROGRESS_FIELDS for line in lines)
    assert lines[-1]["final"] is True and lines[-1]["total_steps"] == 10 and lines[0]["loss"] > 0
    checkpoints = sorted(p.name for p in (classifier_job / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-10", "checkpoint-5"]


def test_causal_lm_tiny_gpt2_under_torchrun_with_two_processes(datasets: dict[str, Path], tmp_path: Path) -> None:
    spec = TrainingSpec(
        task="causal_lm",
        dataset_uri=f"file://{datasets['dialog']}",
        max_steps=8,
        per_device_batch_size=8,
        max_seq_length=64,
        learning_rate=1e-3,
        log_every_steps=4,
        checkpoint_every_steps=4,
    )
    job = tmp_path / "job"
    train = _command(tmp_path, spec, job)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d"]
    torchrun += ["--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *train[1:]]
    result = _run(torchrun, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]

    status = _status(job)
    assert status["state"] == "succeeded" and status["world_size"] == 2
    assert math.isfinite(status["metrics"]["eval_perplexity"]) and status["metrics"]["eval_perplexity"] > 1
    assert [line["step"] for line in _progress(job)] == [4, 8, 8]  # one writer (rank 0), plus the final line

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(job / "model")
    tokenizer = AutoTokenizer.from_pretrained(job / "model")
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"


def _complete_checkpoint(job: Path) -> int | None:
    folder = job / "checkpoints"
    steps = []
    for child in folder.iterdir() if folder.is_dir() else []:
        try:
            state = json.loads((child / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if (child / "model.safetensors").is_file():
            steps.append(int(state["global_step"]))
    return max(steps, default=None)


def test_a_killed_run_resumes_from_its_newest_complete_checkpoint(datasets: dict[str, Path], tmp_path: Path) -> None:
    spec = _classifier_spec(datasets["topics"], max_steps=30, checkpoint_every_steps=10, log_every_steps=5)
    job = tmp_path / "job"
    cmd = _command(tmp_path, spec, job)
    log = tmp_path / "first.log"
    with log.open("w") as out:  # a file, not a pipe: a full pipe buffer would stall the child
        first = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    checkpoint = None
    while checkpoint is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        checkpoint = _complete_checkpoint(job)
    still_running = first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group, as on_kill does
    first.wait(timeout=30)
    assert checkpoint is not None and still_running, f"no checkpoint before the run ended: {log.read_text()[-3000:]}"
    assert not (job / "status.json").exists()
    offset = (job / "progress.jsonl").stat().st_size

    second = _run(cmd, env=_env())
    assert second.returncode == 0, second.stderr[-3000:]
    status = _status(job)
    assert status["state"] == "succeeded" and status["resumed_from_step"] >= checkpoint
    assert f"resuming from checkpoint {job / 'checkpoints'}" in second.stdout
    steps = [line["step"] for line in _progress(job, offset)]
    assert steps and min(steps) > status["resumed_from_step"] and steps[-1] == 30
    assert _complete_checkpoint(job) == 30 and len(list((job / "checkpoints").iterdir())) <= 2


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_model", ["unknown model 'no-such-org/no-such-model'", "local path"]),
        ("empty_validation", ["has 0 rows in split 'validation'"]),
        ("huge_batch", ["per_device_batch_size=4096 with max_seq_length=512", "use per_device_batch_size <="]),
        ("head_mismatch", ["already has a classification head for 4 labels", "2 labels ['ai', 'food']"]),
    ],
)
def test_bad_input_fails_fast_with_an_actionable_message(
    case: str, expected: list[str], datasets: dict[str, Path], classifier_job: Path, tmp_path: Path
) -> None:
    spec = {
        "unknown_model": _classifier_spec(datasets["topics"], model="no-such-org/no-such-model"),
        "empty_validation": _classifier_spec(datasets["no_validation"]),
        # The largest batch the spec accepts: on CPU this is an OOM kill, not an exception, unless estimated.
        "huge_batch": _classifier_spec(datasets["topics"], per_device_batch_size=4096, max_seq_length=512),
        "head_mismatch": _classifier_spec(datasets["two_topics"], model=str(classifier_job / "model")),
    }[case]
    job = tmp_path / "job"
    started = time.monotonic()
    result = _run(_command(tmp_path, spec, job), env=_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.monotonic() - started < 120
    status = _status(job)
    assert status["state"] == "failed"
    for fragment in expected:
        assert fragment in status["message"]
    assert not (job / "checkpoints").exists()


def test_mlflow_run_is_continued_by_a_retry_with_the_same_run_key(datasets: dict[str, Path], tmp_path: Path) -> None:
    spec = TrainingSpec(
        task="causal_lm",
        dataset_uri=str(datasets["dialog"]),
        max_steps=6,
        per_device_batch_size=8,
        max_seq_length=48,
        learning_rate=1e-3,
        log_every_steps=2,
        checkpoint_every_steps=3,
        mlflow_experiment="train-entrypoint-test",
    )
    job = tmp_path / "job"
    cmd = _command(tmp_path, spec, job)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(MLFLOW_TRACKING_URI=uri, LLMOPS_RUN_KEY="llmops_local/manual__2026-11-26/train")
    first = _run(cmd, env=env, cwd=tmp_path)  # cwd: the sqlite store's default artifact root is ./mlruns
    assert first.returncode == 0, first.stderr[-3000:]
    first_status = _status(job)
    second = _run(cmd, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    second_status = _status(job)
    assert second_status["resumed_from_step"] == 6
    run_id = first_status["mlflow_run_id"]
    assert run_id and second_status["mlflow_run_id"] == run_id
    assert json.loads((job / "mlflow.json").read_text())["run_id"] == run_id

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["llmops.run_key"] == "llmops_local/manual__2026-11-26/train"
    assert run.data.params["task"] == "causal_lm" and run.data.params["max_steps"] == "6"
    assert run.data.params["distributed.backend"] == "auto"
    assert {"eval_perplexity", "train_tokens", "tokens_per_s"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/tokenizer.json", "model/config.json"} <= artifacts
    experiment = client.get_experiment_by_name("train-entrypoint-test")
    assert experiment is not None and len(client.search_runs([experiment.experiment_id])) == 1


def test_an_unreadable_spec_is_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({"task": "classification", "per_device_batch_size": 0}), encoding="utf-8")
    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "airflow_llmops.ml.train", "--spec", str(bad), "--job-dir", str(job)]
    result = _run(cmd, env=_env())
    assert result.returncode == 2
    assert "per_device_batch_size" in _status(job)["message"]


def test_running_out_of_memory_at_a_step_becomes_a_batch_size_message() -> None:
    from airflow_llmops.ml.training.preflight import explain_out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 1 TiB")
    explained = explain_out_of_memory(cpu, 512, 256)
    assert explained is not None and explained.exit_code == 2
    assert "per_device_batch_size=512" in str(explained) and "lower per_device_batch_size" in str(explained)
    assert explain_out_of_memory(RuntimeError("shape mismatch"), 512, 256) is None
