"""The drift check on SageMaker Data Capture instead of the request log: real Evidently on real MiniLM embeddings,
over capture files written in SageMaker's layout and line format (JSON and base64 bodies, a few broken lines), read
from a local folder and from S3 (a moto server reached through the Airflow connection alone)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import time
from pathlib import Path

import pytest
from conftest import moto_s3, prepare_chatterbot

pytestmark = pytest.mark.integration

TOPICS = "ai,botprofile,coding,computers,emotion,food,greetings,humor,literature,money,movies,politics,science,sports"
POLICY = {"sample_size": 300, "min_rows": 20, "min_drifted_checks": 2, "drift_share": 0.25, "cooldown_hours": 24}
HOUR = 3600.0
ENDPOINT = "chatterbot-topics"
BUCKET = "llm-capture"
CONN_ID = "capture_s3"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("drift-capture") / "reference", topics=TOPICS)


def _body(value: object, encoding: str) -> dict:
    raw = json.dumps(value)
    data = base64.b64encode(raw.encode()).decode() if encoding == "BASE64" else raw
    return {"observedContentType": "application/json", "data": data, "encoding": encoding}


def _capture(folder: Path, dataset: Path, *, n: int, foreign: float, seed: int, end: float) -> Path:
    """Data Capture of ``n`` requests to variant AllTraffic in the hour before ``end`` (``foreign`` of them
    Spanish), as ``<folder>/<endpoint>/AllTraffic/yyyy/mm/dd/hh/*.jsonl``, plus two broken lines."""
    import pandas as pd

    from airflow_llmops.ml.data.chatterbot import load_chatterbot

    held = pd.concat([pd.read_parquet(dataset / f"{s}.parquet") for s in ("validation", "test")])
    labels = pd.read_parquet(dataset / "train.parquet")["label"].tolist()
    spanish = load_chatterbot("chatterbot://spanish")["text"].tolist()
    rng = random.Random(seed)
    rows = held.sample(n=n, random_state=seed)
    texts, outputs = rows["text"].tolist(), rows["label"].tolist()
    for i in rng.sample(range(n), int(n * foreign)):
        texts[i], outputs[i] = rng.choice(spanish), rng.choice(labels)
    root = folder / ENDPOINT / "AllTraffic"
    for i, (text, label) in enumerate(zip(texts, outputs, strict=True)):
        at = end - HOUR + (i + 0.5) * HOUR / n
        when = dt.datetime.fromtimestamp(at, tz=dt.timezone.utc)
        encoding = "BASE64" if i % 2 else "JSON"
        answer = {"variant": "model", "results": [{"label": label, "score": 0.9, "scores": {label: 0.9}}]}
        line = {
            "captureData": {
                "endpointInput": {**_body({"inputs": text}, encoding), "mode": "INPUT"},
                "endpointOutput": {**_body(answer, "BASE64"), "mode": "OUTPUT"},
            },
            "eventMetadata": {"eventId": f"e{seed}-{i}", "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
            "eventVersion": "0",
        }
        path = root / when.strftime("%Y/%m/%d/%H") / f"capture-{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(json.dumps(line) + "\n")
            if i in (3, 7):
                out.write('{"captureData": {"endpointInput": {"data": "cut sh\n')
    return folder / ENDPOINT


def test_operator_checks_a_local_capture_folder_and_emits_the_drift_event(airflow_db, dataset, tmp_path):
    from dags_under_test import load_dag

    from airflow_llmops.operators.drift import drift_asset

    dag = load_dag(
        "llmops_test_drift_capture", folder="tests/dags", module="llmops_test_drift_capture", attr="capture_dag"
    )
    end = time.time()
    capture = _capture(tmp_path / "capture", dataset, n=120, foreign=0.4, seed=6, end=end)
    conf = {
        "reference_uri": str(dataset),
        "capture_uri": str(capture),
        "window_end": end,
        "artifact_root": str(tmp_path / "artifacts"),
        "policy": POLICY,
    }
    ti = dag.test(run_conf=conf).get_task_instance("drift")
    assert ti.state == "success"
    out = ti.xcom_pull(task_ids="drift")
    assert out["rows"] == 120 and out["corrupt_lines"] == 2, out
    assert out["capture_uri"] == str(capture) and out["request_log_uri"] is None and out["capture_files"] >= 1
    assert out["drift"] and out["signal"] == "emitted", out
    assert "embeddings" in out["drifted_checks"]
    latency = out["checks"]["latency"]
    assert latency["drift"] is None and "Data Capture records no latency" in latency["note"]
    assert Path(out["report_uri"].removeprefix("file://")).is_file()
    state = json.loads((tmp_path / "artifacts" / "drift-state.json").read_text())
    assert state["drift-capture-test-model"]["window_end"] == pytest.approx(end)
    assert drift_asset("drift-capture-test-model").uri == "x-llmops://drift-capture-test-model/drift"


def test_operator_stages_only_the_windows_hours_from_s3(airflow_db, dataset, tmp_path, monkeypatch):
    from dags_under_test import load_dag

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AIRFLOW__LLMOPS__ARTIFACT_CONN_ID", CONN_ID)
    monkeypatch.setenv("AIRFLOW__LLMOPS__STAGING_ROOT", str(tmp_path / "staging"))
    dag = load_dag(
        "llmops_test_drift_capture", folder="tests/dags", module="llmops_test_drift_capture", attr="capture_dag"
    )
    end = time.time()
    local = _capture(tmp_path / "capture", dataset, n=60, foreign=0.0, seed=8, end=end)
    # Yesterday's traffic in the same bucket: outside the window, never downloaded.
    _capture(tmp_path / "old", dataset, n=30, foreign=0.0, seed=9, end=end - 86_400)
    with moto_s3(monkeypatch, CONN_ID, BUCKET) as client:
        for source in (tmp_path / "capture", tmp_path / "old"):
            for file in sorted(source.rglob("*.jsonl")):
                key = f"datacapture/{file.relative_to(source).as_posix()}"
                client.put_object(Bucket=BUCKET, Key=key, Body=file.read_bytes())
        conf = {
            "reference_uri": str(dataset),
            "capture_uri": f"s3://{BUCKET}/datacapture/{ENDPOINT}",
            "window_end": end,
            "artifact_root": str(tmp_path / "artifacts"),
            "policy": {**POLICY, "checks": ["text_descriptors", "prediction"]},
        }
        ti = dag.test(run_conf=conf).get_task_instance("drift")
    assert ti.state == "success"
    out = ti.xcom_pull(task_ids="drift")
    assert out["rows"] == 60 and out["corrupt_lines"] == 2 and out["verdict"] == "no_drift", out
    staged = sorted(p.name for p in (tmp_path / "staging").rglob("*.jsonl"))
    assert staged and all(name == "capture-8.jsonl" for name in staged)  # only the window's hour folders
    assert len(staged) == len(list(local.rglob("*.jsonl")))
