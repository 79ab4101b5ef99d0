"""Links from a task to what it wrote in the artifact store (reports, datasets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlparse

from airflow.sdk import BaseOperatorLink, conf

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

ARTIFACTS_ROUTE = "/llmops/artifacts"


def browser_url(uri: str) -> str:
    """Where a person can open ``uri``: our artifact route for local files, the cloud console otherwise."""
    parsed = urlparse(uri if "://" in uri else f"file://{uri}")
    key = parsed.path.lstrip("/")
    if parsed.scheme == "file":
        from airflow_llmops.operators.base import default_artifact_root

        root = default_artifact_root().removeprefix("file://").rstrip("/")
        if not parsed.path.startswith(root + "/"):
            return uri
        base = conf.get("api", "base_url", fallback="").rstrip("/")
        return f"{base}{ARTIFACTS_ROUTE}/{quote(parsed.path[len(root) + 1 :])}"
    if parsed.scheme == "s3":
        return f"https://s3.console.aws.amazon.com/s3/object/{parsed.netloc}?prefix={quote(key)}"
    if parsed.scheme in ("gs", "gcs"):
        return f"https://console.cloud.google.com/storage/browser/_details/{parsed.netloc}/{quote(key)}"
    if parsed.scheme in ("abfs", "abfss", "az"):
        return f"https://portal.azure.com/#blade/Microsoft_Azure_Storage/ContainerMenuBlade/overview/{quote(uri)}"
    return uri


class _XComLink(BaseOperatorLink):
    """A link whose URL the task stored in XCom while it ran (Airflow 3 reads it from ``xcom_key``)."""

    label: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return self.label

    def persist(self, context: Context, uri: str) -> str:
        """Store the link (a store URI is turned into a URL a browser can open) and return it."""
        url = uri if uri.startswith(("http://", "https://")) else browser_url(uri)
        context["ti"].xcom_push(key=self.xcom_key, value=url)
        return url

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        value: Any = XCom.get_value(ti_key=ti_key, key=self.xcom_key)
        return str(value) if value else ""


class ValidationReportLink(_XComLink):
    label = "Validation report"


class DatasetLink(_XComLink):
    label = "Prepared dataset"


class EvaluationReportLink(_XComLink):
    label = "Evaluation report"


class QuantizationReportLink(_XComLink):
    label = "Quantization report"


class EndpointLink(_XComLink):
    label = "Endpoint"


class DriftReportLink(_XComLink):
    label = "Drift report"


class CloudConsoleLink(_XComLink):
    """The cloud's page of the job a task started (SageMaker training or tuning job, ...)."""

    label = "Cloud console"
