"""Hyper-parameter search: ``python -m airflow_llmops.ml.tune --spec TUNING.json --job-dir DIR``.

An Optuna study whose trials are training runs of the training entry point's code (one process each, in this
process). The study lives in ``DIR/study.db`` (SQLite), so running the command again with the same folder
continues it: finished trials count towards ``n_trials``, a trial cut short by a crash is marked failed and
its budget is spent again. Each trial trains in ``DIR/trial-<n>/``, reports ``metric`` on the validation split
every ``eval_every_steps`` to the pruner, and is stopped early when the pruner says so.

With ``MLFLOW_TRACKING_URI`` set, the study is an MLflow run (found again by ``LLMOPS_RUN_KEY``) with one child
run per trial (``mlflow.parentRunId``), each holding its params, learning curve and final metrics; the parent
gets the best params and value. ``DIR/result.json`` holds the outcome; only the best trial keeps its model.

Exit codes: 0 done (at least one trial finished); 2 bad input; 1 anything else, including "every trial failed".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from airflow_llmops.jsonfiles import read_json_object
from airflow_llmops.ml.training.errors import TrainingInputError
from airflow_llmops.ml.training.jobdir import JobDir
from airflow_llmops.specs.base import SpecValidationError
from airflow_llmops.specs.tuning import ParamRange, TuningSpec

STUDY_NAME = "llmops"
RESULT_FILE = "result.json"


def suggest(trial: Any, name: str, space: ParamRange) -> Any:
    if space.type == "categorical":
        return trial.suggest_categorical(name, space.choices)
    assert space.low is not None and space.high is not None  # checked by ParamRange
    if space.type == "int":
        step = int(space.step or 1)
        return trial.suggest_int(name, int(space.low), int(space.high), step=step, log=space.log)
    return trial.suggest_float(name, space.low, space.high, step=space.step, log=space.log)


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    if name == "eval_perplexity" and "eval_perplexity" not in metrics and metrics.get("eval_loss") is not None:
        return math.exp(min(float(metrics["eval_loss"]), 700.0))
    value = metrics.get(name)
    return None if value is None else float(value)


def pruning_callback(trial: Any, metric: str) -> Any:
    """Reports ``metric`` at each evaluation; raises ``optuna.TrialPruned`` out of the Trainer when told to."""
    import optuna
    from transformers import TrainerCallback

    class _Pruning(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            value = metric_value(dict(metrics or {}), metric)
            if value is None:
                raise TrainingInputError(
                    f"metric {metric!r} is not among the evaluation metrics {sorted(metrics or {})}"
                )
            trial.report(value, state.global_step)
            if trial.should_prune():
                print(f"[tune] trial {trial.number} pruned at step {state.global_step} ({metric} {value:.4g})")
                raise optuna.TrialPruned(f"{metric} {value:.4g} at step {state.global_step}")

    return _Pruning()


class Study:
    def __init__(self, spec: TuningSpec, root: Path) -> None:
        import optuna

        self.spec = spec
        self.root = root
        self.optuna = optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        root.mkdir(parents=True, exist_ok=True)
        sampler = (
            optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(2, spec.pruner_startup_trials))
            if spec.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=spec.seed)
        )
        pruner: Any = (
            optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=0)
            if spec.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        self.study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=f"sqlite:///{root / 'study.db'}",
            sampler=sampler,
            pruner=pruner,
            direction=spec.resolved_direction,
            load_if_exists=True,
        )
        self._fail_abandoned_trials()
        self._enqueue_initial_trials()
        self.parent = ParentRun.start(spec)

    def _fail_abandoned_trials(self) -> None:
        """A crash leaves its trial RUNNING in the database; it will never report again."""
        for trial in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            self.study._storage.set_trial_state_values(trial._trial_id, self.optuna.trial.TrialState.FAIL)
            print(f"[tune] trial {trial.number} was cut short by an earlier attempt; marked failed", flush=True)

    def _enqueue_initial_trials(self) -> None:
        if self.study.trials:  # enqueued on the first attempt already
            return
        for params in self.spec.initial_trials:
            self.study.enqueue_trial(params)

    def counted(self) -> int:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def objective(self, trial: Any) -> float:
        from airflow_llmops.ml.training.plan import Placement, preflight
        from airflow_llmops.ml.training.runner import run

        params = {name: suggest(trial, name, space) for name, space in self.spec.search_space.items()}
        try:
            training = self.spec.trial_training(params)
        except SpecValidationError as err:
            raise TrainingInputError(f"trial {trial.number} params {params}: {err}") from None
        # Trials restart rather than resume; checkpoints would only cost disk and time.
        training = training.model_copy(update={"checkpoint_every_steps": 10**9})
        job = JobDir(self.root / f"trial-{trial.number:03d}")
        shutil.rmtree(job.root, ignore_errors=True)
        print(f"[tune] trial {trial.number} params {params}", flush=True)
        trial.set_user_attr("params", params)
        where = Placement.from_env(training)
        started = time.monotonic()
        os.environ["LLMOPS_RUN_KEY"] = f"{self.parent.key}/trial-{trial.number}"
        tags = {"llmops.trial": str(trial.number), **self.parent.child_tags()}
        try:
            status = run(
                training,
                job,
                (where, preflight(training, job, where)),
                callbacks=[pruning_callback(trial, self.spec.metric)],
                eval_every_steps=self.spec.eval_every_steps,
                tags=tags,
                log_model=False,
            )
        except self.optuna.TrialPruned:
            self._after_trial(trial, job, "PRUNED", None, time.monotonic() - started)
            raise
        except Exception as err:
            self._after_trial(trial, job, "FAILED", None, time.monotonic() - started)
            print(f"[tune] trial {trial.number} failed: {err}", flush=True)
            raise
        value = metric_value(status["metrics"], self.spec.metric)
        if value is None or not math.isfinite(value):
            self._after_trial(trial, job, "FAILED", None, time.monotonic() - started)
            raise RuntimeError(f"trial {trial.number}: {self.spec.metric} is {value}")
        trial.set_user_attr("model_uri", status["model_uri"])
        trial.set_user_attr("mlflow_run_id", status.get("mlflow_run_id"))
        self._after_trial(trial, job, "COMPLETE", value, time.monotonic() - started)
        return value

    def _after_trial(self, trial: Any, job: JobDir, state: str, value: float | None, seconds: float) -> None:
        trial.set_user_attr("seconds", round(seconds, 2))
        run_id = (read_json_object(job.mlflow) or {}).get("run_id")
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            self.parent.mark_child(run_id, state)
        shown = "-" if value is None else f"{value:.4g}"
        print(f"[tune] trial {trial.number} {state.lower()} ({self.spec.metric} {shown}, {seconds:.0f}s)", flush=True)

    def optimize(self) -> dict[str, Any]:
        remaining = self.spec.n_trials - self.counted()
        deadline = time.monotonic() + self.spec.timeout_s if self.spec.timeout_s else None
        while remaining > 0:
            if deadline is not None and time.monotonic() >= deadline:
                print(f"[tune] timeout_s {self.spec.timeout_s} reached; {remaining} trials not run", flush=True)
                break
            self.study.optimize(self.objective, n_trials=1, catch=(Exception,))
            remaining = self.spec.n_trials - self.counted()
            failed = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.FAIL,))
            if len(failed) > 2 * self.spec.n_trials:
                print(f"[tune] {len(failed)} trials failed; stopping", flush=True)
                break
        return self.result()

    def result(self) -> dict[str, Any]:
        trials = [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                "seconds": t.user_attrs.get("seconds"),
            }
            for t in self.study.trials
        ]
        complete = [t for t in self.study.trials if t.state == self.optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise RuntimeError(f"no trial of {len(trials)} finished: {[(t['number'], t['state']) for t in trials]}")
        best = self.study.best_trial
        counts = {s: sum(1 for t in trials if t["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
        result = {
            "metric": self.spec.metric,
            "direction": self.spec.resolved_direction,
            "best_value": best.value,
            "best_params": best.params,
            "best_trial": best.number,
            "best_model_uri": best.user_attrs.get("model_uri"),
            "best_training_spec": self.spec.trial_training(best.params).to_dict(),
            "trials_complete": counts["COMPLETE"],
            "trials_pruned": counts["PRUNED"],
            "trials_failed": counts["FAIL"],
            "trials": trials,
            "mlflow_run_id": self.parent.run_id,
            "mlflow_experiment_id": self.parent.experiment_id,
        }
        self._keep_only_best_model(best.number)
        self.parent.finish(result)
        return result

    def _keep_only_best_model(self, best: int) -> None:
        for folder in self.root.glob("trial-*"):
            if folder.name != f"trial-{best:03d}":
                shutil.rmtree(folder / "model", ignore_errors=True)
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)


class ParentRun:
    """The study's MLflow run, driven through the client (never the active fluent run: trials use that)."""

    def __init__(self, key: str, run_id: str | None, experiment_id: str | None) -> None:
        self.key = key
        self.run_id = run_id
        self.experiment_id = experiment_id

    @classmethod
    def start(cls, spec: TuningSpec) -> ParentRun:
        key = os.environ.get("LLMOPS_RUN_KEY") or f"tune-{os.getpid()}"
        experiment = spec.training.mlflow_experiment
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            return cls(key, None, None)
        import mlflow
        from mlflow.tracking import MlflowClient

        from airflow_llmops.ml.training.tracking import RUN_KEY_TAG, _run_with_key, flatten

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        client = MlflowClient()
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run_id = _run_with_key(experiment_id, key)
        if run_id is None:
            run = client.create_run(
                experiment_id, tags={RUN_KEY_TAG: key, "llmops.kind": "tuning", "mlflow.runName": f"tune {key}"}
            )
            run_id = run.info.run_id
            search = {f"search_space.{k}": json.dumps(v.to_dict()) for k, v in spec.search_space.items()}
            settings = flatten({k: v for k, v in spec.to_dict().items() if k not in ("search_space", "training")})
            for name, value in {**search, **settings}.items():
                client.log_param(run_id, name, value[:6000])
        else:
            client.update_run(run_id, status="RUNNING")
        return cls(key, run_id, str(experiment_id))

    def child_tags(self) -> dict[str, str]:
        return {"mlflow.parentRunId": self.run_id} if self.run_id else {}

    def mark_child(self, run_id: str, state: str) -> None:
        if not self.run_id:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.set_tag(run_id, "llmops.trial_state", state)
        if state != "COMPLETE":
            with contextlib.suppress(Exception):  # the runner may already have ended it as FAILED
                client.set_terminated(run_id, status="KILLED" if state == "PRUNED" else "FAILED")

    def finish(self, result: dict[str, Any]) -> None:
        if not self.run_id:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for name, value in result["best_params"].items():
            client.set_tag(self.run_id, f"best.{name}", str(value))
        client.set_tag(self.run_id, "best.trial", str(result["best_trial"]))
        if result.get("best_model_uri"):
            client.log_artifacts(self.run_id, result["best_model_uri"], artifact_path="model")
        for name in ("best_value", "trials_complete", "trials_pruned", "trials_failed"):
            client.log_metric(self.run_id, name, float(result[name]))
        client.set_terminated(self.run_id, status="FINISHED")

    def fail(self) -> None:
        if self.run_id:
            from mlflow.tracking import MlflowClient

            with contextlib.suppress(Exception):
                MlflowClient().set_terminated(self.run_id, status="FAILED")


