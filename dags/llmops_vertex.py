"""Vertex AI reference pipeline: the same lifecycle as ``llmops_local``, trained and served on Google Vertex AI."""

from __future__ import annotations

from airflow.sdk import Param

from airflow_llmops.pipelines import STRATEGIES, reference_pipeline

DOC = """
### LLMOps — Vertex AI reference pipeline

The stages of `llmops_local` with `platform="vertex"`:

* **Data**: the prepared dataset is written under `[llmops] artifact_root` (a `gs://` URI, reached through
  `[llmops] artifact_conn_id`) and read by the training job from there.
* **Training**: a Vertex AI custom job running the runtime image (`docker/runtime.Dockerfile`, in Artifact Registry,
  `[llmops] vertex_image_uri`): a chief pool and `replica_count - 1` workers, torchrun across them from Vertex's
  cluster spec, Spot scheduling with restart on preemption and resume from the checkpoints in
  `<vertex_staging_uri>/training/<job>`.
* **Serving**: a Model per version (the runtime image serving it on Vertex's routes) deployed on the endpoint
  `chatterbot-topics` next to the serving one at 0 %; the rollout steps the endpoint's `traffic_split` and judges
  each step on Cloud Monitoring (prediction count, errors, latency distribution). Vertex has no bake or rollback of
  its own: the rollout is the guardrail. No shadow strategy (Vertex endpoints cannot mirror traffic).
* **Connection**: `google_cloud_default` (an Airflow `google_cloud_platform` connection); the README lists the roles
  and APIs it needs.
"""

dag = reference_pipeline(
    dag_id="llmops_vertex",
    platform="vertex",
    description="LLM lifecycle on Google Vertex AI",
    tags=["llmops", "vertex", "reference"],
    doc_md=DOC,
    platform_conn_id="google_cloud_default",
    strategies=[s for s in STRATEGIES if s != "shadow"],
    train_options={"machine_type": "{{ params.machine_type }}"},
    deploy_options={"serving_machine_type": "{{ params.serving_machine_type }}"},
    training={
        "distributed": {
            "nnodes": "{{ params.replica_count }}",
            # The runtime meets the other replicas at the chief (workerpool0), from Vertex's cluster spec.
            "rdzv_endpoint": "workerpool0-0:29500",
            "use_spot": "{{ params.use_spot }}",
        },
    },
    params={
        "replica_count": Param(2, type="integer", minimum=1, maximum=16, description="training replicas"),
        "machine_type": Param("n1-standard-8", type="string", description="training machine type"),
        "serving_machine_type": Param("n1-standard-4", type="string", description="endpoint machine type"),
        "use_spot": Param(True, type="boolean", description="Spot VMs, restarted and resumed on preemption"),
        "bake_seconds": Param(
            300, type="number", minimum=0, description="how long each rollout step is watched (Monitoring: per minute)"
        ),
    },
)
