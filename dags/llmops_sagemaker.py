"""SageMaker reference pipeline: the same lifecycle as ``llmops_local``, trained and served on Amazon SageMaker."""

from __future__ import annotations

from airflow.sdk import Param

from airflow_llmops.pipelines import reference_pipeline

DOC = """
### LLMOps — SageMaker reference pipeline

The stages of `llmops_local` (plan, prepare, validate with Great Expectations, train, quantize, evaluate against
the champion, register in MLflow, deploy, rollout) with `platform="sagemaker"`:

* **Data**: the prepared dataset is written under `[llmops] artifact_root` (an `s3://` URI, reached through
  `[llmops] artifact_conn_id`) and given to the training job as its `dataset` channel.
* **Training**: a SageMaker training job running the runtime image (`docker/runtime.Dockerfile`, pushed to ECR,
  `[llmops] sagemaker_image_uri`) on `instance_count` instances: torchrun across them, managed spot with
  checkpoints in S3 when `use_spot` is on (an interrupted job resumes from its last checkpoint). The job's
  failure reason and last log lines end up in the task's error.
* **Serving**: one SageMaker Model and endpoint config per version on the endpoint `chatterbot-topics`, with Data
  Capture to `<sagemaker_s3_prefix>/datacapture` (what the drift monitor reads). The rollout steps production
  variant weights and judges each step on CloudWatch (Invocations, 5XX errors, ModelLatency), or with
  `native_guardrails` lets SageMaker's blue/green update walk it with alarms made from the SLO (canary steps
  `[x, 100]`) and reports when SageMaker rolled back.
* **Connection**: `aws_default` (an Airflow `aws` connection); `[llmops] sagemaker_role_arn` is the role SageMaker
  assumes. The README lists the IAM permissions each step uses.
"""

dag = reference_pipeline(
    dag_id="llmops_sagemaker",
    platform="sagemaker",
    description="LLM lifecycle on Amazon SageMaker",
    tags=["llmops", "sagemaker", "reference"],
    doc_md=DOC,
    platform_conn_id="aws_default",
    train_options={"instance_type": "{{ params.training_instance_type }}"},
    deploy_options={"serving_instance_type": "{{ params.serving_instance_type }}"},
    training={
        "distributed": {
            "nnodes": "{{ params.instance_count }}",
            # SageMaker names its hosts algo-1..N; the runtime meets the others at the first one.
            "rdzv_endpoint": "algo-1:29500",
            "use_spot": "{{ params.use_spot }}",
        },
    },
    rollout={"native_guardrails": "{{ params.native_guardrails }}"},
    params={
        "instance_count": Param(2, type="integer", minimum=1, maximum=16, description="training instances"),
        "training_instance_type": Param("ml.m5.xlarge", type="string", description="SageMaker training instance"),
        "serving_instance_type": Param("ml.m5.large", type="string", description="SageMaker endpoint instance"),
        "use_spot": Param(True, type="boolean", description="managed spot training, resumed from S3 checkpoints"),
        "native_guardrails": Param(
            False,
            type="boolean",
            description="SageMaker's blue/green update with alarm rollback walks the rollout (canary steps [x, 100])",
        ),
        # CloudWatch keeps endpoint metrics per minute: a step needs at least a minute of numbers.
        "bake_seconds": Param(
            300, type="number", minimum=0, description="how long each rollout step is watched (CloudWatch: per minute)"
        ),
    },
)
