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
from airflow_llmops.links.mlflow import MLflowRunLink, mlflow_run_url
from airflow_llmops.operators.base import LLMOpsBaseOperator
from airflow_llmops.operators.training import default_local_jobs_root, default_mlflow_tracking_uri
from airflow_llmops.processes import ProcessRecord, child_env
from airflow_llmops.specs import SpecValidationError

if TYPE_CHECKING:
    from airflow_llmops.specs.tuning import TuningSpec

if TYPE_CHECKING:
    from airflow.sdk import Context

_XCOM_TRIALS = 50  # the full trial list is in result.json and MLflow; XCom keeps the first ones


class TuneHyperparametersOperator(LLMOpsBaseOperator):
    """Search hyper-parameters with Optuna: each trial is a training run, pruned early when unpromising.

    The study runs ``python -m airflow_llmops.ml.tune`` in ``<jobs_root>/<job name>/`` and keeps its state in a
    SQLite file there, so a retry of the task continues the study instead of starting it again (finished trials
    count). With MLflow configured the study is a run with one child run per trial. Returns ``best_params``,
    ``best_value``, ``best_training_spec`` (ready for :class:`TrainModelOperator`) and the best trial's model.

    Runs on the ``local`` platform (trials in one process each, one after the other).

    :param spec: :class:`~airflow_llmops.specs.TuningSpec` (or a mapping / JSON of one; templated).
    :param dataset_uri: prepared dataset folder, overriding ``spec.training.dataset_uri`` (templated).
    :param mlflow_tracking_uri: as for :class:`TrainModelOperator` (templated).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "spec",
        "dataset_uri",
        "mlflow_tracking_uri",
        "jobs_root",
    )
    operator_extra_links = (MLflowRunLink(),)
    ui_color = "#ead9ff"

    def __init__(
        self,
        *,
        spec: TuningSpec | Mapping[str, Any] | str,  # the class is imported lazily (parse time)
        dataset_uri: str | None = None,
        mlflow_tracking_uri: str | None = None,
        jobs_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.dataset_uri = dataset_uri
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.jobs_root = jobs_root
        self._proc: subprocess.Popen[str] | None = None
        self._record: ProcessRecord | None = None

    def tuning_spec(self) -> TuningSpec:
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
        # The study's trial processes read local files: a dataset on a remote artifact root is staged here.
        local = str(self.stage_in(spec.training.dataset_uri, "dataset"))
        training = spec.training.model_copy(update={"dataset_uri": local})
        return spec.model_copy(update={"training": training})

    def execute(self, context: Context) -> dict[str, Any]:
        if self.check_platform() != "local":
            raise AirflowFailException(f"{self.task_id}: tuning runs on the local platform only, not {self.platform!r}")
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
        # poll(), not the record, says whether it runs: it reaps the study for execute()'s wait() to see its code.
        if self._proc is None or self._record is None or self._proc.poll() is not None:
            return
        self.log.info("Stopping the tuning study (process group %d)", self._record.pid)
        self._record.stop(grace=15)  # SIGTERM to its process group, SIGKILL after 15 s
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