def check_inputs(spec: TuningSpec, root: Path) -> None:
    """Bad input common to every trial (data, model, batch size) fails once, before the study starts."""
    from airflow_llmops.ml.training.plan import Placement, preflight

    known = {"eval_loss", "eval_accuracy", "eval_macro_f1"} if spec.training.task == "classification" else set()
    known = known or {"eval_loss", "eval_perplexity"}
    if spec.metric not in known:
        task = spec.training.task
        raise TrainingInputError(f"metric {spec.metric!r} is not reported for {task}; use one of {sorted(known)}")
    base = spec.trial_training({k: _first_value(v) for k, v in spec.search_space.items()})
    job = JobDir(root / "preflight")
    preflight(base, job, Placement.from_env(base))
    shutil.rmtree(job.root, ignore_errors=True)


def _first_value(space: ParamRange) -> Any:
    if space.type == "categorical":
        assert space.choices
        return space.choices[0]
    assert space.low is not None
    return int(space.low) if space.type == "int" else space.low


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_llmops.ml.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="TuningSpec JSON file (or the JSON text itself)")
    parser.add_argument("--job-dir", required=True, help="folder of the study, its trials and result.json")
    args = parser.parse_args(argv)
    root = Path(args.job_dir).resolve()
    result_path = root / RESULT_FILE
    try:
        text = args.spec if args.spec.lstrip().startswith("{") else Path(args.spec).read_text(encoding="utf-8")
        spec = TuningSpec.from_json(text)
        from airflow_llmops.ml.train import configure_threads, quiet_libraries

        quiet_libraries()
        configure_threads()
        result_path.unlink(missing_ok=True)
        check_inputs(spec, root)
        study = Study(spec, root)
    except (OSError, SpecValidationError, TrainingInputError) as err:
        print(f"[tune] bad input: {err}", file=sys.stderr, flush=True)
        JobDir(root).write_json(result_path, {"state": "failed", "message": str(err)})
        return TrainingInputError.exit_code
    try:
        result = study.optimize()
    except Exception as err:
        traceback.print_exc()
        study.parent.fail()
        JobDir(root).write_json(result_path, {"state": "failed", "message": f"{type(err).__name__}: {err}"})
        return 1
    JobDir(root).write_json(result_path, {"state": "succeeded", **result})
    print(
        f"[tune] best {result['metric']} {result['best_value']:.4g} with {result['best_params']} "
        f"(trial {result['best_trial']}; {result['trials_complete']} complete, {result['trials_pruned']} pruned, "
        f"{result['trials_failed']} failed)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
