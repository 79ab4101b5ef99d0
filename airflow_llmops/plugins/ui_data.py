"""What the LLMOps page shows, read from the stores the pipeline writes: the MLflow registry (versions, tags, alias
history), the endpoints' records (local: ``<endpoints_root>/<name>/``; clouds: the rollout record the adapter keeps),
the drift windows (``<artifact_root>/<dag_id>/<run_id>/drift/drift.json``) and the metadata database (the DAG runs a
drift event started, a task's XCom).

Read-only: nothing here starts a server, moves traffic or writes a record. Light at import (no MLflow, no FastAPI):
the plugin module that imports it is loaded by every Airflow component.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

# Version tags the registry stage writes (operators/registry.py) and the page shows by name.
VERSION_TAGS = {
    "quantization": "llmops.quantization",
    "data_manifest_hash": "llmops.data_manifest_hash",
    "dag_run": "llmops.dag_run",
    "source_model": "llmops.source_model",
    "dataset": "llmops.dataset",
}
HISTORY_PREFIX = "llmops.alias."  # the same as airflow_llmops.ml.registry.HISTORY_PREFIX (not imported: MLflow)
SERIES_WINDOW_S = 3600.0
SERIES_BUCKET_S = 60.0
MAX_LOG_LINES = 200_000


# ---- where the stores are ------------------------------------------------------------------------------------------
def tracking_uri() -> str:
    from airflow_llmops.operators.training import default_mlflow_tracking_uri

    return default_mlflow_tracking_uri() or ""


def endpoints_root() -> Path:
    from airflow_llmops.operators.deploy import default_endpoints_root

    return Path(default_endpoints_root().removeprefix("file://"))


def artifact_root() -> Path | None:
    from airflow_llmops.plugins.artifacts import _local_root

    return _local_root()


def owner_dag(rollout_id: str | None) -> str | None:
    """The DAG that owns an endpoint: the one whose run started its last rollout (``<dag_id>/<run_id>/<task>``)."""
    if not rollout_id or "/" not in rollout_id:
        return None
    return rollout_id.split("/", 1)[0] or None


# ---- models ----------------------------------------------------------------------------------------------------
def _mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    # Not airflow_llmops.ml.registry.client(): that sets the process-wide tracking URI, and this runs in the
    # API server.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_metrics(mlc: Any, run_ids: set[str]) -> dict[str, dict[str, float]]:
    """Latest metrics of each run, in one search per 100 runs (a get_run per version is too slow at 100s)."""
    if not run_ids:
        return {}
    experiments = [e.experiment_id for e in mlc.search_experiments(max_results=1000)]
    out: dict[str, dict[str, float]] = {}
    ids = sorted(run_ids)
    for start in range(0, len(ids), 100):
        chunk = ids[start : start + 100]
        quoted = ", ".join(f"'{i}'" for i in chunk if i.isalnum())
        if not quoted:
            continue
        for run in mlc.search_runs(experiments, filter_string=f"attributes.run_id IN ({quoted})", max_results=1000):
            out[run.info.run_id] = {k: float(v) for k, v in run.data.metrics.items()}
    return out


def alias_history_from_tags(tags: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per alias, every recorded move (``llmops.alias.<alias>.<ms>`` tags), oldest first."""
    history: dict[str, list[dict[str, Any]]] = {}
    for key, value in tags.items():
        if not key.startswith(HISTORY_PREFIX):
            continue
        try:
            record = dict(json.loads(value))
        except (ValueError, TypeError):
            continue
        alias = str(record.get("alias") or key.removeprefix(HISTORY_PREFIX).rsplit(".", 1)[0])
        history.setdefault(alias, []).append(record)
    for records in history.values():
        records.sort(key=lambda r: int(r.get("at_ms") or 0))
    return history


