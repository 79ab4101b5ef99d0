"""PrepareDatasetOperator in a real Airflow run (dag.test), reading and writing s3:// on a moto server."""

from __future__ import annotations

import json

import pytest
from conftest import moto_s3 as s3_server


@pytest.fixture(scope="module")
def moto_s3(monkeypatch_module):
    with s3_server(monkeypatch_module, "moto_s3", "llm-data") as client:
        yield client


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _rows(n: int):
    topics = ["billing", "shipping", "returns"]
    return [
        {"text": f"Question {i} about {topics[i % 3]}: where is parcel {i * 7}?", "label": topics[i % 3]}
        for i in range(n)
    ]


def _run(source: str, artifact_root: str, conn_id: str | None = "moto_s3", validation: dict | None = None):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_prepare", folder="tests/dags", module="llmops_test_data", attr="prepare_dag")
    conf = {"source": source, "conn_id": conn_id, "artifact_root": artifact_root, "validation": validation or {}}
    return dag.test(run_conf=conf)


def _state(run, task_id: str) -> str:
    return str(run.get_task_instance(task_id).state)


def test_prepare_reads_and_writes_s3_and_is_byte_identical_on_rerun(airflow_db, moto_s3):
    body = "".join(json.dumps(r) + "\n" for r in _rows(90)) + '{"text": broken\n'
    moto_s3.put_object(Bucket="llm-data", Key="raw/tickets.jsonl", Body=body.encode())
    first = _run("s3://llm-data/raw/tickets.jsonl", "s3://llm-data/artifacts")
    second = _run("s3://llm-data/raw/tickets.jsonl", "s3://llm-data/artifacts")
    for run in (first, second):
        assert _state(run, "prepare") == "success"

    def files(run):
        prefix = f"artifacts/llmops_test_prepare/{run.run_id.replace(':', '_').replace('+', '_')}/datasets/tickets/"
        listing = moto_s3.list_objects_v2(Bucket="llm-data", Prefix=prefix).get("Contents", [])
        top = [o["Key"] for o in listing if "/" not in o["Key"][len(prefix) :]]
        return {k[len(prefix) :]: moto_s3.get_object(Bucket="llm-data", Key=k)["Body"].read() for k in top}

    a, b = files(first), files(second)
    assert set(a) == {
        "train.parquet",
        "validation.parquet",
        "test.parquet",
        "removed.parquet",
        "rejected_input.parquet",
        "manifest.json",
    }
    assert a == b
    manifest = json.loads(a["manifest.json"])
    assert manifest["input_rows"] == 90 and manifest["rejected_input_rows"] == 1
    assert manifest["source"] == "s3://llm-data/raw/tickets.jsonl"
    assert sum(s["rows"] for s in manifest["splits"].values()) == manifest["output_rows"]


def test_missing_source_fails_the_task_with_the_uri(airflow_db, moto_s3, capfd):
    run = _run("s3://llm-data/raw/nothing-here.jsonl", "s3://llm-data/artifacts")
    assert _state(run, "prepare") == "failed"
    out, err = capfd.readouterr()
    assert "no file or folder at s3://llm-data/raw/nothing-here.jsonl" in out + err


def _logs(capfd) -> str:
    out, err = capfd.readouterr()
    return out + err


