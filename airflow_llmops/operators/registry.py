"""RegisterModelOperator and PromoteModelOperator: MLflow registry versions and alias moves, with history."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.mlflow import RegisteredModelLink, mlflow_model_version_url
from airflow_llmops.operators.base import LLMOpsBaseOperator, as_storage_path, is_remote
from airflow_llmops.operators.training import default_mlflow_tracking_uri
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context


def model_alias_asset(name: str, alias: str = "champion") -> Asset:
    """The Asset updated each time ``alias`` of registered model ``name`` moves (``x-`` scheme: no provider
    URI handlers are loaded when a DAG file declares it)."""
    return Asset(f"x-llmops://models/{name}/{alias}", group="llmops-models")


class _RegistryOperator(LLMOpsBaseOperator):
    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "registered_model_name",
        "mlflow_tracking_uri",
    )

    def __init__(self, *, registered_model_name: str, mlflow_tracking_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registered_model_name = registered_model_name
        self.mlflow_tracking_uri = mlflow_tracking_uri

    def tracking(self) -> str:
        uri = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        if not uri:
            raise AirflowFailException(
                f"{self.task_id}: the model registry needs an MLflow tracking URI ([llmops] mlflow_tracking_uri, "
                "$MLFLOW_TRACKING_URI or mlflow_tracking_uri=)"
            )
        return uri


class RegisterModelOperator(_RegistryOperator):
    """Register a model folder as a new version of ``registered_model_name`` (pyfunc flavour: ``mlflow.pyfunc.
    load_model("models:/<name>@challenger").predict(texts)``) and point ``alias`` at it.

    Tags on the version: the quantization method, the data manifest's content hash, the source model, the DAG
    run, plus ``tags``. A retry of the same task instance finds the version it registered instead of adding one.

    :param model_uri: the model folder to register (templated): the training output or a quantized artifact.
    :param dataset_uri: the prepared dataset it was trained on; its manifest hash becomes a tag (templated).
    :param quantization_method: the method that produced ``model_uri``, or ``none`` (templated).
    :param training_run_id: MLflow run of the training job; the model is logged into it (templated).
    """

    template_fields: Sequence[str] = (
        *_RegistryOperator.template_fields,
        "model_uri",
        "dataset_uri",
        "quantization_method",
        "training_run_id",
        "tags",
    )
    operator_extra_links = (RegisteredModelLink(),)
    ui_color = "#e3f2fd"

    def __init__(
        self,
        *,
        model_uri: str,
        dataset_uri: str | None = None,
        quantization_method: str | None = None,
        training_run_id: str | None = None,
        alias: str | None = "challenger",
        tags: Mapping[str, str] | None = None,
        experiment: str = "llmops",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.dataset_uri = dataset_uri
        self.quantization_method = quantization_method
        self.training_run_id = training_run_id
        self.alias = alias
        self.tags = dict(tags or {})
        self.experiment = experiment

    def _version_tags(self, context: Context, folder: Path) -> dict[str, str]:
        tags = {
            "llmops.run_key": self.job_name(context),
            "llmops.dag_run": f"{context['dag'].dag_id}/{context['run_id']}",
            "llmops.quantization": str(self.quantization_method or "none"),
        }
        quant = folder / "quantization.json"
        if quant.is_file():
            meta = json.loads(quant.read_text())
            tags["llmops.quantization"] = str(meta.get("method", tags["llmops.quantization"]))
            tags["llmops.source_model"] = str(meta.get("source_model", ""))
        if self.dataset_uri:
            # One small file: read where it is, through the artifact connection when the store is remote.
            manifest = as_storage_path(str(self.dataset_uri), self.artifact_connection()) / "manifest.json"
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError) as err:
                raise AirflowFailException(
                    f"{self.task_id}: cannot read the data manifest {display_uri(manifest)}: {err}"
                ) from None
            tags["llmops.data_manifest_hash"] = str(data.get("content_hash", ""))
            tags["llmops.dataset"] = str(self.dataset_uri)
        return {**tags, **{str(k): str(v) for k, v in self.tags.items()}}

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_llmops.ml import registry

        tracking = self.tracking()
        name = self.registered_model_name
        # MLflow logs a local folder: a model on a remote artifact store is staged through the connection first.
        uri = str(self.model_uri)
        folder = self.stage_in(uri, "model") if is_remote(uri) else Path(uri.removeprefix("file://"))
        tags = self._version_tags(context, folder)
        existing = self._registered_by_this_task(tracking, name, tags["llmops.run_key"])
        try:
            if existing is not None:
                self.log.info("Version %s of %s was registered by an earlier try; reusing it", existing, name)
                version = registry.resolve_version(f"models:/{name}/{existing}", tracking_uri=tracking)
                if self.alias:
                    registry.move_alias(name, self.alias, version.version, tracking_uri=tracking, reason="registered")
            else:
                version = registry.register_model(
                    folder,
                    name,
                    tracking_uri=tracking,
                    experiment=self.experiment,
                    tags=tags,
                    alias=self.alias,
                    run_id=self.training_run_id or None,
                    reason=f"registered by {tags['llmops.dag_run']}",
                )
        except registry.RegistryError as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        url = mlflow_model_version_url(tracking, name, version.version)
        if url:
            RegisteredModelLink().persist(context, url)
        self.log.info("Registered %s version %s (%s) with tags %s", name, version.version, self.alias, tags)
        return {**version.to_dict(), "alias": self.alias, "tags": tags}

    @staticmethod
    def _registered_by_this_task(tracking: str, name: str, run_key: str) -> str | None:
        from mlflow.exceptions import MlflowException

        from airflow_llmops.ml.registry import client

        try:
            versions = client(tracking).search_model_versions(f"name = '{name}'")
        except MlflowException:
            return None
        mine = [v for v in versions if v.tags.get("llmops.run_key") == run_key]
        return str(max(int(v.version) for v in mine)) if mine else None


class PromoteModelOperator(_RegistryOperator):
    """Move ``to_alias`` (default ``champion``) to a version: ``version``, else the one ``from_alias`` points at.

    Each move is recorded as a timestamped registered-model tag (MLflow keeps no alias history), so
    ``airflow_llmops.ml.registry.version_at(name, "champion", T)`` answers which version served at time T, and is
    emitted as an event on :func:`model_alias_asset` (``extra``: version, previous version, time) for DAGs
    scheduled on new champions. Promoting the version the alias already points at changes nothing.
    """

    template_fields: Sequence[str] = (*_RegistryOperator.template_fields, "version", "reason")
    operator_extra_links = (RegisteredModelLink(),)
    ui_color = "#e8f5e9"

    def __init__(
        self,
        *,
        version: str | int | None = None,
        from_alias: str = "challenger",
        to_alias: str = "champion",
        reason: str = "",
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("registered_model_name", "")
        if "outlets" not in kwargs and name and "{{" not in name:
            kwargs["outlets"] = [model_alias_asset(name, to_alias)]
        super().__init__(**kwargs)
        self.version = version
        self.from_alias = from_alias
        self.to_alias = to_alias
        self.reason = reason

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_llmops.ml import registry

        tracking = self.tracking()
        name = self.registered_model_name
        try:
            source = (
                f"models:/{name}/{self.version}"
                if self.version not in (None, "")
                else f"models:/{name}@{self.from_alias}"
            )
            target = registry.resolve_version(source, tracking_uri=tracking)
            current = registry.current_version(name, self.to_alias, tracking_uri=tracking)
            if current == target.version:
                self.log.info("%s@%s already points at version %s; nothing to move", name, self.to_alias, current)
                history = registry.alias_history(name, self.to_alias, tracking_uri=tracking)
                record = history[-1] if history else {"alias": self.to_alias, "version": current, "previous": current}
            else:
                reason = self.reason or f"promoted by {context['dag'].dag_id}/{context['run_id']}"
                record = registry.move_alias(name, self.to_alias, target.version, tracking_uri=tracking, reason=reason)
        except registry.RegistryError as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = {"model": name, **record}
        url = mlflow_model_version_url(tracking, name, target.version)
        if url:
            RegisteredModelLink().persist(context, url)
        self.log.info("%s@%s -> version %s (was %s)", name, self.to_alias, record["version"], record.get("previous"))
        return {"name": name, "alias": self.to_alias, **record, "uri": f"models:/{name}@{self.to_alias}"}
