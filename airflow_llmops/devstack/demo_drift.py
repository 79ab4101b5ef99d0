"""The demo's closing act: shifted traffic to the live endpoint, the drift monitor, and the retrain it starts.

Everything goes through the real parts: HTTP requests to the model server, a drift-monitor run triggered through
Airflow's REST API, and the scheduler creating the retrain run from the drift Asset's event.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_llmops.devstack.airflow_api import AirflowAPIError, AirflowClient

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


@dataclass
class Step:
    """What the demo is doing now, and on which DAG run: what a failure report names."""

    what: str = "starting"
    dag_id: str | None = None
    run_id: str | None = None

    def at(self, what: str, dag_id: str | None = None, run_id: str | None = None) -> None:
        self.what, self.dag_id, self.run_id = what, dag_id, run_id


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def task_log_locations(
    base_url: str, dag_id: str, run_id: str, ti: dict[str, Any], log_root: Path | None
) -> list[tuple[str, str]]:
    """Where the log of one task try is: the file Airflow writes (default ``log_filename_template``, when it is on
    this machine), the REST endpoint that serves it and the task's page in the UI."""
    task_id = str(ti["task_id"])
    attempt = max(1, int(ti.get("try_number") or 1))
    map_index = -1 if ti.get("map_index") is None else int(ti["map_index"])
    places: list[tuple[str, str]] = []
    if log_root is not None:
        mapped = f"map_index={map_index}/" if map_index >= 0 else ""
        path = (
            log_root / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}" / f"{mapped}attempt={attempt}.log"
        )
        if path.is_file():
            places.append(("log file", str(path)))
    run = f"{base_url}/api/v2/dags/{_quote(dag_id)}/dagRuns/{_quote(run_id)}"
    rest = f"{run}/taskInstances/{_quote(task_id)}/logs/{attempt}"
    if map_index >= 0:
        rest += f"?map_index={map_index}"
    places.append(("log (REST API)", rest))
    places.append(("in the UI", f"{base_url}/dags/{_quote(dag_id)}/runs/{_quote(run_id)}/tasks/{_quote(task_id)}"))
    return places


def explain_run(
    client: AirflowClient,
    dag_id: str,
    run_id: str,
    state: str,
    *,
    log_root: Path | None = None,
    indent: str = "   ",
) -> list[str]:
    """Lines that say why a run did not succeed: its failed tasks (or, for a run that is not over, its unfinished
    ones) with where each one's log is."""
    lines = [f"!! {dag_id} run {run_id}: {state}"]
    try:
        tis = client.task_instances(dag_id, run_id)
    except (AirflowAPIError, OSError) as err:
        return [*lines, f"{indent}(its task instances could not be read: {err})"]
    culprit_states = (
        ("failed",) if state == "failed" else ("running", "deferred", "up_for_retry", "queued", "scheduled")
    )
    culprits = [ti for ti in tis if ti.get("state") in culprit_states]
    for ti in culprits:
        tries = f"try {ti.get('try_number')}" + (
            f" of {int(ti['max_tries']) + 1}" if ti.get("max_tries") is not None else ""
        )
        lines.append(f"{indent}{str(ti.get('state')) + ' task':<26}{ti['task_id']} ({tries})")
        for label, where in task_log_locations(client.base_url, dag_id, run_id, ti, log_root):
            lines.append(f"{indent}  {label:<24}{where}")
    blocked = [str(ti["task_id"]) for ti in tis if ti.get("state") == "upstream_failed"]
    if blocked:
        lines.append(f"{indent}{'not run (upstream failed)':<26}{', '.join(blocked)}")
    if not culprits:
        page = f"{client.base_url}/dags/{_quote(dag_id)}/runs/{_quote(run_id)}"
        lines.append(f"{indent}no task {' or '.join(culprit_states)}; the run: {page}")
    return lines


