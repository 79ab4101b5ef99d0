"""TuneHyperparametersOperator: an Optuna study of training runs, its best params handed on through XCom."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_llmops.jsonfiles import read_json_object
from airflow_llmops.links.artifacts import CloudConsoleLink
from airflow_llmops.links.mlflow import MLflowRunLink, mlflow_run_url
from airflow_llmops.operators.base import LLMOpsBaseOperator, cloud_platform_kwargs
from airflow_llmops.operators.training import default_local_jobs_root, default_mlflow_tracking_uri
from airflow_llmops.processes import ProcessRecord, child_env
from airflow_llmops.specs import SpecValidationError

if TYPE_CHECKING:
    from airflow_llmops.specs.tuning import TuningSpec

if TYPE_CHECKING:
    from airflow.sdk import Context

_XCOM_TRIALS = 50  # the full trial list is in result.json and MLflow; XCom keeps the first ones
_CLOUD = ("sagemaker", "vertex", "azureml")
# The tuning job's name (SageMaker, Azure ML: its trials' folders are under it) or display name (Vertex).
_NAME_MAX = {"sagemaker": 32, "vertex": 128, "azureml": 64}
_TITLE = {"sagemaker": "SageMaker", "vertex": "Vertex AI", "azureml": "Azure ML"}


class TuneHyperparametersOperator(LLMOpsBaseOperator):
    """Search hyper-parameters with Optuna: each trial is a training run, pruned early when unpromising.

    The study runs ``python -m airflow_llmops.ml.tune`` in ``<jobs_root>/<job name>/`` and keeps its state in a
    SQLite file there, so a retry of the task continues the study instead of starting it again (finished trials
    count). With MLflow configured the study is a run with one child run per trial. Returns ``best_params``,
    ``best_value``, ``best_training_spec`` (ready for :class:`TrainModelOperator`) and the best trial's model.

    On ``local`` the trials run one after the other in one process each. On ``sagemaker`` the study is a
    SageMaker hyperparameter tuning job: one training job per trial (the runtime applies each trial's values to the
    spec), the metric read from each trial's log, ``sampler="tpe"`` as SageMaker's Bayesian strategy and the median
    pruner as its automatic early stopping; a retry re-attaches to the job by name, killing the task stops it.
    On ``vertex`` it is a Vertex AI hyperparameter tuning job: each trial a custom job of the training (its values
    passed as ``--name=value`` and applied by the runtime, the metric reported through Vertex's hypertune file), the
    TPE sampler as Vertex's default algorithm and ``random`` as random search; the best trial's model is under
    ``best_model_uri``. A retry finds the job by display name and label.

    :param spec: :class:`~airflow_llmops.specs.TuningSpec` (or a mapping / JSON of one; templated).
    :param dataset_uri: prepared dataset folder, overriding ``spec.training.dataset_uri`` (templated).
    :param mlflow_tracking_uri: as for :class:`TrainModelOperator` (templated).
    :param platform_options: the cloud adapter's settings, as for :class:`TrainModelOperator` (templated).
    :param poll_interval: seconds between status checks of a cloud tuning job.
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "spec",
        "dataset_uri",
        "mlflow_tracking_uri",
        "jobs_root",
        "platform_options",
    )
    operator_extra_links = (MLflowRunLink(), CloudConsoleLink())
    ui_color = "#ead9ff"

    def __init__(
        self,
        *,
        spec: TuningSpec | Mapping[str, Any] | str,  # the class is imported lazily (parse time)
        dataset_uri: str | None = None,
        mlflow_tracking_uri: str | None = None,
        jobs_root: str | None = None,
        platform_options: Mapping[str, Any] | None = None,
        poll_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.platform_options = dict(platform_options or {})
        self.poll_interval = poll_interval
        self._cloud: tuple[Any, str] | None = None
        self.spec = spec
        self.dataset_uri = dataset_uri
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.jobs_root = jobs_root
        self._proc: subprocess.Popen[str] | None = None
        self._record: ProcessRecord | None = None

    def tuning_spec(self) -> TuningSpec:
        spec = self._parsed_spec()
        # The study's trial processes read local files: a dataset on a remote artifact root is staged here.
        local = str(self.stage_in(str(spec.training.dataset_uri), "dataset"))
        training = spec.training.model_copy(update={"dataset_uri": local})
        return spec.model_copy(update={"training": training})

    def _parsed_spec(self) -> TuningSpec:
        from airflow_llmops.specs.tuning import TuningSpec

        try:
            spec = TuningSpec.parse(self.spec)
        except SpecValidationError as err:
            raise AirflowFailException(str(err)) from None
        if self.dataset_uri:
            training = spec.training.model_copy(update={"dataset_uri": str(self.dataset_uri).removeprefix("file://")})
            spec = spec.model_copy(update={"training": training})
        if not spec.training.dataset_uri:
            raise AirflowFailException(f"{self.task_id}: no dataset; set dataset_uri or spec.training.dataset_uri")
        return spec

    def execute(self, context: Context) -> dict[str, Any]:
        platform = self.check_platform()
        if platform in _CLOUD:
            return self._execute_cloud(context, platform)
        if platform != "local":
            raise AirflowFailException(
                f"{self.task_id}: tuning runs on the local, {', '.join(_CLOUD)} platforms, not {self.platform!r}"
            )
        spec = self.tuning_spec()
        job_name = self.job_name(context)
        job_dir = Path(str(self.jobs_root or default_local_jobs_root()).removeprefix("file://")) / job_name
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "tuning.json").write_text(spec.to_json(indent=2))
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        # Not the worker's whole environment: it holds Airflow's secrets (see child_env).
        env = child_env({"LLMOPS_RUN_KEY": job_name, "PYTHONUNBUFFERED": "1"})
        env.pop("MLFLOW_TRACKING_URI", None)  # the operator's setting decides, not the worker's environment
        if tracking:
            env["MLFLOW_TRACKING_URI"] = tracking
        argv = [sys.executable, "-m", "airflow_llmops.ml.tune", "--spec", str(job_dir / "tuning.json")]
        argv += ["--job-dir", str(job_dir)]
        self.log.info("Tuning study %s: %d trials over %s", job_dir, spec.n_trials, sorted(spec.search_space))
        rc = self._stream(argv, env)
        result = read_json_object(job_dir / "result.json") or {}
        if rc != 0 or result.get("state") != "succeeded":
            message = result.get("message") or f"exit code {rc}"
            if rc == 2:  # bad input: the same spec fails the same way on every retry
                raise AirflowFailException(f"tuning study {job_name}: {message}")
            raise AirflowException(f"tuning study {job_name} failed: {message}")
        run_id = result.get("mlflow_run_id")
        url = mlflow_run_url(tracking, result.get("mlflow_experiment_id"), run_id) if run_id else None
        if url:
            MLflowRunLink().persist(context, url)
        self.log.info("Best %s %.4g with %s", result["metric"], result["best_value"], result["best_params"])
        return {
            **{k: v for k, v in result.items() if k not in ("state", "trials")},
            "trials": result["trials"][:_XCOM_TRIALS],
            "job_name": job_name,
        }

    def _execute_cloud(self, context: Context, name: str) -> dict[str, Any]:
        """A SageMaker or Vertex AI tuning job or an Azure ML sweep job: submitted (or found again on a retry),
        watched, its best trial handed on. ``spec.timeout_s`` on Vertex (which has no study deadline): the job is
        cancelled when it passes and the best trial so far is taken."""
        import time

        from airflow_llmops.platforms import get_platform, job_name_for

        spec = self._parsed_spec()
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        kwargs = cloud_platform_kwargs(
            name,
            self.platform_conn_id,
            self.platform_options,
            env={"MLFLOW_TRACKING_URI": tracking} if tracking else None,
        )
        job_name = job_name_for(context["dag"].dag_id, context["run_id"], self.task_id, max_length=_NAME_MAX[name])
        try:
            platform = get_platform(name, **kwargs)
            started = platform.submit_tuning(spec, job_name=job_name)
        except ValueError as err:  # a setting or a search space the cloud refuses, before any job starts
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        self._cloud = (platform, job_name)
        self.log.info("%s tuning job %s: %s", _TITLE[name], job_name, started["console_url"])
        CloudConsoleLink().persist(context, started["console_url"])
        last = None
        deadline = time.monotonic() + spec.timeout_s if spec.timeout_s and name == "vertex" else None
        timed_out = False
        while True:
            status = platform.tuning_status(job_name)
            line = (status.get("counters"), (status.get("best") or {}).get("value"))
            if line != last:
                self.log.info("%s: trials %s, best %s so far", job_name, *line)
                last = line
            if status["state"] in ("succeeded", "failed", "cancelled"):
                break
            if deadline is not None and not timed_out and time.monotonic() > deadline:
                self.log.warning(
                    "%s: timeout_s=%s passed: cancelling, keeping the best trial so far", job_name, spec.timeout_s
                )
                platform.stop_tuning(job_name)
                timed_out = True
            time.sleep(self.poll_interval)
        best = status.get("best")
        done = status["state"] == "succeeded" or (timed_out and status["state"] == "cancelled")
        if not done or not best or best.get("value") is None:
            raise AirflowException(f"tuning job {job_name} {status['state']}: {status['message']} (best: {best})")
        params = _typed_params(spec, best["params"])
        trials = platform.tuning_trials(job_name)
        self.log.info("Best %s %.4g with %s", spec.metric, float(best["value"]), params)
        out = {
            "metric": spec.metric,
            "direction": spec.resolved_direction,
            "best_value": float(best["value"]),
            "best_params": params,
            "best_training_spec": spec.trial_training(params).to_dict(),
            "best_training_job": best["training_job"],
            "trials": [{**t, "params": _typed_params(spec, t["params"])} for t in trials][:_XCOM_TRIALS],
            "job_name": job_name,
            "console_url": started["console_url"],
        }
        if best.get("model_uri"):
            out["best_model_uri"] = best["model_uri"]
        if timed_out:
            out["stopped_at_timeout"] = True
        return out

    def _stream(self, argv: list[str], env: dict[str, str]) -> int:
        """Run the study, copying its output into the task log line by line."""
        self._proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._record = ProcessRecord.of(self._proc, argv=argv)
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.rstrip()
            if line and not line.startswith(("Key ", "---", "classifier.", "Notes:", "- MISSING")):
                self.log.info("%s", line)
        return self._proc.wait()

    def on_kill(self) -> None:
        if self._cloud is not None:
            platform, job_name = self._cloud
            self.log.info("Stopping the %s tuning job %s", platform.name, job_name)
            platform.stop_tuning(job_name)
            return
        # poll(), not the record, says whether it runs: it reaps the study for execute()'s wait() to see its code.
        if self._proc is None or self._record is None or self._proc.poll() is not None:
            return
        self.log.info("Stopping the tuning study (process group %d)", self._record.pid)
        self._record.stop(grace=15)  # SIGTERM to its process group, SIGKILL after 15 s
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


def _typed_params(spec: TuningSpec, values: Mapping[str, Any]) -> dict[str, Any]:
    """A cloud's tuned values (strings) as the search space's types."""
    import json

    out: dict[str, Any] = {}
    for name, raw in values.items():
        rng = spec.search_space.get(name)
        if rng is None:
            continue
        if rng.type == "int":
            out[name] = int(float(raw))
        elif rng.type == "float":
            out[name] = float(raw)
        elif isinstance(raw, int | float) and not isinstance(raw, bool):  # Vertex: numeric choices come as floats
            out[name] = next((c for c in rng.choices or [] if not isinstance(c, str | bool) and c == raw), raw)
        else:
            choices = {json.dumps(c) if not isinstance(c, str) else c: c for c in rng.choices or []}
            out[name] = choices.get(str(raw), raw)
    return out
