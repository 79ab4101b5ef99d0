"""Drift of live traffic: real Evidently on real all-MiniLM-L6-v2 embeddings, over simulated request logs.

Reference: the training split of the chatterbot English topics. Unshifted traffic: the held-out (validation and
test) English texts of the same topics. Shifted traffic: 30% of the inputs replaced by Spanish chatterbot texts.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from conftest import prepare_chatterbot

TOPICS = "ai,botprofile,coding,computers,emotion,food,greetings,humor,literature,money,movies,politics,science,sports"
# What the drift-monitor DAG uses, with a smaller sample to keep the tests fast.
POLICY = {"sample_size": 300, "min_rows": 20, "min_drifted_checks": 2, "drift_share": 0.25, "cooldown_hours": 24}
HOUR = 3600.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("drift") / "reference", topics=TOPICS)


@pytest.fixture(scope="module")
def traffic(dataset):
    """(held-out English rows, Spanish texts, reference labels)."""
    import pandas as pd

    from airflow_llmops.ml.data.chatterbot import load_chatterbot

    held = pd.concat([pd.read_parquet(dataset / f"{s}.parquet") for s in ("validation", "test")])
    spanish = load_chatterbot("chatterbot://spanish")["text"].tolist()
    labels = pd.read_parquet(dataset / "train.parquet")["label"].tolist()
    return held.reset_index(drop=True), spanish, labels


def _log(folder: Path, traffic, *, n: int, foreign: float, seed: int, end: float) -> Path:
    """A request log with ``n`` requests in the hour before ``end``; ``foreign`` of them Spanish, predicted as a
    label drawn from the reference's label distribution (so only the input checks can see the shift)."""
    from airflow_llmops.ml.drift import simulated_records, write_request_log

    held, spanish, labels = traffic
    rng = random.Random(seed)
    rows = held.sample(n=n, random_state=seed)
    texts, outputs = rows["text"].tolist(), rows["label"].tolist()
    for i in rng.sample(range(n), int(n * foreign)):
        texts[i], outputs[i] = rng.choice(spanish), rng.choice(labels)
    write_request_log(folder, simulated_records(texts, outputs, start=end - HOUR, end=end, seed=seed))
    return folder


def _check(dataset, log: Path, end: float, tmp_path: Path, **policy):
    from airflow_llmops.ml.drift import compute_drift, load_reference, read_window
    from airflow_llmops.specs import DriftPolicy

    return compute_drift(
        load_reference(dataset),
        read_window(log, end - HOUR, end),
        DriftPolicy.parse({**POLICY, **policy}),
        cache_dir=tmp_path / "cache",
        report_dir=tmp_path / "report",
    )


def test_unshifted_traffic_does_not_drift(dataset, traffic, tmp_path):
    end = time.time()
    result = _check(dataset, _log(tmp_path / "log", traffic, n=150, foreign=0, seed=1, end=end), end, tmp_path)
    assert result.verdict == "no_drift", result.to_dict()
    assert set(result.checks) == {"text_descriptors", "embeddings", "prediction", "latency"}
    assert result.checks["latency"].drift is None and "no latency baseline" in result.checks["latency"].note
    embeddings = result.checks["embeddings"]
    assert embeddings.method == "mmd" and embeddings.drift is False
    assert embeddings.score is not None and embeddings.threshold is not None and embeddings.score < embeddings.threshold
    assert (tmp_path / "report" / "drift-report.html").is_file()
    assert (tmp_path / "report" / "embeddings-report.html").is_file()


def test_thirty_percent_spanish_traffic_drifts(dataset, traffic, tmp_path):
    end = time.time()
    result = _check(dataset, _log(tmp_path / "log", traffic, n=150, foreign=0.3, seed=2, end=end), end, tmp_path)
    assert result.drift and result.verdict == "drift", result.to_dict()
    assert {"embeddings", "text_descriptors"} <= set(result.drifted_checks)
    assert result.checks["text_descriptors"].columns["oov_rate"]["drift"]
    # the second check of the same reference reads its embeddings from the cache
    again = _check(dataset, tmp_path / "log", end, tmp_path)
    assert "from cache" in again.checks["embeddings"].note
    assert again.checks["embeddings"].score == result.checks["embeddings"].score