def wait_until_started(client: AirflowClient, dag_id: str, run_id: str, *, timeout: float) -> dict[str, Any] | None:
    """The run once the scheduler has started it (a start date, state running or over); None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get_run(dag_id, run_id)
        if run.get("start_date") and run.get("state") in ("running", "success", "failed"):
            return run
        if time.monotonic() >= deadline:
            return None
        time.sleep(2)


def trigger_events(
    client: AirflowClient, dag_id: str, run_id: str, *, tries: int = 5, delay: float = 2.0
) -> tuple[list[dict[str, Any]] | None, str]:
    """The asset events that created a run, read once the run has started: Airflow 3.3.2 answers HTTP 500 while
    any run created by those events is still queued (its response model requires ``created_dagruns.start_date``;
    apache/airflow#71360). A few tries, then ``(None, why)`` rather than an error: the events are for show."""
    why = ""
    for attempt in range(tries):
        try:
            return client.upstream_asset_events(dag_id, run_id), ""
        except AirflowAPIError as err:
            if err.status < 500:
                return None, str(err)
            why = str(err)
        if attempt + 1 < tries:
            time.sleep(delay)
    return None, why


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


def _xcom(client: AirflowClient, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
    return client.xcom(dag_id, run_id, task_id, key=key, missing_ok=True)


def closed_loop(
    client: AirflowClient,
    *,
    endpoint_url: str,
    dataset_uri: str,
    english: int,
    spanish: int,
    step: Step | None = None,
    log_root: Path | None = None,
) -> bool:
    """Shifted traffic → drift monitor → retrain. True when each step did what it should; a step that did not
    prints what failed and where its log is."""
    step = step or Step()
    for dag_id in (MONITOR, RETRAIN):
        step.at(f"waiting for the DAG processor to parse {dag_id}", dag_id)
        client.wait_for_dag(dag_id, timeout=120)
        client.unpause(dag_id)
    retrain_runs_before = ",".join(r["dag_run_id"] for r in client.runs(RETRAIN))
    share = spanish / max(1, english + spanish)
    print(
        f"\n>> drift: sending {english + spanish} requests to {endpoint_url}/v1/classify "
        f"({english} English from the test split, {spanish} Spanish: {share:.0%} of the traffic shifted)",
        flush=True,
    )
    step.at(f"sending traffic to the endpoint {endpoint_url}")
    started = time.time()
    codes = send(endpoint_url, traffic_texts(dataset_uri, english=english, spanish=spanish))
    print(f"   answers by HTTP status   {json.dumps(codes)}")
    window_minutes = max(1, int((time.time() - started) / 60) + 5)
    conf = {"window_minutes": window_minutes, "window_end": str(time.time() + 1)}
    step.at(f"triggering {MONITOR}", MONITOR)
    run_id = client.trigger(MONITOR, conf)
    print(f">> triggered {MONITOR} run {run_id} (last {window_minutes} min of the request log); following it")
    step.at(f"following the {MONITOR} run", MONITOR, run_id)
    state = follow(client, MONITOR, run_id, timeout=900)
    print(f">> run {run_id}: {state}")
    if state != "success":
        print("\n".join(explain_run(client, MONITOR, run_id, state, log_root=log_root)))
        return False
    drift = _xcom(client, MONITOR, run_id, "drift") or {}
    metrics = _xcom(client, MONITOR, run_id, "endpoint_metrics") or {}
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
    return follow_retrain(client, retrain_runs_before, step=step, log_root=log_root)


def follow_retrain(client: AirflowClient, runs_before: str, *, step: Step, log_root: Path | None) -> bool:
    """The retrain run the scheduler creates from the drift event, and the pipeline run it triggers."""
    print(f">> drift event on x-llmops://…/drift; waiting for the scheduler to start {RETRAIN} from it")
    step.at(f"waiting for the scheduler to create a {RETRAIN} run from the drift event", RETRAIN)
    run = wait_for_asset_run(client, RETRAIN, runs_before, timeout=180)
    if run is None:
        print(f"!! no asset-triggered run of {RETRAIN} appeared within 180 s; is the scheduler up? See its log.")
        return False
    retrain_id = str(run["dag_run_id"])
    # Created is not started: with max_active_runs=1 it may wait in the queue behind an earlier retrain.
    step.at(f"waiting for the scheduler to start the {RETRAIN} run", RETRAIN, retrain_id)
    if wait_until_started(client, RETRAIN, retrain_id, timeout=300) is None:
        print(f"!! {RETRAIN} run {retrain_id} was created but not started within 300 s (an earlier run still going?)")
        print("\n".join(explain_run(client, RETRAIN, retrain_id, "queued", log_root=log_root)))
        return False
    step.at(f"reading the asset events of the {RETRAIN} run", RETRAIN, retrain_id)
    events, why = trigger_events(client, RETRAIN, retrain_id)
    count = f"{len(events)} asset event(s)" if events is not None else f"asset events unreadable: {why[:160]}"
    print(f"   {RETRAIN + ' run':<26}{retrain_id} ({run.get('run_type')}, {count})")
    step.at(f"following the {RETRAIN} run", RETRAIN, retrain_id)
    state = follow(client, RETRAIN, retrain_id, timeout=300, indent="     ")
    triggered = _xcom(client, RETRAIN, retrain_id, "retrain", key="trigger_run_id")
    if state != "success" or not triggered:
        print(f"   {RETRAIN} run {retrain_id}: {state}" + ("" if triggered else " (it triggered no pipeline run)"))
        print("\n".join(explain_run(client, RETRAIN, retrain_id, state, log_root=log_root)))
        return False
    step.at(f"reading the {PIPELINE} run the retrain triggered", PIPELINE, str(triggered))
    pipeline_state = client.get_run(PIPELINE, str(triggered))["state"]
    print(f"   retraining                {PIPELINE} run {triggered} ({pipeline_state}; conf.drift holds the event)")
    print(f"                             {client.base_url}/dags/{PIPELINE}/runs/{triggered}")
    return True
