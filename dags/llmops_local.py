"""Local reference pipeline: the LLM lifecycle on one machine, no cloud account (copy this DAG to start)."""

from __future__ import annotations

from airflow_llmops.pipelines import reference_pipeline

DOC = """
### LLMOps — local reference pipeline

Runs the lifecycle of a language model on the `local` platform: `plan` validates the run's specs,
`prepare` normalises, deduplicates (exact and MinHash near-duplicates) and splits the data by a stable hash,
`validate` gates it with Great Expectations (schema, token lengths, labels, duplicates, invalid characters,
personal data) and quarantines failing rows; `train` fine-tunes the model with torchrun (2 CPU processes, or
one per GPU), tracked in MLflow and resumable from checkpoints; `quantize` tries int8 methods and keeps the
fastest within `max_quality_drop` points of accuracy; `evaluate` scores it against the registry's `champion` on
the test split (HTML report) and gates; `register` makes it a version of the MLflow registered model
`chatterbot-topics-classifier` (alias `challenger`); `deploy` loads that version on the local endpoint
`chatterbot-topics` next to the serving one, and `rollout` moves traffic by the plan (canary 10 → 50 → 100 % by
default), judging each step on live p95 latency and error rate, rolls back on a breach, and on success moves the
`champion` alias (recorded; an event on the Asset `x-llmops://models/chatterbot-topics-classifier/champion`).
With the Param `task=causal_lm` the same stages train a dialog generator, registered as
`chatterbot-dialog-generator` and served on the endpoint `chatterbot-dialog` (its own champion and Asset).

The prepared dataset is published as the Asset `x-llmops://datasets/chatterbot-topics` (the `causal_lm` task's
dialog rows as `x-llmops://datasets/chatterbot-dialogs`, through the alias `llmops-llmops_local-dataset`).

* **Schedule**: daily; each run works on its own data interval, so a backfill re-plans exactly those days.
* **Latest only**: `latest_only` lets `deploy` and `rollout` run for the latest interval and for manual or
  triggered runs; a backfilled (or older scheduled) run stops after `register`, and the skip says why.
* **Manual runs**: *Trigger DAG w/ config* shows typed Params (model, task, platform, rollout strategy...);
  invalid values are refused by the form, and inconsistent combinations fail the `plan` task with the
  field and value at fault.
* **Artifacts**: `[llmops] artifact_root` (default `$AIRFLOW_HOME/llmops/artifacts`)`/<dag_id>/<run_id>/`.
"""

dag = reference_pipeline(
    dag_id="llmops_local",
    platform="local",
    # The clouds are separate DAGs (llmops_sagemaker, ...) with their connection and settings.
    description="LLM lifecycle on the local platform",
    tags=["llmops", "local", "reference"],
    doc_md=DOC,
)
