"""The MLflow model registry: register a model folder as a pyfunc version, move aliases with a recorded history,
and fetch a version's files back.

MLflow keeps only the current target of an alias. Every move made here also writes a registered-model tag
``llmops.alias.<alias>.<unix ms>`` = ``{"version", "previous", "at", "reason"}``, so "which version did
``champion`` point at, at time T" is answered by :func:`version_at` long after the alias has moved on.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow_llmops.ml.pyfunc import MODEL_ARTIFACT, TextModel

HISTORY_PREFIX = "llmops.alias."
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class RegistryError(ValueError):
    """The registry has no such model, version or alias; the message says which and what exists."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    uri: str  # models:/<name>/<version>
    run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "uri": self.uri, "run_id": self.run_id}


def client(tracking_uri: str | None = None) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def register_model(
    model_dir: str | Path,
    name: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = "llmops",
    tags: dict[str, str] | None = None,
    alias: str | None = "challenger",
    run_id: str | None = None,
    reason: str = "registered",
) -> RegisteredVersion:
    """Log ``model_dir`` (a saved Hugging Face folder, or a quantized artifact folder) as a pyfunc model and
    register it as a new version of ``name`` with ``tags``; point ``alias`` at it.

    ``run_id``: the run that produced the model (its training run); the model is logged there, else in a new
    run of ``experiment``.
    """
    import mlflow

    folder = Path(str(model_dir).removeprefix("file://"))
    if not folder.is_dir() or (not (folder / "config.json").is_file() and not (folder / "quantization.json").is_file()):
        raise RegistryError(f"{model_dir!s} is not a saved model folder (no config.json or quantization.json)")
    mlc = client(tracking_uri)
    if run_id is None:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run_id = mlc.create_run(experiment_id, tags={"mlflow.runName": f"register {name}"}).info.run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="registered_model",
            python_model=TextModel(),
            artifacts={MODEL_ARTIFACT: str(folder)},
            pip_requirements=["airflow-llmops[local]"],  # skips MLflow's slow requirement inference
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for key, value in (tags or {}).items():
        mlc.set_model_version_tag(name, version, key, str(value))
    if alias:
        move_alias(name, alias, version, tracking_uri=tracking_uri, reason=reason)
    return RegisteredVersion(name, version, f"models:/{name}/{version}", run_id)


def move_alias(
    name: str, alias: str, version: str | int, *, tracking_uri: str | None = None, reason: str = ""
) -> dict[str, Any]:
    """Point ``alias`` at ``version`` and record the move; returns the history record."""
    mlc = client(tracking_uri)
    _check_version(mlc, name, str(version))
    previous = current_version(name, alias, tracking_uri=tracking_uri)
    now = time.time()
    mlc.set_registered_model_alias(name, alias, str(version))
    record = {
        "alias": alias,
        "version": str(version),
        "previous": previous,
        "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        "at_ms": int(now * 1000),
        "reason": reason[:500],
    }
    mlc.set_registered_model_tag(name, f"{HISTORY_PREFIX}{alias}.{record['at_ms']}", json.dumps(record))
    mlc.set_model_version_tag(name, str(version), f"llmops.{alias}_since", record["at"])
    return record


def current_version(name: str, alias: str, *, tracking_uri: str | None = None) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def alias_history(name: str, alias: str, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every recorded move of ``alias``, oldest first."""
    tags = client(tracking_uri).get_registered_model(name).tags
    prefix = f"{HISTORY_PREFIX}{alias}."
    records = [json.loads(v) for k, v in tags.items() if k.startswith(prefix)]
    return sorted(records, key=lambda r: int(r["at_ms"]))


def version_at(name: str, alias: str, when: datetime | float, *, tracking_uri: str | None = None) -> str | None:
    """The version ``alias`` pointed at, at ``when`` (a datetime or a unix timestamp); None before the first move."""
    ts_ms = int((when.timestamp() if isinstance(when, datetime) else float(when)) * 1000)
    found = None
    for record in alias_history(name, alias, tracking_uri=tracking_uri):
        if int(record["at_ms"]) <= ts_ms:
            found = str(record["version"])
    return found


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` → (name, "3", None); ``models:/name@champion`` → (name, None, "champion")."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise RegistryError(f"{uri!r} is not a registry URI (models:/<name>/<version> or models:/<name>@<alias>)")
    return match["name"], match["version"], match["alias"]


def resolve_version(uri: str, *, tracking_uri: str | None = None) -> RegisteredVersion:
    name, version, alias = parse_models_uri(uri)
    mlc = client(tracking_uri)
    if alias:
        found = current_version(name, alias, tracking_uri=tracking_uri)
        if found is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}{_known(mlc, name)}")
        version = found
    assert version is not None
    mv = _check_version(mlc, name, version)
    return RegisteredVersion(name, version, f"models:/{name}/{version}", mv.run_id)


def download_model(uri: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The model folder (Hugging Face files or a quantized artifact) of a registry URI, a ``runs:/`` URI, or a
    local folder (returned as is)."""
    local = uri.removeprefix("file://")
    if ("://" not in uri and ":/" not in uri) or uri.startswith("file://"):
        path = Path(local)
        if not path.is_dir():
            raise RegistryError(f"model folder {local!r} does not exist")
        return path
    import mlflow.artifacts

    if uri.startswith("models:/"):
        uri = resolve_version(uri, tracking_uri=tracking_uri).uri
    client(tracking_uri)
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    for candidate in (root / "artifacts" / MODEL_ARTIFACT, root):
        if (candidate / "config.json").is_file() or (candidate / "quantization.json").is_file():
            return candidate
    inner = [p for p in root.rglob("config.json")]
    if inner:
        return inner[0].parent
    raise RegistryError(f"{uri} holds no model folder (no config.json under {root})")


def _check_version(mlc: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {version}{_known(mlc, name)}") from None


def _known(mlc: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        versions = sorted(int(v.version) for v in mlc.search_model_versions(f"name = '{name}'"))
        model = mlc.get_registered_model(name)
    except MlflowException:
        return " (no registered model of that name)"
    return f" (versions {versions}, aliases {sorted(model.aliases)})"