def list_models(uri: str | None = None, *, max_versions: int = 500) -> dict[str, Any]:
    """Each registered model: its versions (newest first) with metrics, quantization, data manifest hash and the
    DAG run that produced them; its aliases now and their history."""
    uri = uri if uri is not None else tracking_uri()
    if not uri:
        return {"tracking_uri": None, "models": [], "note": "no MLflow tracking URI ([llmops] mlflow_tracking_uri)"}
    mlc = _mlflow_client(uri)
    models: list[dict[str, Any]] = []
    registered = mlc.search_registered_models(max_results=1000)
    for model in registered:
        name = str(model.name)
        if "'" in name:
            continue
        versions = list(mlc.search_model_versions(f"name = '{name}'", max_results=max_versions))
        metrics = _run_metrics(mlc, {str(v.run_id) for v in versions if v.run_id})
        aliases = {str(a): str(v) for a, v in (model.aliases or {}).items()}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(version, []).append(alias)
        rows = []
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
            tags = dict(v.tags or {})
            dag_run = tags.get(VERSION_TAGS["dag_run"], "")
            rows.append(
                {
                    "version": str(v.version),
                    "created_ms": int(v.creation_timestamp or 0),
                    "run_id": v.run_id,
                    "status": str(v.status),
                    "aliases": sorted(by_version.get(str(v.version), [])),
                    "metrics": metrics.get(str(v.run_id), {}),
                    **{key: tags.get(tag) for key, tag in VERSION_TAGS.items()},
                    "dag_id": dag_run.split("/", 1)[0] if "/" in dag_run else None,
                    "run": dag_run.split("/", 1)[1] if "/" in dag_run else None,
                }
            )
        models.append(
            {
                "name": name,
                "aliases": aliases,
                "alias_history": alias_history_from_tags(dict(model.tags or {})),
                "versions": rows,
            }
        )
    models.sort(key=lambda m: m["name"])
    return {"tracking_uri": _display(uri), "models": models}


def _display(uri: str) -> str:
    from airflow_llmops.uris import display_uri

    return display_uri(uri)


# ---- endpoints ---------------------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return round(ordered[index], 3)


def _log_rows(folder: Path, since: float, now: float) -> list[tuple[str, float, float | None, bool]]:
    """``(variant, ts, latency_ms, failed)`` of the requests answered in ``[since, now]`` (shadows left out)."""
    from airflow_llmops.serving.request_log import log_files

    rows: list[tuple[str, float, float | None, bool]] = []
    seen: set[tuple[str, str]] = set()
    lines = 0
    for path, _start in log_files(folder, since=since, until=now + 1):
        try:
            handle = path.open(encoding="utf-8", errors="replace")
        except OSError:
            continue
        with handle:
            for line in handle:
                lines += 1
                if lines > MAX_LOG_LINES:
                    return rows
                try:
                    record = json.loads(line)
                    ts = float(record["ts"])
                except (ValueError, KeyError, TypeError):
                    continue
                if not since <= ts <= now or record.get("shadow"):
                    continue
                variant = str(record.get("variant") or "?")
                # A request of several inputs is one line per input: count it once.
                key = (variant, str(record.get("request_id") or lines))
                if key in seen:
                    continue
                seen.add(key)
                latency = record.get("latency_ms")
                ok_latency = float(latency) if isinstance(latency, int | float) else None
                rows.append((variant, ts, ok_latency, int(record.get("status") or 0) >= 500))
    return rows


