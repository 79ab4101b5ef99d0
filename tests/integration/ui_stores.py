"""Stores for the LLMOps page's tests and benchmark, filled by the real code paths: versions and alias moves in an
MLflow registry through ``airflow_llmops.ml.registry``, a local endpoint (a real ``airflow-llmops serve`` process
with ``echo://`` variants) in the middle of a canary rollout through the deployment protocol, and drift windows
written in the shape :class:`~airflow_llmops.operators.drift.DriftCheckOperator` writes them (its own
``_summary`` of real :class:`~airflow_llmops.ml.drift.checks.DriftResult` objects)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

DAG_ID = "llmops_ui_demo"
MODEL = "ui-topics"
ENDPOINT = "ui-topics"
MANIFEST_HASH = "3f2a9c0d5e7b41c8a6d2e9f01b3c5d7e"


def model_folder(root: Path) -> Path:
    folder = root / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "id2label": {"0": "echo"}}))
    return folder


def register_versions(tracking_uri: str, root: Path, model: str = MODEL) -> list[str]:
    """Two versions of ``model``: v1 (champion, then challenger moves to v2) with evaluation metrics on their runs.
    (Tests sharing the session's MLflow server pass names of their own.)"""
    from airflow_llmops.ml import registry

    folder = model_folder(root)
    versions = []
    for i, (quant, accuracy) in enumerate((("none", 0.81), ("int8_dynamic", 0.84)), start=1):
        tags = {
            "llmops.dag_run": f"{DAG_ID}/manual__run{i}",
            "llmops.quantization": quant,
            "llmops.data_manifest_hash": MANIFEST_HASH,
            "llmops.run_key": f"ui-{i}",
        }
        version = registry.register_model(
            folder, model, tracking_uri=tracking_uri, tags=tags, reason=f"registered by {DAG_ID}/manual__run{i}"
        )
        client = registry.client(tracking_uri)
        assert version.run_id
        client.log_metric(version.run_id, "eval_accuracy", accuracy)
        client.log_metric(version.run_id, "eval_f1", accuracy - 0.03)
        versions.append(version.version)
        if i == 1:
            registry.move_alias(model, "champion", version.version, tracking_uri=tracking_uri, reason="first champion")
    return versions


def start_rollout(endpoints_root: Path, *, requests: int = 40) -> dict[str, Any]:
    """Endpoint ENDPOINT serving v1, with v2 loaded and a canary rollout of it at its first step (10 %), recorded
    on the endpoint as RolloutOperator records it; then some traffic so the request log has numbers."""
    from airflow_llmops.platforms import RolloutRecord, get_platform
    from airflow_llmops.platforms.rollout import step_weights
    from airflow_llmops.specs import SLO, RolloutPlan

    platform = get_platform("local", endpoints_root=str(endpoints_root))
    plan = RolloutPlan(
        strategy="canary", traffic_steps=[10, 50, 100], bake_seconds=600, slo=SLO(p95_latency_ms=250, min_requests=5)
    )
    first = platform.deploy(ENDPOINT, model_uri="echo://", variant="v1", plan=plan)
    handle = platform.deploy(ENDPOINT, model_uri="echo://", variant="v2", plan=plan)
    previous = {str(k): float(v) for k, v in (handle.extra.get("previous") or {}).items()}
    assert previous == {"v1": 100.0}, previous
    now = time.time()
    record = RolloutRecord(
        rollout_id=f"{DAG_ID}/manual__run2/rollout",
        variant="v2",
        model_uri="echo://",
        previous=previous,
        plan=plan.to_dict(),
        started_at=now,
    )
    platform.put_rollout_record(ENDPOINT, record)
    platform.set_traffic(handle, step_weights(plan, plan.steps()[0], "v2", previous))
    record.step_started_at = time.time()
    platform.put_rollout_record(ENDPOINT, record)
    with httpx.Client(base_url=str(first.url), timeout=30, trust_env=False) as client:
        for i in range(requests):
            assert client.post("/v1/classify", json={"inputs": f"request {i}"}).status_code == 200
    return {"platform": platform, "handle": handle, "url": first.url}


def write_drift_windows(
    artifact_root: Path, *, windows: int = 4, model: str = MODEL, dag_id: str = DAG_ID
) -> list[Path]:
    """``windows`` hourly windows of MODEL, the last one drifted, each with its report, where DriftCheckOperator
    puts them (``<artifact_root>/<dag_id>/<run>/drift/``)."""
    from airflow_llmops.ml.drift.checks import CheckResult, DriftResult
    from airflow_llmops.operators.drift import DriftCheckOperator
    from airflow_llmops.specs import DriftPolicy

    operator = DriftCheckOperator(task_id="drift", model_name=model, reference_uri="/data/reference")
    policy = DriftPolicy()
    end0 = time.time() - windows * 3600
    written = []
    for i in range(windows):
        drifted = i == windows - 1
        end = end0 + (i + 1) * 3600
        result = DriftResult(
            drift=drifted,
            verdict="drift" if drifted else "no_drift",
            rows=200 + i,
            sampled_rows=200 + i,
            reference_rows=1000,
            window_start=end - 3600,
            window_end=end,
            checks={
                "embedding": CheckResult(drift=drifted, score=0.02 + 0.03 * i, method="mmd", threshold=0.1),
                "descriptors": CheckResult(drift=drifted, score=0.05 + 0.1 * i, method="psi", threshold=0.3),
            },
            note="drifted: embedding, descriptors" if drifted else "",
        )
        summary = operator._summary(result, policy, MANIFEST_HASH, "")
        folder = artifact_root / dag_id / f"scheduled__{i:04d}" / "drift"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "drift.json").write_text(json.dumps(summary, indent=1, default=str))
        (folder / "drift-report.html").write_text(
            f"<html><body><h1>Drift report {i}</h1><p>verdict {result.verdict}</p></body></html>"
        )
        written.append(folder)
    return written
