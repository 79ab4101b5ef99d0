"""Retrain on drift: each event on the drift Asset runs the reference pipeline again, with the window as conf."""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG

from airflow_llmops.operators.drift import drift_asset

MODEL = "chatterbot-topics-classifier"

DOC = """
### LLMOps — retrain on drift

Scheduled on the Asset `x-llmops://chatterbot-topics-classifier/drift` (events come from `llmops_drift_monitor`,
at most one per cooldown). It triggers a run of `llmops_local`, the whole pipeline (prepare, validate, train,
quantize, evaluate against the champion, register, canary rollout), rather than copying its tasks: one pipeline
to maintain, and the evaluation gate still decides whether the retrained model replaces the champion. The
drift event's window, scores and report go along in the run's conf under `drift`, for the record.
"""

with DAG(
    dag_id="llmops_retrain",
    description="Rerun the LLM pipeline when traffic drifts",
    schedule=[drift_asset(MODEL)],
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "llmops"},
    tags=["llmops", "local", "reference", "drift"],
    doc_md=DOC,
    render_template_as_native_obj=True,
) as dag:
    TriggerDagRunOperator(
        task_id="retrain",
        trigger_dag_id="llmops_local",
        # The newest event of the drift asset that scheduled this run.
        conf={
            "drift": "{{ (triggering_asset_events.values() | first | last).extra if triggering_asset_events else {} }}"
        },
        wait_for_completion=False,
    )