@pytest.mark.parametrize("method", ["model", "distance", "ratio"])
def test_every_embedding_method_runs_with_its_own_default_threshold(dataset, traffic, tmp_path, method):
    from airflow_llmops.specs import DriftPolicy

    end = time.time()
    log = _log(tmp_path / "log", traffic, n=150, foreign=0.5, seed=3, end=end)
    result = _check(dataset, log, end, tmp_path, embedding_method=method, checks=["embeddings"], min_drifted_checks=1)
    check = result.checks["embeddings"]
    assert check.method == method and check.threshold == DriftPolicy(embedding_method=method).embedding_cutoff
    assert check.drift is True and result.verdict == "drift", result.to_dict()  # half the traffic in Spanish


def test_latency_drift_against_a_baseline(dataset, traffic, tmp_path):
    from airflow_llmops.ml.drift import compute_drift, load_reference, read_window
    from airflow_llmops.specs import DriftPolicy

    end = time.time()
    log = _log(tmp_path / "log", traffic, n=100, foreign=0, seed=3, end=end)
    slow = [random.Random(i).gauss(80, 8) for i in range(200)]
    fast = [random.Random(i).gauss(40, 8) for i in range(200)]
    policy = DriftPolicy.parse({**POLICY, "checks": ["latency"], "min_drifted_checks": 1})
    window = read_window(log, end - HOUR, end)
    assert compute_drift(load_reference(dataset), window, policy, reference_latency=fast).verdict == "no_drift"
    assert compute_drift(load_reference(dataset), window, policy, reference_latency=slow).verdict == "drift"


def test_an_empty_window_is_no_traffic_not_a_crash(dataset, tmp_path):
    result = _check(dataset, tmp_path / "nothing-here", time.time(), tmp_path)
    assert (result.drift, result.verdict, result.rows) == (False, "no_traffic", 0)
    assert "no traffic in window" in result.note


def test_a_window_below_min_rows_gets_no_verdict(dataset, traffic, tmp_path):
    end = time.time()
    result = _check(dataset, _log(tmp_path / "log", traffic, n=1, foreign=0, seed=4, end=end), end, tmp_path)
    assert (result.drift, result.verdict, result.rows) == (False, "too_few_rows", 1)
    assert "min_rows=20" in result.note


def test_corrupt_log_lines_are_skipped_and_counted(dataset, traffic, tmp_path):
    from airflow_llmops.ml.drift import read_window

    end = time.time()
    log = _log(tmp_path / "log", traffic, n=30, foreign=0, seed=5, end=end)
    with (log / "requests-sim.jsonl").open("a") as out:
        out.write('{"ts": 1, "input": "cut sho\n[1, 2]\n{"ts": "yesterday"}\n')
    window = read_window(log, end - HOUR, end)
    assert (len(window.data), window.corrupt_lines) == (30, 3)


def test_a_manifest_pointing_to_a_missing_file_is_a_clear_error(dataset, tmp_path):
    import shutil

    from airflow_llmops.ml.drift import DriftError, load_reference

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "train.parquet").unlink()
    with pytest.raises(DriftError, match=r"points to train\.parquet, but .*broken/train\.parquet is missing"):
        load_reference(broken)
    with pytest.raises(DriftError, match=r"no manifest\.json"):
        load_reference(tmp_path)


def _events(uri: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.uri == uri)
        ).all()
        return [dict(e.extra) for e in rows]