def request_series(
    folder: Path, *, now: float | None = None, window_s: float = SERIES_WINDOW_S, bucket_s: float | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Per variant, per time bucket of the last ``window_s``: requests, errors, error rate, p50/p95 latency — from
    the endpoint's request log (only ``ts``, ``variant``, ``status``, ``latency_ms`` are read; inputs never leave).
    Buckets are ``bucket_s`` long; by default a minute, shorter (down to 5 s) when the traffic spans less than
    half an hour, so a fresh endpoint still draws a line."""
    now = time.time() if now is None else now
    since = now - window_s
    if not folder.is_dir():
        return {}
    rows = _log_rows(folder, since, now)
    if not rows:
        return {}
    if bucket_s is None:
        span = max(r[1] for r in rows) - min(r[1] for r in rows)
        bucket_s = SERIES_BUCKET_S if span >= 1800 else max(5.0, math.ceil(span / 30 / 5) * 5)
    buckets: dict[tuple[str, int], dict[str, Any]] = {}
    for variant, ts, latency, error in rows:
        bucket = buckets.setdefault((variant, int((ts - since) // bucket_s)), {"latencies": [], "n": 0, "errors": 0})
        bucket["n"] += 1
        bucket["errors"] += int(error)
        if latency is not None:
            bucket["latencies"].append(latency)
    series: dict[str, list[dict[str, Any]]] = {}
    for (variant, slot), bucket in sorted(buckets.items()):
        series.setdefault(variant, []).append(
            {
                "t": round(since + slot * bucket_s, 3),
                "bucket_s": bucket_s,
                "requests": bucket["n"],
                "errors": bucket["errors"],
                "error_rate": round(bucket["errors"] / bucket["n"], 4),
                "p50_ms": _percentile(bucket["latencies"], 0.5),
                "p95_ms": _percentile(bucket["latencies"], 0.95),
            }
        )
    return series


def rollout_view(record: dict[str, Any] | None, *, now: float | None = None) -> dict[str, Any] | None:
    """The rollout record with what the page needs computed: the steps' percentages, the step now, the bake time
    left, the verdicts so far, and the owning DAG."""
    if not record:
        return None
    now = time.time() if now is None else now
    plan = dict(record.get("plan") or {})
    try:
        from airflow_llmops.specs import RolloutPlan

        steps = [float(s) for s in RolloutPlan.parse(plan).steps()]
    except Exception:
        steps = []
    bake = float(plan.get("bake_seconds") or 0)
    started = record.get("step_started_at")
    pause = record.get("pause") if isinstance(record.get("pause"), dict) else None
    in_progress = record.get("state") == "in_progress"
    paused = pause if in_progress and pause and pause.get("state") == "paused" else None
    if started and pause and pause.get("state") == "resumed":  # a resume restarts the held step's bake
        started = max(float(started), float(pause.get("at") or 0))
    left = max(0.0, bake - (now - float(started))) if started and in_progress and not paused else None
    step = int(record.get("step") or 0)
    return {
        "rollout_id": record.get("rollout_id"),
        "owner_dag_id": owner_dag(record.get("rollout_id")),
        "variant": record.get("variant"),
        "model_uri": record.get("model_uri"),
        "state": record.get("state"),
        "strategy": plan.get("strategy"),
        "steps": steps,
        "step": step,
        "step_percent": steps[step] if 0 <= step < len(steps) else None,
        "bake_seconds": bake,
        "bake_left_s": None if left is None else round(left, 1),
        "previous": record.get("previous") or {},
        "slo": plan.get("slo") or {},
        "verdicts": [
            {k: v.get(k) for k in ("status", "step", "percent", "elapsed_s", "message", "ok")}
            for v in record.get("steps") or []
            if isinstance(v, dict)
        ],
        "message": record.get("message") or "",
        "paused": {k: paused.get(k) for k in ("by", "at", "reason")} if paused else None,
        "started_at": record.get("started_at"),
        "updated_at": record.get("updated_at"),
    }


def _live_variants(folder: Path, url: str) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """The server's variants and its last hour's numbers, when it answers (never started from here)."""
    from airflow_llmops.processes import http_ok

    if not http_ok(f"{url}/healthz", timeout=0.5):
        return None, None
    from airflow_llmops.serving.client import ServingClient, ServingClientError

    try:
        token = (folder / "admin-token").read_text().strip()
        with ServingClient(url, token, timeout=2.0) as client:
            return client.variants(), client.metrics_snapshot(window_s=SERIES_WINDOW_S)
    except (OSError, ServingClientError):
        return None, None


def local_endpoint(folder: Path, *, now: float | None = None, with_series: bool = True) -> dict[str, Any]:
    from airflow_llmops.jsonfiles import read_json_object

    server = read_json_object(folder / "server.json") or {}
    state = read_json_object(folder / "state.json") or {}
    url = str(server.get("url") or "")
    live, snapshot = _live_variants(folder, url) if url else (None, None)
    variants = live if live is not None else list(state.get("variants") or [])
    rows = []
    numbers = (snapshot or {}).get("variants") or {}
    for v in variants:
        name = str(v.get("name"))
        row = numbers.get(name) or {}
        rows.append(
            {
                "name": name,
                "source": _display(str(v.get("source") or "")),
                "weight": float(v.get("weight") or 0.0),
                "shadow": bool(v.get("shadow")),
                "requests": row.get("requests"),
                "error_rate": row.get("error_rate"),
                "p50_ms": row.get("p50_latency_ms"),
                "p95_ms": row.get("p95_latency_ms"),
            }
        )
    rollout = rollout_view(read_json_object(folder / "rollout.json"), now=now)
    return {
        "platform": "local",
        "name": folder.name,
        "url": url or None,
        "up": live is not None,
        "variants": rows,
        "weights": {r["name"]: r["weight"] for r in rows if not r["shadow"]},
        "rollout": rollout,
        "owner_dag_id": rollout["owner_dag_id"] if rollout else None,
        "series": request_series(folder / "requests", now=now) if with_series else {},
    }


def list_local_endpoints(root: Path | None = None, *, with_series: bool = True) -> list[dict[str, Any]]:
    root = endpoints_root() if root is None else root
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and any((folder / n).is_file() for n in ("state.json", "server.json", "rollout.json")):
            found.append(local_endpoint(folder, with_series=with_series))
    return found


def cloud_endpoints(spec: str) -> list[dict[str, Any]]:
    """``[llmops] ui_endpoints`` = ``sagemaker:name,vertex:name``: each endpoint's rollout record and split, read
    through its platform's adapter (its defaults from ``[llmops] <platform>_*``)."""
    from airflow_llmops.operators.base import cloud_platform_kwargs
    from airflow_llmops.platforms import EndpointHandle, deployment_platform

    out = []
    for item in (s.strip() for s in spec.split(",")):
        if ":" not in item:
            continue
        platform_name, name = item.split(":", 1)
        entry: dict[str, Any] = {"platform": platform_name, "name": name, "variants": [], "series": {}, "up": False}
        try:
            platform = deployment_platform(platform_name, **cloud_platform_kwargs(platform_name, None))
            record = platform.get_rollout_record(name)
            weights = platform.get_traffic(EndpointHandle(platform_name, name))
            entry.update(
                weights=weights,
                variants=[{"name": k, "weight": v, "shadow": False} for k, v in weights.items()],
                up=True,
                rollout=rollout_view(record.to_dict() if record else None),
            )
            entry["owner_dag_id"] = entry["rollout"]["owner_dag_id"] if entry["rollout"] else None
        except Exception as err:  # one unreachable cloud must not hide the others
            entry["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        out.append(entry)
    return out


# ---- drift ---------------------------------------------------------------------------------------------------
def drift_files(root: Path) -> Iterable[tuple[str, str, Path]]:
    """``(dag_id, run folder, drift.json)`` of every drift window under the artifact root."""
    for path in root.glob("*/*/drift/drift.json"):
        run_folder = path.parent.parent
        yield run_folder.parent.name, run_folder.name, path


# Parsed drift windows by drift.json path, kept while the file and its folder are unchanged (mtime and size): a
# window is written once by its DAG run, so the page reads each of the 1,000s once, not on every refresh.
_DRIFT_CACHE: dict[Path, tuple[tuple[int, int, int], tuple[str, dict[str, Any]] | None]] = {}
_DRIFT_CACHE_MAX = 20_000


def _drift_window(dag_id: str, run: str, path: Path) -> tuple[str, dict[str, Any]] | None:
    """``(model, window)`` from one drift.json (None: unreadable), cached by the file's and folder's stat."""
    try:
        stat, folder = path.stat(), path.parent.stat()
    except OSError:
        return None
    key = (stat.st_mtime_ns, stat.st_size, folder.st_mtime_ns)
    cached = _DRIFT_CACHE.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = None
    entry = (
        None
        if not isinstance(summary, dict)
        else (str(summary.get("model") or "?"), _window(dag_id, run, path, summary))
    )
    if len(_DRIFT_CACHE) >= _DRIFT_CACHE_MAX:
        _DRIFT_CACHE.clear()
    _DRIFT_CACHE[path] = (key, entry)
    return entry


def _window(dag_id: str, run: str, path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    window = summary.get("window") or {}
    report = path.parent / "drift-report.html"
    checks = {
        name: {k: c.get(k) for k in ("drift", "score", "threshold", "method", "note")}
        for name, c in (summary.get("checks") or {}).items()
        if isinstance(c, dict)
    }
    return {
        "dag_id": dag_id,
        "run": run,
        "start": window.get("start"),
        "end": window.get("end"),
        "end_iso": window.get("end_iso"),
        "verdict": summary.get("verdict"),
        "drift": bool(summary.get("drift")),
        "drifted_checks": summary.get("drifted_checks") or [],
        "rows": summary.get("rows"),
        "checks": checks,
        "report": f"{dag_id}/{run}/drift/{report.name if report.is_file() else 'drift.json'}",
    }


def list_drift(root: Path | None = None, *, allowed: Any = None) -> dict[str, Any]:
    """Per monitored model, its windows oldest first: scores per check against thresholds, the verdict, the report,
    and (filled by the caller from the database) the retrain runs its drift events started."""
    root = artifact_root() if root is None else root
    if root is None or not root.is_dir():
        return {"models": []}
    by_model: dict[str, list[dict[str, Any]]] = {}
    for dag_id, run, path in drift_files(root):
        if allowed is not None and not allowed(dag_id):
            continue
        entry = _drift_window(dag_id, run, path)
        if entry is not None:
            by_model.setdefault(entry[0], []).append(dict(entry[1]))
    models = []
    for name, windows in sorted(by_model.items()):
        windows.sort(key=lambda w: float(w.get("end") or 0))
        models.append({"name": name, "windows": windows, "retrains": []})
    return {"models": models}


def retrain_runs(model_names: list[str], *, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Per model, the drift events (``x-llmops://<model>/drift``) and the DAG runs each started, newest first."""
    if not model_names:
        return {}
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    uris = {f"x-llmops://{name}/drift": name for name in model_names}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in model_names}
    with create_session() as session:
        query = (
            select(AssetEvent, AssetModel.uri)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri.in_(list(uris)))
            .options(selectinload(AssetEvent.created_dagruns))
            .order_by(AssetEvent.timestamp.desc())
            .limit(limit * len(uris))
        )
        for event, uri in session.execute(query):
            extra = event.extra or {}
            out[uris[uri]].append(
                {
                    "at": event.timestamp.isoformat() if event.timestamp else None,
                    "source": f"{event.source_dag_id}/{event.source_run_id}" if event.source_dag_id else None,
                    "scores": extra.get("scores"),
                    "runs": [
                        {"dag_id": r.dag_id, "run_id": r.run_id, "state": str(r.state)} for r in event.created_dagruns
                    ],
                }
            )
    return out


# ---- a task's report ---------------------------------------------------------------------------------------------
def task_report(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
    """What a provider task left: its return value (XCom) and the reports its extra links point at."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    values: dict[str, Any] = {}
    with create_session() as session:
        query = select(XComModel.key, XComModel.value).where(
            XComModel.dag_id == dag_id,
            XComModel.run_id == run_id,
            XComModel.task_id == task_id,
            XComModel.map_index == map_index,
        )
        for key, value in session.execute(query):
            try:
                values[str(key)] = json.loads(value) if isinstance(value, str | bytes) else value
            except ValueError:
                values[str(key)] = value
    links = {k.removeprefix("_link_"): v for k, v in values.items() if k.startswith("_link_") and isinstance(v, str)}
    result = values.get("return_value")
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "map_index": map_index,
        "result": result,
        "links": links,
        "reports": _task_reports(dag_id, run_id, result, links),
    }


def _task_reports(dag_id: str, run_id: str, result: Any, links: dict[str, str]) -> list[str]:
    """Artifact paths (``<dag_id>/...``) of the reports this task points at, served by the artifacts route."""
    root = artifact_root()
    if root is None:
        return []
    candidates = list(links.values())
    if isinstance(result, dict):
        candidates += [str(v) for k, v in result.items() if k.endswith(("report_uri", "report")) and v]
    out = []
    base = (root / dag_id).resolve()
    for uri in candidates:
        path = Path(uri.removeprefix("file://"))
        if "/llmops/artifacts/" in uri:
            out.append(unquote(uri.split("/llmops/artifacts/", 1)[1]))
            continue
        try:
            resolved = path.resolve()
        except OSError:
            continue
        if resolved.is_relative_to(base) and resolved.is_file():
            out.append(f"{dag_id}/{resolved.relative_to(base)}")
    return sorted(set(out))
