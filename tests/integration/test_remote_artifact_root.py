"""A remote artifact root (s3:// on a moto server): quantize, evaluate and register read the model and the dataset
from S3 and write their outputs there through the Airflow connection alone, as in the compose stack, where the
artifact root is MinIO. The process has no AWS credentials of its own: anything that handed an s3:// URI to the ML
core (pandas, transformers, MLflow) instead of staging it would fail.

Kept fast: a one-layer BERT classifier built from a config (no training), the 4-topic dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import moto_s3, prepare_chatterbot

pytestmark = pytest.mark.integration

BUCKET = "llm-remote"
CONN_ID = "remote_s3"
MODEL = "topics-test"  # the name tests/dags/llmops_test_models.py registers (on this module's own MLflow server)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def s3(monkeypatch_module, tmp_path_factory):
    """A moto S3 server reachable only through the Airflow connection ``remote_s3``: no AWS credentials in the
    environment, no credentials or config file, no instance metadata."""
    mp = monkeypatch_module
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        mp.delenv(name, raising=False)
    nowhere = tmp_path_factory.mktemp("no-aws") / "none"
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    mp.setenv("AWS_CONFIG_FILE", str(nowhere))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with moto_s3(mp, CONN_ID, BUCKET) as client:
        yield client


def _upload(client, folder: Path, prefix: str) -> str:
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{file.relative_to(folder).as_posix()}", Body=file.read_bytes()
            )
    return f"s3://{BUCKET}/{prefix}"


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _read(client, uri: str) -> bytes:
    key = uri.removeprefix(f"s3://{BUCKET}/")
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _tiny_classifier(folder: Path, labels: list[str]) -> Path:
    """A one-layer BERT with MiniLM's tokenizer and the dataset's labels, untrained: enough to quantize and score."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from airflow_llmops.ml.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def remote_inputs(s3, tmp_path_factory) -> dict[str, str]:
    import pandas as pd

    dataset = prepare_chatterbot(tmp_path_factory.mktemp("dataset") / "topics", topics="ai,food,greetings,money")
    labels = sorted({str(v) for v in pd.read_parquet(dataset / "train.parquet")["label"]})
    model = _tiny_classifier(tmp_path_factory.mktemp("model") / "tiny", labels)
    return {
        "dataset_uri": _upload(s3, dataset, "inputs/datasets/topics"),
        "model_uri": _upload(s3, model, "inputs/models/tiny"),
        "manifest_hash": json.loads((dataset / "manifest.json").read_text())["content_hash"],
    }


@pytest.fixture
def remote_root(s3, monkeypatch, tmp_path) -> Path:
    """The artifact root on S3 through the connection (as compose configures it); returns this machine's staging
    folder."""
    monkeypatch.setenv("AIRFLOW__LLMOPS__ARTIFACT_ROOT", f"s3://{BUCKET}/artifacts")
    monkeypatch.setenv("AIRFLOW__LLMOPS__ARTIFACT_CONN_ID", CONN_ID)
    monkeypatch.setenv("AIRFLOW__LLMOPS__STAGING_ROOT", str(tmp_path / "staging"))
    return tmp_path / "staging"


