"""Azure ML reference pipeline: the same lifecycle as ``llmops_local``, trained and served on Azure Machine Learning."""

from __future__ import annotations

from airflow.sdk import Param, conf

from airflow_llmops.pipelines import reference_pipeline

DOC = """
### LLMOps — Azure ML reference pipeline

The stages of `llmops_local` with `platform="azureml"`:

* **Data**: the prepared dataset is written under `[llmops] artifact_root` (an `abfs://` URI of the workspace's
  storage account, reached through `[llmops] artifact_conn_id`) and read by the training job from there.
* **Training**: an Azure ML command job on the compute cluster `compute` (default `[llmops] azureml_compute`, else
  `cpu-cluster`) running the runtime image (`docker/runtime.Dockerfile`, in Azure Container Registry,
  `[llmops] azureml_image`): `instance_count` nodes under a PyTorch distribution, torchrun across them from Azure
  ML's `MASTER_ADDR` / `NODE_RANK`, the low-priority (Spot) tier with resume from the checkpoints in
  `<azureml_output_uri>/training/<job>` after preemption. The task waits in the triggerer.
* **Serving**: a managed online endpoint `chatterbot-topics` with one deployment per version (the runtime image as
  a custom container, data collection on), the new one added at 0 %; the rollout steps the endpoint's `traffic`
  (whole percents) and judges each step on Azure Monitor (RequestsPerMinute by status class, RequestLatency
  P50/P95); the shadow strategy mirrors up to 50 % of the traffic (`mirror_traffic`) to the new deployment. Azure
  ML has no bake or rollback of its own: the rollout is the guardrail.
* **Connection**: `azure_ml_default` (an Airflow `azure` connection: service principal, managed identity or
  `DefaultAzureCredential`; the workspace triple in its extra or in `[llmops] azureml_*`); the README lists the
  roles it needs.
"""

# The Params' defaults are this deployment's [llmops] azureml_* settings (a run may pick others).
COMPUTE = conf.get("llmops", "azureml_compute", fallback="") or "cpu-cluster"
INSTANCE_TYPE = conf.get("llmops", "azureml_instance_type", fallback="") or "Standard_DS3_v2"

dag = reference_pipeline(
    dag_id="llmops_azureml",
    platform="azureml",
    description="LLM lifecycle on Azure Machine Learning",
    tags=["llmops", "azureml", "reference"],
    doc_md=DOC,
    platform_conn_id="azure_ml_default",
    train_options={"compute": "{{ params.compute }}"},
    deploy_options={"instance_type": "{{ params.instance_type }}"},
    training={
        "distributed": {
            "nnodes": "{{ params.instance_count }}",
            # Nominal: on Azure ML the runtime meets the other nodes at $MASTER_ADDR:$MASTER_PORT (the node of rank
            # 0), which the PyTorch distribution sets.
            "rdzv_endpoint": "node-0:29500",
            "use_spot": "{{ params.low_priority }}",
        },
    },
    params={
        "instance_count": Param(2, type="integer", minimum=1, maximum=16, description="training nodes"),
        "compute": Param(COMPUTE, type="string", minLength=2, description="compute cluster that runs training"),
        "instance_type": Param(INSTANCE_TYPE, type="string", description="VM size of the endpoint's deployments"),
        "low_priority": Param(
            True, type="boolean", description="low-priority (Spot) nodes, resumed from checkpoints on preemption"
        ),
        # Azure Monitor keeps endpoint metrics per minute and publishes them a minute or more late.
        "bake_seconds": Param(
            300,
            type="number",
            minimum=0,
            description="how long each rollout step is watched (Azure Monitor: per minute)",
        ),
    },
)
