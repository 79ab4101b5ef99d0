"""Supervised chat fine-tuning through the real training entry point (``python -m airflow_llmops.ml.train``): the
chatterbot corpus prepared as conversations by the data stage's code, the tiny GPT-2 trained on the assistant's
turns and tracked in a real MLflow server, then that model fine-tuned again with LoRA, saved as adapters.

Kept small for a 2-core machine: a few optimizer steps, short sequences, one process each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepare_chatterbot

from airflow_llmops.specs.training import TrainingSpec

TIMEOUT = 240


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = prepare_chatterbot(
        tmp_path_factory.mktemp("chats") / "chatterbot-chat", kind="chat", topics="ai,food,greetings,conversations"
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["task"] == "chat" and manifest["splits"]["validation"]["conversations"] > 0
    return folder


def _train(tmp: Path, spec: TrainingSpec, job: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMOPS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **env_extra)
    spec_file = tmp / f"spec-{job.name}.json"
    spec_file.write_text(spec.to_json(), encoding="utf-8")
    argv = [sys.executable, "-m", "airflow_llmops.ml.train", "--spec", str(spec_file), "--job-dir", str(job)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)


def _spec(dataset: Path, **overrides: object) -> TrainingSpec:
    base: dict[str, object] = {
        "task": "chat",
        "dataset_uri": str(dataset),
        "max_steps": 6,
        "per_device_batch_size": 8,
        "max_seq_length": 48,
        "learning_rate": 1e-3,
        "log_every_steps": 3,
        "checkpoint_every_steps": 100,
        "mlflow_experiment": "chat-training-test",
    }
    return TrainingSpec.parse({**base, **overrides})


@pytest.fixture(scope="module")
def chat_job(chat_dataset: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("chat-job")
    job = tmp / "job"
    done = _train(tmp, _spec(chat_dataset), job, MLFLOW_TRACKING_URI=mlflow_server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    return job, done.stdout


def test_chat_fine_tuning_saves_a_model_with_its_chat_template(chat_job: tuple[Path, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from airflow_llmops.ml.data.chat import CHAT_TEMPLATE, ROLE_MARKERS, render_chat

    job, stdout = chat_job
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "succeeded" and status["model"] == "tiny-gpt2"
    metrics = status["metrics"]
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_perplexity"] > 1 and metrics["train_tokens"] > 0
    # max_seq_length=48 cuts the longer dialogs: the log says how many, and how many lost every assistant token.
    assert "conversations are longer than max_seq_length=48 tokens and were truncated" in stdout

    model = AutoModelForCausalLM.from_pretrained(job / "model")
    tokenizer = AutoTokenizer.from_pretrained(job / "model")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert model.config.vocab_size == len(tokenizer)
    assert all(len(tokenizer(m, add_special_tokens=False)["input_ids"]) == 1 for m in ROLE_MARKERS)
    messages = [{"role": "user", "content": "Do you like pizza?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(messages) + "<|assistant|>\n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_chat_run_is_tracked_in_mlflow(chat_job: tuple[Path, str], mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    job, _ = chat_job
    status = json.loads((job / "status.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["task"] == "chat" and run.data.tags["llmops.task"] == "chat"
    assert {"eval_loss", "eval_perplexity", "train_tokens"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/tokenizer.json", "model/chat_template.jinja"} <= artifacts


def test_lora_on_a_local_chat_model_saves_adapters_with_the_base_reference(
    chat_job: tuple[Path, str], chat_dataset: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    base = chat_job[0] / "model"
    spec = _spec(chat_dataset, model=str(base), max_steps=3, lora={"r": 4, "merge": False})
    job = tmp_path / "job"
    done = _train(tmp_path, spec, job)
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "succeeded" and math.isfinite(status["metrics"]["eval_loss"])
    model_dir = Path(status["model_uri"])
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["r"] == 4
    assert (model_dir / "adapter_model.safetensors").is_file() and not (model_dir / "model.safetensors").exists()
    # The base model's own template (the default one it was saved with) is kept, not replaced.
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    assert "has no chat template" not in done.stdout
    merged = AutoPeftModelForCausalLM.from_pretrained(model_dir).merge_and_unload()
    assert merged.config.n_layer == 2