def test_quantize_evaluate_register_read_and_write_s3_through_the_connection(
    airflow_db, s3, remote_inputs, remote_root, own_mlflow
):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_models", folder="tests/dags", module="llmops_test_models", attr="models_dag")
    conf = {
        "model_uri": remote_inputs["model_uri"],
        "dataset_uri": remote_inputs["dataset_uri"],
        "tracking_uri": own_mlflow.url,
        "max_quality_drop": 100.0,  # an untrained model: the gate's numbers are not the point here
    }
    run = dag.test(run_conf=conf)
    assert run.state == "success", {t.task_id: t.state for t in run.get_task_instances()}

    # quantize: the artifacts and the comparison went to S3; each artifact names the S3 model it was made from.
    quantized = run.get_task_instance("quantize").xcom_pull(task_ids="quantize")
    chosen = quantized["chosen_model_uri"]
    assert chosen.startswith(f"s3://{BUCKET}/artifacts/llmops_test_models/") and chosen.endswith("/torch_dynamic_int8")
    assert quantized["report_uri"].startswith(f"s3://{BUCKET}/") and json.loads(_read(s3, quantized["report_uri"]))
    meta = json.loads(_read(s3, f"{chosen}/quantization.json"))
    assert meta["method"] == "torch_dynamic_int8" and meta["source_model"] == remote_inputs["model_uri"]
    written = _keys(s3, "artifacts/")
    assert f"{chosen.removeprefix(f's3://{BUCKET}/')}/config.json" in written, sorted(written)

    # evaluate: scored the S3 artifact on the S3 dataset's test split; its report is on S3.
    evaluated = run.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    assert evaluated["passed"] and 0 <= evaluated["challenger"]["accuracy"] <= 1
    assert evaluated["report_uri"].startswith(f"s3://{BUCKET}/")
    assert b"Gate: PASS" in _read(s3, evaluated["report_uri"])

    # register: logged the staged artifact to MLflow, tagged from the S3 manifest and the artifact's metadata.
    registered = run.get_task_instance("register").xcom_pull(task_ids="register")
    assert registered["tags"]["llmops.data_manifest_hash"] == remote_inputs["manifest_hash"]
    assert registered["tags"]["llmops.source_model"] == remote_inputs["model_uri"]
    assert registered["tags"]["llmops.quantization"] == "torch_dynamic_int8"

    # What the ML core read: local copies on this machine, staged once per content (the dataset serves both stages).
    staged = {json.loads(p.read_text())["uri"] for p in remote_root.glob("*/.llmops-staged.json")}
    assert staged == {remote_inputs["model_uri"], remote_inputs["dataset_uri"], chosen}, staged
    assert all(k.startswith("artifacts/llmops_test_models/") for k in written), sorted(written)


def test_training_stages_a_remote_dataset_for_the_local_platform_only(s3, remote_inputs, remote_root):
    from airflow_llmops.ml.training.data import load_splits
    from airflow_llmops.operators import TrainModelOperator

    local = TrainModelOperator(task_id="train", dataset_uri=remote_inputs["dataset_uri"]).training_spec()
    folder = Path(str(local.dataset_uri))
    assert folder.is_relative_to(remote_root) and (folder / "train.parquet").is_file()
    assert load_splits(str(folder)).name == "topics"  # the torchrun entry point reads it like any local folder
    # A cloud platform's job reads the store itself: the URI goes through unchanged.
    cloud = TrainModelOperator(task_id="train", platform="sagemaker", dataset_uri=remote_inputs["dataset_uri"])
    assert cloud.training_spec().dataset_uri == remote_inputs["dataset_uri"]


def test_stage_in_reuses_unchanged_content_and_refetches_changed_content(s3, tmp_path):
    from airflow_llmops.operators.base import stage_in

    s3.put_object(Bucket=BUCKET, Key="cache/data/a.txt", Body=b"one")
    s3.put_object(Bucket=BUCKET, Key="cache/data/sub/b.txt", Body=b"two")
    first = stage_in(f"s3://{BUCKET}/cache/data", CONN_ID, cache_root=tmp_path)
    assert first.name == "data" and (first / "a.txt").read_bytes() == b"one"
    assert (first / "sub" / "b.txt").read_bytes() == b"two"
    assert not (first / ".llmops-staged.json").exists()  # the marker stays beside the copy, not in it
    assert stage_in(f"s3://{BUCKET}/cache/data", CONN_ID, cache_root=tmp_path) == first
    # A URI that names its connection (as Airflow's ObjectStoragePath writes them) reaches the store through it.
    assert stage_in(f"s3://{CONN_ID}@{BUCKET}/cache/data", None, cache_root=tmp_path) == first
    single = stage_in(f"s3://{BUCKET}/cache/data/a.txt", CONN_ID, cache_root=tmp_path)
    assert single.name == "a.txt" and single.read_bytes() == b"one"

    s3.put_object(Bucket=BUCKET, Key="cache/data/a.txt", Body=b"changed")
    second = stage_in(f"s3://{BUCKET}/cache/data", CONN_ID, cache_root=tmp_path)
    assert second != first and (second / "a.txt").read_bytes() == b"changed"
    # A local URI is its own path: nothing is copied.
    assert stage_in(f"file://{first}", cache_root=tmp_path / "unused") == first
    assert not (tmp_path / "unused").exists()


def test_a_missing_remote_input_fails_the_task_naming_the_uri_and_the_connection(s3, remote_root):
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_llmops.operators import QuantizeModelOperator

    op = QuantizeModelOperator(task_id="quantize", model_uri="unused", dataset_uri="unused")
    missing = f"s3://{BUCKET}/no/such/model"
    with pytest.raises(
        AirflowFailException, match=f"cannot read the model: {missing} holds no file through connection '{CONN_ID}'"
    ):
        op.stage_in(missing, "model")
