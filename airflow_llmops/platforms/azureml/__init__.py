"""The ``azureml`` platform: command jobs, managed online endpoints with traffic and mirrored-traffic rollouts,
Azure Monitor metrics.

``azure-ai-ml``'s ``MLClient`` and ``azure-mgmt-monitor``'s ``MonitorManagementClient`` (credentials from an Airflow
connection, or ``DefaultAzureCredential``), imported only when the platform is used.
"""

from airflow_llmops.platforms.azureml.adapter import AzureML
from airflow_llmops.platforms.azureml.requests import AzureMLConfigError, AzureMLSettings

__all__ = ["AzureML", "AzureMLConfigError", "AzureMLSettings"]
