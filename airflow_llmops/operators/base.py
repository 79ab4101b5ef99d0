"""Shared base of our operators: platform choice, artifact store location and deterministic job names."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ObjectStoragePath, conf

from airflow_llmops.platforms.base import PLATFORM_NAMES, job_name_for

if TYPE_CHECKING:
    from airflow.sdk import Context

_RUN_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def airflow_home() -> str:
    """Absolute ``[core] airflow_home`` (``$AIRFLOW_HOME``, default ``~/airflow``)."""
    home = conf.get("core", "airflow_home", fallback="") or os.environ.get("AIRFLOW_HOME", "~/airflow")
    return os.path.abspath(os.path.expanduser(home))


def default_artifact_root() -> str:
    """``[llmops] artifact_root``, else ``$LLMOPS_ARTIFACT_ROOT``, else ``$AIRFLOW_HOME/llmops/artifacts``."""
    configured = conf.get("llmops", "artifact_root", fallback="") or os.environ.get("LLMOPS_ARTIFACT_ROOT", "")
    if configured:
        return configured
    return f"file://{os.path.join(airflow_home(), 'llmops', 'artifacts')}"


def as_storage_path(uri: str, conn_id: str | None = None) -> ObjectStoragePath:
    """An Airflow ObjectStoragePath for a URI or a plain absolute path."""
    if "://" not in uri:
        uri = f"file://{os.path.abspath(uri)}"
    if conn_id and not uri.startswith("file://"):
        return ObjectStoragePath(uri, conn_id=conn_id)
    return ObjectStoragePath(uri)


def upload_tree(local: Path, target: ObjectStoragePath) -> None:
    """Copy a local folder to an object-store path, file by file."""
    for file in sorted(local.rglob("*")):
        if file.is_file():
            dest = target / file.relative_to(local).as_posix()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(file.read_bytes())


def local_folder(path: ObjectStoragePath) -> Path | None:
    """The local filesystem path of a ``file://`` storage path; None for a remote one."""
    if path.protocol not in ("file", "local"):
        return None
    return Path(path.path)


class LLMOpsBaseOperator(BaseOperator):
    """Base of every airflow-llmops operator.

    :param platform: ``local``, ``sagemaker``, ``vertex`` or ``azureml`` (templated).
    :param platform_conn_id: Airflow connection holding the platform's credentials; ``None`` for its default.
    :param artifact_root: where this task writes models, datasets and reports (templated); defaults to
        ``[llmops] artifact_root``.
    :param artifact_conn_id: connection for a remote ``artifact_root`` (``[llmops] artifact_conn_id``).
    """

    template_fields: Sequence[str] = ("platform", "artifact_root")

    def __init__(
        self,
        *,
        platform: str = "local",
        platform_conn_id: str | None = None,
        artifact_root: str | None = None,
        artifact_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.platform = platform
        self.platform_conn_id = platform_conn_id
        self.artifact_root = artifact_root
        self.artifact_conn_id = artifact_conn_id

    def check_platform(self) -> str:
        if self.platform not in PLATFORM_NAMES:
            raise ValueError(
                f"{self.task_id}: unknown platform {self.platform!r}; use one of {', '.join(PLATFORM_NAMES)}"
            )
        return self.platform

    def artifact_base(self) -> ObjectStoragePath:
        root = self.artifact_root or default_artifact_root()
        conn_id = self.artifact_conn_id or conf.get("llmops", "artifact_conn_id", fallback="") or None
        return as_storage_path(root, conn_id)

    def run_folder(self, context: Context) -> ObjectStoragePath:
        """``<artifact_root>/<dag_id>/<run_id>``: everything one DAG run produces, stable across retries."""
        dag_id = context["dag"].dag_id
        run_id = _RUN_SAFE.sub("_", context["run_id"])
        return self.artifact_base() / dag_id / run_id

    def job_name(self, context: Context) -> str:
        return job_name_for(context["dag"].dag_id, context["run_id"], self.task_id)
