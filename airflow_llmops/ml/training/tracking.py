"""MLflow tracking for a training job, with a run identity that survives retries.

Used only when ``MLFLOW_TRACKING_URI`` is set, and only on rank 0. The run to write to is, in order:
``LLMOPS_MLFLOW_RUN_ID`` (resume exactly that run), else the run of the experiment tagged
``llmops.run_key=$LLMOPS_RUN_KEY`` (created with that tag the first time), else a new run. A retry of the same
Airflow task sets the same key, so it continues the same run instead of scattering attempts over several.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from airflow_llmops.ml.training.errors import TrainingInputError

RUN_KEY_TAG = "llmops.run_key"
_BATCH = 100  # MLflow's log_batch limit on params per call


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 8}}`` → ``{"lora.r": "8"}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            flat.update(flatten(item, f"{name}."))
        else:
            flat[name] = str(item)
    return flat


class MlflowTracker:
    def __init__(self, run_id: str, experiment_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = MlflowClient()

    @classmethod
    def start(cls, experiment: str, *, tags: Mapping[str, str] | None = None) -> MlflowTracker | None:
        """Start (or resume) the job's run; ``None`` when no tracking server is configured."""
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(uri)
        system = _system_metrics_supported()
        if system:
            # Short jobs would otherwise end before the first sample (default: every 10 s, logged in tens).
            mlflow.set_system_metrics_sampling_interval(2)  # type: ignore[no-untyped-call]
            mlflow.set_system_metrics_samples_before_logging(1)  # type: ignore[no-untyped-call]
        run_id = os.environ.get("LLMOPS_MLFLOW_RUN_ID") or None
        key = os.environ.get("LLMOPS_RUN_KEY") or None
        if run_id is None:
            experiment_id = mlflow.set_experiment(experiment).experiment_id
            run_id = _run_with_key(experiment_id, key) if key else None
            if run_id is None:
                run_tags = {**(tags or {}), **({RUN_KEY_TAG: key} if key else {})}
                active = mlflow.start_run(experiment_id=experiment_id, tags=run_tags, log_system_metrics=system)
                return cls(active.info.run_id, active.info.experiment_id)
        try:
            active = mlflow.start_run(run_id=run_id, log_system_metrics=system)
        except MlflowException as err:
            raise TrainingInputError(f"cannot resume MLflow run {run_id!r} at {uri}: {err.message}") from None
        if tags:
            mlflow.set_tags(dict(tags))
        return cls(active.info.run_id, active.info.experiment_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params the run does not have yet. A resumed run keeps its first values: MLflow refuses to change
        a param, and a retry of the same spec logs the same values anyway."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            print(f"[mlflow] run {self.run_id} keeps its earlier values of params {changed}", flush=True)
        fresh = [Param(k, v[:6000]) for k, v in sorted(params.items()) if k not in existing]
        for i in range(0, len(fresh), _BATCH):
            self.client.log_batch(self.run_id, params=fresh[i : i + _BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def step_logger(self) -> Callable[[int, Mapping[str, float | None]], None]:
        """Per-step metrics, best effort: a tracking server that goes away mid-run costs the step history, not
        the training. Final metrics and the model are logged with :meth:`log_metrics` and fail loudly instead
        (a retry resumes from the last checkpoint and logs them again)."""
        broken: list[Exception] = []

        def log(step: int, metrics: Mapping[str, float | None]) -> None:
            if broken:
                return
            try:
                self.log_metrics(step, metrics)
            except Exception as err:  # any client or server error; see the docstring
                broken.append(err)
                print(f"[mlflow] step metrics are no longer logged: {err}", flush=True)

        return log

    def log_model(self, model_dir: str) -> None:
        """The final model folder (safetensors, config, tokenizer) as the run's ``model`` artifacts."""
        self.client.log_artifacts(self.run_id, model_dir, artifact_path="model")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def end(self, *, succeeded: bool) -> None:
        import mlflow

        mlflow.end_run(status="FINISHED" if succeeded else "FAILED")

    def ui_info(self) -> dict[str, str]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": _tracking_uri()}


def _run_with_key(experiment_id: str, key: str) -> str | None:
    """The newest run of the experiment carrying the key (deleted runs are not searched)."""
    from mlflow.tracking import MlflowClient

    quoted = key.replace("\\", "\\\\").replace("'", "\\'")
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{quoted}'",
        max_results=5,
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.data.tags.get(RUN_KEY_TAG) == key:
            return str(run.info.run_id)
    return None


def _system_metrics_supported() -> bool:
    """MLflow samples CPU, memory and disk through psutil; without it, skip silently."""
    return importlib.util.find_spec("psutil") is not None


def _tracking_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())
