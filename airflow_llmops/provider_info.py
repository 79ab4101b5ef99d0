"""Provider metadata read by Airflow's providers manager (``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any

from airflow_llmops import __version__


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-llmops",
        "name": "LLMOps",
        "description": "The lifecycle of a large language model as Airflow operators: prepare and validate data, "
        "train, quantize, evaluate, roll out with canary and automatic rollback, detect drift and retrain, on "
        "local, SageMaker, Vertex AI and Azure ML.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "LLMOps",
                "external-doc-url": "https://github.com/airflow-llmops/airflow-llmops",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "LLMOps",
                "python-modules": [
                    "airflow_llmops.operators.plan",
                    "airflow_llmops.operators.data",
                    "airflow_llmops.operators.training",
                    "airflow_llmops.operators.tuning",
                    "airflow_llmops.operators.quantization",
                    "airflow_llmops.operators.export",
                    "airflow_llmops.operators.evaluation",
                    "airflow_llmops.operators.registry",
                    "airflow_llmops.operators.deploy",
                    "airflow_llmops.operators.rollout",
                    "airflow_llmops.operators.latest_only",
                    "airflow_llmops.operators.drift",
                ],
            },
        ],
        "sensors": [
            {
                "integration-name": "LLMOps",
                "python-modules": ["airflow_llmops.sensors.training", "airflow_llmops.sensors.rollout"],
            },
        ],
        "hooks": [],
        "triggers": [
            {
                "integration-name": "LLMOps",
                "python-modules": ["airflow_llmops.triggers.training", "airflow_llmops.triggers.rollout"],
            },
        ],
        "extra-links": [
            "airflow_llmops.links.artifacts.DatasetLink",
            "airflow_llmops.links.artifacts.ValidationReportLink",
            "airflow_llmops.links.artifacts.EvaluationReportLink",
            "airflow_llmops.links.artifacts.QuantizationReportLink",
            "airflow_llmops.links.artifacts.EndpointLink",
            "airflow_llmops.links.artifacts.DriftReportLink",
            "airflow_llmops.links.artifacts.CloudConsoleLink",
            "airflow_llmops.links.mlflow.MLflowRunLink",
            "airflow_llmops.links.mlflow.RegisteredModelLink",
        ],
        "connection-types": [],
        "config": {
            "llmops": {
                "description": "Defaults of the airflow-llmops provider.",
                "options": {
                    "artifact_root": {
                        "description": "Where models, datasets and reports are written (a local folder or an "
                        "s3://, gs://, abfs:// URI). Empty: $AIRFLOW_HOME/llmops/artifacts.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://my-bucket/llmops",
                        "default": "",
                    },
                    "ui_endpoints": {
                        "description": "Cloud endpoints the LLMOps page shows next to the local ones, as "
                        "platform:name pairs separated by commas.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "sagemaker:chatterbot-topics,vertex:chatterbot-topics",
                        "default": "",
                    },
                    "ui_audit_log": {
                        "description": "JSONL file where the LLMOps page records every action (who, when, what, "
                        "the outcome), allowed or refused. Empty: $AIRFLOW_HOME/llmops/ui-actions.jsonl.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/var/log/airflow/llmops-ui-actions.jsonl",
                        "default": "",
                    },
                    "ui_warm_up": {
                        "description": "Build the LLMOps page's app and warm its stores in a background thread when "
                        "the API server starts, so the first page load is fast.",
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    },
                    "mlflow_tracking_uri": {
                        "description": "MLflow tracking server for training runs and the model registry. Empty: "
                        "$MLFLOW_TRACKING_URI, else no tracking.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "http://mlflow:5000",
                        "default": "",
                    },
                    "local_jobs_root": {
                        "description": "Folder of the local platform's training jobs (checkpoints, logs). Empty: "
                        "$AIRFLOW_HOME/llmops/jobs. Workers that may retry a task must share it.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/shared/llmops/jobs",
                        "default": "",
                    },
                    "local_endpoints_root": {
                        "description": "Folder of the local platform's endpoints (server state, request logs, admin "
                        "token). Empty: $AIRFLOW_HOME/llmops/endpoints.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/shared/llmops/endpoints",
                        "default": "",
                    },
                    "local_endpoints_host": {
                        "description": "Address local endpoint servers bind. 0.0.0.0 where other Airflow components "
                        "(the triggerer) run on other hosts or containers; then set local_endpoints_advertise_host.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "0.0.0.0",
                        "default": "",
                    },
                    "local_endpoints_advertise_host": {
                        "description": "Host name in a local endpoint's URL when its server binds a wildcard address "
                        "(the name other components reach this machine by).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "airflow-worker",
                        "default": "",
                    },
                    "staging_root": {
                        "description": "Local copies of inputs read from a remote artifact_root (reused while the "
                        "remote content is unchanged). Empty: $AIRFLOW_HOME/llmops/staging.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/var/cache/llmops/staging",
                        "default": "",
                    },
                    "sagemaker_role_arn": {
                        "description": "IAM role SageMaker assumes for training jobs and endpoints (platform "
                        "'sagemaker'); an operator's platform_options role_arn wins.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "arn:aws:iam::123456789012:role/llmops-sagemaker",
                        "default": "",
                    },
                    "sagemaker_image_uri": {
                        "description": "The runtime image (docker/runtime.Dockerfile) in ECR, run by SageMaker "
                        "training jobs and endpoints.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "123456789012.dkr.ecr.us-east-1.amazonaws.com/airflow-llmops-runtime:0.2.0",
                        "default": "",
                    },
                    "sagemaker_s3_prefix": {
                        "description": "Where SageMaker jobs and endpoints keep their files: job outputs, "
                        "checkpoints, Data Capture, rollout records.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "s3://my-bucket/llmops/sagemaker",
                        "default": "",
                    },
                    "vertex_project": {
                        "description": "Google Cloud project of Vertex AI jobs and endpoints (platform 'vertex'); "
                        "empty: the connection's project.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "my-project",
                        "default": "",
                    },
                    "vertex_region": {
                        "description": "Vertex AI region.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "us-central1",
                        "default": "",
                    },
                    "vertex_image_uri": {
                        "description": "The runtime image (docker/runtime.Dockerfile) in Artifact Registry, run by "
                        "custom jobs and endpoints.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "us-docker.pkg.dev/my-project/llmops/airflow-llmops-runtime:0.2.0",
                        "default": "",
                    },
                    "vertex_staging_uri": {
                        "description": "Where Vertex AI jobs and endpoints keep their files: job outputs, "
                        "checkpoints, rollout records.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "gs://my-bucket/llmops/vertex",
                        "default": "",
                    },
                    "vertex_request_response_logging_uri": {
                        "description": "BigQuery table (bq://project.dataset.table) that new Vertex AI endpoints "
                        "log their requests and responses to; empty: off.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "bq://my-project.llmops.request_response",
                        "default": "",
                    },
                    "azureml_subscription_id": {
                        "description": "Azure subscription of the Azure ML workspace (platform 'azureml'); empty: the "
                        "connection's extra.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "00000000-0000-0000-0000-000000000000",
                        "default": "",
                    },
                    "azureml_resource_group": {
                        "description": "Resource group of the Azure ML workspace; empty: the connection's extra.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "llmops-rg",
                        "default": "",
                    },
                    "azureml_workspace_name": {
                        "description": "The Azure ML workspace; empty: the connection's extra.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "llmops-ws",
                        "default": "",
                    },
                    "azureml_compute": {
                        "description": "The compute cluster that runs Azure ML training jobs.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "cpu-cluster",
                        "default": "",
                    },
                    "azureml_image": {
                        "description": "The runtime image (docker/runtime.Dockerfile) in Azure Container Registry, "
                        "run by command jobs and online deployments.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "myregistry.azurecr.io/llmops/airflow-llmops-runtime:0.2.0",
                        "default": "",
                    },
                    "azureml_environment": {
                        "description": "A registered Azure ML environment (name:version) for training jobs instead "
                        "of the image; empty: the image.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "llmops-runtime:1",
                        "default": "",
                    },
                    "azureml_output_uri": {
                        "description": "Where Azure ML jobs and endpoints keep their files: job outputs, checkpoints, "
                        "rollout records (the workspace's storage account, abfs://).",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "abfs://llmops@myaccount.dfs.core.windows.net/llmops",
                        "default": "",
                    },
                    "azureml_instance_type": {
                        "description": "VM size of Azure ML online deployments.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "Standard_DS3_v2",
                        "default": "",
                    },
                    "artifact_conn_id": {
                        "description": "Airflow connection used to reach artifact_root when it is remote.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "aws_default",
                        "default": "",
                    },
                },
            }
        },
    }
