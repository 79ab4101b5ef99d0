"""The ``sagemaker`` platform: training jobs, endpoints with stepwise or guarded rollouts, CloudWatch metrics.

boto3 through the amazon provider's :class:`AwsBaseHook` (an Airflow ``aws`` connection: credentials, region,
``endpoint_url``), botocore's standard retry mode for throttling. Imported only when the platform is used.
"""

from airflow_llmops.platforms.sagemaker.adapter import SageMaker
from airflow_llmops.platforms.sagemaker.requests import SageMakerConfigError, SageMakerSettings

__all__ = ["SageMaker", "SageMakerConfigError", "SageMakerSettings"]