def test_validate_on_s3_writes_clean_data_quarantine_and_report(airflow_db, moto_s3):
    rows = _rows(120)
    rows[5]["text"] = "x " * 600  # over max_tokens: quarantined, not fatal at 1/120 with a 2% budget
    rows[7]["text"] = "Mail me at jane.doe@example.com about parcel 49"
    body = "".join(json.dumps(r) + "\n" for r in rows)
    moto_s3.put_object(Bucket="llm-data", Key="raw/v.jsonl", Body=body.encode())
    validation = {"max_tokens": 256, "pii_action": "redact", "max_quarantine_fraction": 0.02, "min_rows_per_label": 3}
    run = _run("s3://llm-data/raw/v.jsonl", "s3://llm-data/artifacts", validation=validation)
    assert _state(run, "validate") == "success"
    prefix = f"artifacts/llmops_test_prepare/{run.run_id.replace(':', '_').replace('+', '_')}/datasets/tickets/"
    keys = {o["Key"][len(prefix) :] for o in moto_s3.list_objects_v2(Bucket="llm-data", Prefix=prefix)["Contents"]}
    assert {"validated/train.parquet", "validated/manifest.json", "validation/quarantine.parquet"} <= keys
    assert "validation/report/index.html" in keys
    manifest = json.loads(moto_s3.get_object(Bucket="llm-data", Key=prefix + "validated/manifest.json")["Body"].read())
    assert manifest["quarantined_rows"] == 1 and manifest["output_rows"] == 119
    assert manifest["validation"]["pii_redacted"] == {"email": 1}
    validated_text = b"".join(
        moto_s3.get_object(Bucket="llm-data", Key=prefix + f"validated/{s}.parquet")["Body"].read()
        for s in ("train", "validation", "test")
    )
    assert b"jane.doe@example.com" not in validated_text


def _local_run(tmp_path, rows_or_text, validation, name="data.jsonl"):
    path = tmp_path / name
    if isinstance(rows_or_text, str):
        path.write_text(rows_or_text)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_or_text))
    return _run(f"file://{path}", str(tmp_path / "artifacts"), conn_id=None, validation=validation)


def test_personal_data_fails_the_privacy_gate_and_keeps_the_evidence(airflow_db, tmp_path, capfd):
    rows = _rows(60)
    rows[3]["text"] = "card 4111 1111 1111 1111 please"
    rows[9]["text"] = "call +44 20 7946 0958 now"
    run = _local_run(tmp_path, rows, {"pii_action": "fail", "max_quarantine_fraction": 0.5, "min_rows_per_label": 3})
    assert _state(run, "prepare") == "success" and _state(run, "validate") == "failed"
    logs = _logs(capfd)
    assert "credit_card" in logs and "phone" in logs
    assert "4111 1111 1111 1111" not in logs.split("Validation summary")[-1]
    import pandas as pd

    quarantine = next((tmp_path / "artifacts").rglob("validation/quarantine.parquet"))
    reasons = " ".join(pd.read_parquet(quarantine)["quarantine_reasons"])
    assert "pii:credit_card" in reasons and "pii:phone" in reasons
    assert next((tmp_path / "artifacts").rglob("validation/report/index.html")).is_file()


def test_too_many_bad_rows_fail_with_the_fraction_and_examples(airflow_db, tmp_path, capfd):
    rows = _rows(60)
    for i in range(0, 60, 6):
        rows[i]["text"] = " ".join(f"w{i}x{j}" for j in range(150))  # distinct, so not deduplicated
    run = _local_run(tmp_path, rows, {"max_tokens": 100, "max_quarantine_fraction": 0.05, "min_rows_per_label": 3})
    assert _state(run, "validate") == "failed"
    logs = _logs(capfd)
    assert "quarantine" in logs.lower() and "0.05" in logs and "token_length" in logs


def test_a_single_label_fails_validation(airflow_db, tmp_path, capfd):
    rows = [{"text": f"only one class here, sample {i}", "label": "same"} for i in range(40)]
    run = _local_run(tmp_path, rows, {"min_rows_per_label": 3})
    assert _state(run, "validate") == "failed"
    assert "label" in _logs(capfd).lower()


def test_csv_with_the_wrong_columns_names_them(airflow_db, tmp_path, capfd):
    run = _local_run(tmp_path, "body,category\nhello,a\n", {}, name="data.csv")
    assert _state(run, "prepare") == "failed"
    assert "has no column(s) ['text', 'label']; found ['body', 'category']" in _logs(capfd)