def test_operator_emits_the_drift_event_once_per_cooldown(airflow_db, dataset, traffic, tmp_path):
    from dags_under_test import load_dag

    from airflow_llmops.operators.drift import drift_asset

    dag = load_dag("llmops_test_drift", folder="tests/dags", module="llmops_test_drift", attr="drift_dag")
    end = time.time()
    log = _log(tmp_path / "endpoint" / "requests", traffic, n=120, foreign=0.4, seed=6, end=end)
    conf = {
        "reference_uri": str(dataset),
        "request_log_uri": str(log),
        "window_end": end,
        "artifact_root": str(tmp_path / "artifacts"),
        "policy": {**POLICY, "checks": ["text_descriptors", "embeddings", "prediction"]},
    }
    uri = drift_asset("drift-test-model").uri
    before = len(_events(uri))

    first = dag.test(run_conf=conf).get_task_instance("drift")
    assert first.state == "success"
    out = first.xcom_pull(task_ids="drift")
    assert out["drift"] and out["signal"] == "emitted", out
    assert out["window"]["end"] == pytest.approx(end) and out["rows"] == 120
    report = Path(out["report_uri"].removeprefix("file://"))
    assert report.name == "drift-report.html" and report.is_file() and report.with_name("drift.json").is_file()
    assert first.xcom_pull(task_ids="drift", key="_link_DriftReportLink")
    events = _events(uri)[before:]
    assert len(events) == 1 and events[0]["window"]["end"] == pytest.approx(end)
    assert events[0]["scores"]["embeddings"] > 0.0015 and "embeddings" in events[0]["drifted_checks"]  # MMD²
    state = json.loads((tmp_path / "endpoint" / "drift-state.json").read_text())
    assert state["drift-test-model"]["window_end"] == pytest.approx(end)

    second = dag.test(run_conf={**conf, "window_end": end + 60}).get_task_instance("drift")
    assert second.state == "success"
    assert second.xcom_pull(task_ids="drift")["signal"] == "cooldown"
    assert len(_events(uri)) == before + 1


def test_operator_without_traffic_reports_it_and_emits_nothing(airflow_db, dataset, tmp_path):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_drift", folder="tests/dags", module="llmops_test_drift", attr="drift_dag")
    conf = {
        "reference_uri": str(dataset),
        "request_log_uri": str(tmp_path / "endpoint" / "requests"),
        "artifact_root": str(tmp_path / "artifacts"),
        "policy": POLICY,
    }
    ti = dag.test(run_conf=conf).get_task_instance("drift")
    out = ti.xcom_pull(task_ids="drift")
    assert (ti.state, out["verdict"], out["drift"], out["signal"]) == ("success", "no_traffic", False, "none")


def test_a_drift_event_queues_a_run_of_the_dag_scheduled_on_the_asset(airflow_db, dataset, traffic, tmp_path):
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.asset import AssetDagRunQueue
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from dags_under_test import ROOT, load_dag
    from sqlalchemy import select, update

    # What the DAG processor does: the consumer DAG's schedule on the drift asset goes to the database.
    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(ROOT / "tests" / "dags" / "llmops_test_drift.py"))
    sync_bag_to_db(bag, "test-dags", None)
    with create_session() as session:  # a paused DAG gets no queued runs
        session.execute(update(DagModel).where(DagModel.dag_id == "llmops_test_drift_consumer").values(is_paused=False))
    dag = load_dag("llmops_test_drift", folder="tests/dags", module="llmops_test_drift", attr="drift_dag")
    end = time.time()
    log = _log(tmp_path / "endpoint" / "requests", traffic, n=100, foreign=0.5, seed=7, end=end)
    policy = {**POLICY, "checks": ["text_descriptors", "prediction"], "min_drifted_checks": 1}
    conf = {
        "reference_uri": str(dataset),
        "request_log_uri": str(log),
        "window_end": end,
        "artifact_root": str(tmp_path / "artifacts"),
        "policy": policy,
    }
    ti = dag.test(run_conf=conf).get_task_instance("drift")
    assert ti.xcom_pull(task_ids="drift")["signal"] == "emitted"
    with create_session() as session:
        queued = session.scalars(
            select(AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.target_dag_id == "llmops_test_drift_consumer")
        ).all()
    assert queued == ["llmops_test_drift_consumer"]


def test_the_drift_monitor_dag_reports_a_quiet_endpoint(airflow_db, dataset, tmp_path, monkeypatch):
    from dags_under_test import load_dag

    monkeypatch.setenv("AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT", str(tmp_path / "endpoints"))
    run = load_dag("llmops_drift_monitor").test(run_conf={"reference_uri": str(dataset)})
    drift = run.get_task_instance("drift")
    out = drift.xcom_pull(task_ids="drift")
    assert (drift.state, out["verdict"], out["signal"]) == ("success", "no_traffic", "none")
    assert out["request_log_uri"] == str(tmp_path / "endpoints" / "chatterbot-topics" / "requests")
    assert run.get_task_instance("endpoint_metrics").state == "skipped"  # no server running: none is started
