"""The demo's closing act: shifted traffic to the live endpoint, the drift monitor, and the retrain it starts.

Everything goes through the real parts: HTTP requests to the model server, a drift-monitor run triggered through
Airflow's REST API, and the scheduler creating the retrain run from the drift Asset's event.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from pathlib import Path
from typing import Any

from airflow_llmops.devstack.airflow_api import AirflowClient

MONITOR = "llmops_drift_monitor"
RETRAIN = "llmops_retrain"
PIPELINE = "llmops_local"


def traffic_texts(dataset_uri: str, *, english: int, spanish: int, seed: int = 0) -> list[tuple[str, str]]:
    """(language, text) pairs: English from the prepared test split (the traffic the model was built for) and
    Spanish dialog lines from the chatterbot corpus (the shift), shuffled together."""
    import pandas as pd

    from airflow_llmops.ml.data.chatterbot import load_chatterbot

    rng = random.Random(seed)
    test = Path(dataset_uri.removeprefix("file://")) / "test.parquet"
    pool = pd.read_parquet(test)["text"].astype(str).tolist()
    foreign = load_chatterbot("chatterbot://spanish")["text"].astype(str).tolist()
    rows = [("en", rng.choice(pool)) for _ in range(english)] + [("es", rng.choice(foreign)) for _ in range(spanish)]
    rng.shuffle(rows)
    return rows


def send(url: str, texts: list[tuple[str, str]], *, clients: int = 4) -> dict[str, int]:
    """POST each text to ``/v1/classify``; counts of answers by HTTP status."""
    import httpx

    with httpx.Client(timeout=60) as http:

        def one(text: str) -> int:
            return http.post(f"{url}/v1/classify", json={"inputs": text}).status_code

        with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
            codes = list(pool.map(one, [t for _, t in texts]))
    counts: dict[str, int] = {}
    for code in codes:
        counts[str(code)] = counts.get(str(code), 0) + 1
    return counts


def follow(client: AirflowClient, dag_id: str, run_id: str, *, timeout: float, indent: str = "   ") -> str:
    """Print each task's state changes until the run ends (or ``timeout``); the run's last state."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    state = "queued"
    while time.monotonic() < deadline:
        for ti in client.task_instances(dag_id, run_id):
            task_state = str(ti.get("state"))
            if ti.get("state") is not None and seen.get(ti["task_id"]) != task_state:
                seen[ti["task_id"]] = task_state
                print(f"{indent}{ti['task_id']:<24} {task_state}", flush=True)
        state = str(client.get_run(dag_id, run_id)["state"])
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    return state


def wait_for_asset_run(client: AirflowClient, dag_id: str, after: str, *, timeout: float) -> dict[str, Any] | None:
    """The first asset-triggered run of ``dag_id`` other than those in ``after`` (run ids, comma separated)."""
    known = set(after.split(",")) if after else set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in client.runs(dag_id):
            if run["dag_run_id"] not in known and run.get("run_type") == "asset_triggered":
                return run
        time.sleep(2)
    return None


def closed_loop(client: AirflowClient, *, endpoint_url: str, dataset_uri: str, english: int, spanish: int) -> bool:
    """Shifted traffic → drift monitor → retrain. True when each step did what it should."""
    for dag_id in (MONITOR, RETRAIN):
        client.wait_for_dag(dag_id, timeout=120)
        client.unpause(dag_id)
    retrain_runs_before = ",".join(r["dag_run_id"] for r in client.runs(RETRAIN))
    share = spanish / max(1, english + spanish)
    print(
        f"\n>> drift: sending {english + spanish} requests to {endpoint_url}/v1/classify "
        f"({english} English from the test split, {spanish} Spanish: {share:.0%} of the traffic shifted)",
        flush=True,
    )
    started = time.time()
    codes = send(endpoint_url, traffic_texts(dataset_uri, english=english, spanish=spanish))
    print(f"   answers by HTTP status   {json.dumps(codes)}")
    window_minutes = max(1, int((time.time() - started) / 60) + 5)
    conf = {"window_minutes": window_minutes, "window_end": str(time.time() + 1)}
    run_id = client.trigger(MONITOR, conf)
    print(f">> triggered {MONITOR} run {run_id} (last {window_minutes} min of the request log); following it")
    state = follow(client, MONITOR, run_id, timeout=900)
    print(f">> run {run_id}: {state}")
    if state != "success":
        return False
    drift = client.xcom(MONITOR, run_id, "drift") or {}
    metrics = client.xcom(MONITOR, run_id, "endpoint_metrics") or {}
    print(f"   verdict                   {drift.get('verdict')} ({drift.get('note', '')})")
    print(f"   drifted checks            {', '.join(drift.get('drifted_checks') or []) or 'none'}")
    scores = {k: round(float(v), 4) for k, v in (drift.get("scores") or {}).items()}
    print(f"   scores                    {json.dumps(scores)}")
    print(f"   drift report (Evidently)  {drift.get('report_uri')}")
    if isinstance(metrics, dict) and metrics.get("metrics"):
        m = metrics["metrics"]
        shown = {
            k: round(float(v), 4)
            for k, v in m.items()
            if k.endswith(("p50_latency_ms", "p95_latency_ms", "error_rate")) or k.startswith("endpoint.")
        }
        print(f"   endpoint health (MLflow)  {json.dumps(shown)}")
    signal = drift.get("signal")
    if signal == "cooldown":
        print("   retrain                   drift again, but a retrain signal went out within the cooldown: none now")
        return True
    if signal != "emitted":
        print("   retrain                   no drift signal: nothing to retrain")
        return bool(drift.get("verdict"))
    print(f">> drift event on x-llmops://…/drift; waiting for the scheduler to start {RETRAIN} from it")
    run = wait_for_asset_run(client, RETRAIN, retrain_runs_before, timeout=180)
    if run is None:
        print(f"   no asset-triggered run of {RETRAIN} appeared")
        return False
    events = client.upstream_asset_events(RETRAIN, run["dag_run_id"])
    print(f"   {RETRAIN + ' run':<26}{run['dag_run_id']} ({run.get('run_type')}, {len(events)} asset event(s))")
    state = follow(client, RETRAIN, run["dag_run_id"], timeout=300, indent="     ")
    triggered = client.xcom(RETRAIN, run["dag_run_id"], "retrain", key="trigger_run_id")
    if state != "success" or not triggered:
        print(f"   {RETRAIN} run {run['dag_run_id']}: {state}")
        return False
    pipeline_state = client.get_run(PIPELINE, str(triggered))["state"]
    print(f"   retraining                {PIPELINE} run {triggered} ({pipeline_state}; conf.drift holds the event)")
    print(f"                             {client.base_url}/dags/{PIPELINE}/runs/{triggered}")
    return True
