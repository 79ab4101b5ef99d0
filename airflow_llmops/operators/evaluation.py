"""EvaluateModelOperator: score the challenger and the serving champion on the same split, and gate."""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.branch import BranchMixIn
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.artifacts import EvaluationReportLink
from airflow_llmops.operators.base import LLMOpsBaseOperator, is_remote
from airflow_llmops.operators.training import default_mlflow_tracking_uri
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

LOWER_IS_BETTER = ("perplexity", "loss")
#: Metrics of generated answers the gate can use instead of perplexity (higher is better).
GENERATION_METRICS = ("rouge_l", "bleu", "chrf", "judge_score")
_JUDGE_KEYS = {"base_url", "model", "conn_id", "timeout_s"}


def gate(
    metric: str,
    challenger: float,
    champion: float | None,
    *,
    min_improvement: float = 0.0,
    min_score: float | None = None,
    champion_label: str = "champion",
) -> tuple[bool, str]:
    """The verdict and a message stating both scores and the threshold."""
    lower = any(word in metric for word in LOWER_IS_BETTER)
    problems = []
    if min_score is not None and (challenger > min_score if lower else challenger < min_score):
        bound = "at most" if lower else "at least"
        problems.append(f"challenger {metric} {challenger:.4f} must be {bound} {min_score:.4f}")
    if champion is None:
        head = f"challenger {metric} {challenger:.4f}; no {champion_label} to compare with (first model)"
    else:
        change = champion - challenger if lower else challenger - champion
        head = (
            f"challenger {metric} {challenger:.4f} vs {champion_label} {champion:.4f}: "
            f"{'improvement' if change >= 0 else 'regression'} {change:+.4f}, required >= {min_improvement:+.4f}"
            f"{' (lower is better)' if lower else ''}"
        )
        if change < min_improvement:
            problems.append(f"improvement {change:+.4f} is below the required {min_improvement:+.4f}")
    passed = not problems
    return passed, head + ("; " + "; ".join(problems) if problems else "") + (" -> pass" if passed else " -> fail")


class EvaluateModelOperator(LLMOpsBaseOperator, BranchMixIn):
    """Evaluate the challenger and the current champion on the same split; gate the challenger.

    Task metrics: accuracy and macro-F1 for classifiers; for causal LMs and chat models perplexity (on the
    assistant's tokens for chat) and greedy answers to the first ``generation_rows`` held-out prompts, scored
    against their references with ROUGE-L, BLEU and chrF (and by an LLM judge with ``judge``); plus any
    ``scorers``. A causal LM is scored as a chat model when the dataset holds conversations (``messages``).

    The champion is ``models:/<registered_model_name>@<champion_alias>``; with no champion yet the challenger
    passes if it reaches ``min_score``. A failed gate fails the task with a message
    stating both scores and the threshold, or, with ``fail_branch`` set, skips ``pass_branch`` and follows
    ``fail_branch`` instead. An HTML report goes to the artifact store (extra link "Evaluation report").

    :param model_uri: the challenger: a model folder or ``models:/`` URI (templated).
    :param dataset_uri: prepared dataset (templated); ``split`` of it is scored.
    :param registered_model_name: the registry entry whose ``champion_alias`` is the model to beat (templated).
    :param metric: the gated metric; ``auto``: accuracy for classifiers, perplexity (lower is better) for causal
        LMs and chat models, which can instead be gated on ``rouge_l``, ``bleu``, ``chrf`` or ``judge_score``
        (higher is better) or any other computed metric.
    :param min_improvement: how much better than the champion the challenger must be (metric units).
    :param min_score: an absolute bound the challenger must reach, champion or not.
    :param scorers: extra metrics, ``{"name": "package.module:function"}``; each is called as
        ``function(model_dir, dataset_dir, split) -> float`` for both models.
    :param generation_rows: how many held-out prompts each causal LM answers (the first rows of the split).
    :param max_new_tokens: the longest answer, in tokens (greedy decoding).
    :param judge: grade each answer 1..10 with an LLM on an OpenAI-compatible endpoint, off by default:
        ``{"base_url": "https://.../v1", "model": "...", "conn_id": "..."}`` (templated); the API key is the
        connection's password (never logged nor pushed to XCom); ``timeout_s`` optional. The mean grade becomes
        the metric ``judge_score``.
    :param experiment: the MLflow experiment the evaluation run is logged to (when a tracking URI is set).
    :param pass_branch: / :param fail_branch: task ids to follow in branch mode (``fail_branch`` set).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "model_uri",
        "dataset_uri",
        "registered_model_name",
        "mlflow_tracking_uri",
        "min_improvement",
        "min_score",
        "metric",
        "generation_rows",
        "max_new_tokens",
        "judge",
    )
    operator_extra_links = (EvaluationReportLink(),)
    ui_color = "#fff3e0"
    inherits_from_skipmixin = True

    def __init__(
        self,
        *,
        model_uri: str,
        dataset_uri: str,
        registered_model_name: str | None = None,
        champion_alias: str = "champion",
        split: str = "test",
        metric: str = "auto",
        min_improvement: float = 0.0,
        min_score: float | None = None,
        max_rows: int | None = None,
        scorers: Mapping[str, str] | None = None,
        generation_rows: int = 64,
        max_new_tokens: int = 64,
        judge: Mapping[str, Any] | str | None = None,
        experiment: str = "llmops",
        pass_branch: str | Sequence[str] | None = None,
        fail_branch: str | Sequence[str] | None = None,
        mlflow_tracking_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.dataset_uri = dataset_uri
        self.registered_model_name = registered_model_name
        self.champion_alias = champion_alias
        self.split = split
        self.metric = metric
        self.min_improvement = min_improvement
        self.min_score = min_score
        self.max_rows = max_rows
        self.scorers = dict(scorers or {})
        self.generation_rows = generation_rows
        self.max_new_tokens = max_new_tokens
        self.judge = judge  # a mapping, or a template that renders to one (or to nothing: no judge)
        self.experiment = experiment
        if isinstance(judge, Mapping) and judge:
            _judge_settings(judge, self.task_id)
        self.pass_branch = pass_branch
        self.fail_branch = fail_branch
        self.mlflow_tracking_uri = mlflow_tracking_uri
        if fail_branch is not None and pass_branch is None:
            raise ValueError(f"{self.task_id}: fail_branch needs pass_branch (the task ids to follow on a pass)")

    def _tracking(self) -> str:
        return self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()

    def _score(self, model_uri: str, dataset: str, workdir: str) -> dict[str, Any]:
        from airflow_llmops.ml.evaluation import EvaluationInputError, evaluate_model
        from airflow_llmops.ml.registry import RegistryError, download_model

        # A folder on a remote artifact store is staged through the connection; registry URIs go through MLflow.
        source = str(self.stage_in(model_uri, "model")) if is_remote(model_uri) else model_uri
        try:
            folder = download_model(source, workdir, tracking_uri=self._tracking() or None)
            result = evaluate_model(
                folder,
                dataset,
                split=self.split,
                max_rows=self.max_rows,
                generation_rows=int(self.generation_rows),
                max_new_tokens=int(self.max_new_tokens),
            )
        except (EvaluationInputError, RegistryError, OSError) as err:
            raise AirflowFailException(f"{self.task_id}: cannot evaluate {model_uri}: {err}") from None
        for name, path in self.scorers.items():
            module, _, attr = path.partition(":")
            result["metrics"][name] = float(
                getattr(importlib.import_module(module), attr)(str(folder), dataset, self.split)
            )
        if self._judge_config() is not None and result.get("samples"):
            self._judge(result, model_uri)
        return {**result, "source": model_uri}

    def _judge_config(self) -> dict[str, Any] | None:
        """The rendered ``judge`` settings, checked; None when no judge is asked for."""
        if not self.judge:
            return None
        if not isinstance(self.judge, Mapping):
            raise AirflowFailException(
                f"{self.task_id}: judge must be a mapping with base_url, model and conn_id, got "
                f"{type(self.judge).__name__}"
            )
        try:
            return _judge_settings(self.judge, self.task_id)
        except ValueError as err:
            raise AirflowFailException(str(err)) from None

    def _judge(self, result: dict[str, Any], model_uri: str) -> None:
        """Grades of each sample's answer in ``sample["judge"]``; their mean as ``judge_score``."""
        from airflow_llmops.ml.generation_metrics import JudgeError, judge_answers

        settings = self._judge_config() or {}
        api_key = None
        if settings.get("conn_id"):
            from airflow.sdk import BaseHook

            api_key = BaseHook.get_connection(str(settings["conn_id"])).password or None
        try:
            grades = judge_answers(
                result["samples"],
                base_url=str(settings["base_url"]),
                model=str(settings["model"]),
                api_key=api_key,
                timeout_s=float(settings.get("timeout_s", 60.0)),
            )
        except JudgeError as err:
            raise AirflowFailException(f"{self.task_id}: cannot judge the answers of {model_uri}: {err}") from None
        for sample, grade in zip(result["samples"], grades, strict=True):
            sample["judge"] = grade
        graded = [g for g in grades if g is not None]
        if not graded:
            raise AirflowFailException(
                f"{self.task_id}: the judge {settings['model']!r} gave no grade (an integer 1..10) for any of "
                f"the {len(grades)} answers of {model_uri}"
            )
        result["metrics"]["judge_score"] = sum(graded) / len(graded)
        result["metrics"]["judge_ungraded"] = float(len(grades) - len(graded))

    def _champion(self) -> str | None:
        if not self.registered_model_name:
            return None
        from airflow_llmops.ml.registry import current_version

        tracking = self._tracking()
        if not tracking:
            raise AirflowFailException(f"{self.task_id}: registered_model_name needs an MLflow tracking URI")
        from mlflow.exceptions import MlflowException

        try:
            version = current_version(self.registered_model_name, self.champion_alias, tracking_uri=tracking)
        except MlflowException:
            version = None
        return f"models:/{self.registered_model_name}/{version}" if version else None

    def execute(self, context: Context) -> Any:
        from airflow_llmops.ml import evaluation_report

        dataset = str(self.stage_in(str(self.dataset_uri), "dataset"))
        with tempfile.TemporaryDirectory(prefix="llmops-eval-") as work:
            challenger = self._score(str(self.model_uri), dataset, f"{work}/challenger")
            champion_uri = self._champion()
            champion = self._score(champion_uri, dataset, f"{work}/champion") if champion_uri else None
        metric = (
            self.metric
            if self.metric != "auto"
            else ("accuracy" if challenger["task"] == "classification" else "perplexity")
        )
        if metric not in challenger["metrics"]:
            hint = ""
            if metric == "judge_score" and self._judge_config() is None:
                hint = "; judge_score needs judge={'base_url': ..., 'model': ..., 'conn_id': ...}"
            elif metric in GENERATION_METRICS:
                hint = (
                    f"; {metric} is measured on generated answers of a causal LM or chat model against references "
                    "(prompt/response or messages rows)"
                )
            raise AirflowFailException(
                f"{self.task_id}: metric {metric!r} not computed; available: {sorted(challenger['metrics'])}{hint}"
            )
        label = f"{self.champion_alias} ({champion_uri})" if champion_uri else self.champion_alias
        passed, message = gate(
            metric,
            float(challenger["metrics"][metric]),
            float(champion["metrics"][metric]) if champion else None,
            min_improvement=float(self.min_improvement),
            min_score=None if self.min_score is None or self.min_score == "" else float(self.min_score),  # type: ignore[comparison-overlap]
            champion_label=label,
        )
        decision = {"passed": passed, "message": message, "metric": metric}
        report = self.run_folder(context) / "evaluation" / self.task_id / "index.html"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(
            evaluation_report.render(
                title=f"Evaluation: {context['dag'].dag_id} / {context['run_id']}",
                decision=decision,
                challenger=challenger,
                champion=champion,
                context={"split": self.split, "dataset": str(self.dataset_uri), "metric": metric},
            )
        )
        EvaluationReportLink().persist(context, display_uri(report))
        self.log.info("%s", message)
        try:
            run_id = self._log_to_mlflow(context, challenger, champion, decision, report.read_text())
        except Exception as err:  # the gate has decided; an unreachable MLflow must not turn it into a traceback
            self.log.warning("Could not log the evaluation to MLflow (%s: %s)", type(err).__name__, err)
            run_id = None
        result = {
            **decision,
            "challenger": challenger["metrics"],
            "champion": champion["metrics"] if champion else None,
            "champion_uri": champion_uri,
            "model_uri": str(self.model_uri),
            "report_uri": display_uri(report),
            "mlflow_run_id": run_id,
        }
        context["ti"].xcom_push(key="evaluation", value=result)
        if self.fail_branch is not None:
            assert self.pass_branch is not None
            self.do_branch(context, self.pass_branch if passed else self.fail_branch)
            return result
        if not passed:
            raise AirflowFailException(f"{self.task_id}: evaluation gate failed: {message}")
        return result

    def _log_to_mlflow(
        self,
        context: Context,
        challenger: dict[str, Any],
        champion: dict[str, Any] | None,
        decision: dict[str, Any],
        report_html: str,
    ) -> str | None:
        """One MLflow run per evaluation: ``challenger.<metric>`` and ``champion.<metric>``, the verdict as tags,
        the report and the samples as artifacts. No tracking URI: nothing is logged."""
        tracking = self._tracking()
        if not tracking:
            return None
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        run = client.create_run(
            experiment_id,
            run_name=f"evaluate {context['dag'].dag_id}/{self.task_id}",
            tags={
                "llmops.kind": "evaluation",
                "llmops.run_key": self.job_name(context),
                "llmops.challenger": str(self.model_uri),
                "llmops.champion": str((champion or {}).get("source") or "none"),
                "llmops.task": str(challenger.get("task")),
                "llmops.gate_metric": str(decision["metric"]),
                "llmops.gate": "pass" if decision["passed"] else "fail",
            },
        )
        run_id = str(run.info.run_id)
        for side, result in (("challenger", challenger), ("champion", champion)):
            for name, value in ((result or {}).get("metrics") or {}).items():
                client.log_metric(run_id, f"{side}.{name}", float(value))
        client.set_tag(run_id, "llmops.gate_message", str(decision["message"])[:4000])
        client.log_text(run_id, report_html, "evaluation/index.html")
        if challenger.get("samples"):
            client.log_dict(
                run_id,
                {"challenger": challenger["samples"], "champion": (champion or {}).get("samples")},
                "evaluation/samples.json",
            )
        client.set_terminated(run_id, status="FINISHED")
        return run_id


def _judge_settings(judge: Mapping[str, Any], task_id: str) -> dict[str, Any]:
    """The judge's settings, checked: ``base_url`` and ``model`` required, ``conn_id`` and ``timeout_s``
    optional (templated values are checked again after rendering)."""
    unknown = sorted(set(judge) - _JUDGE_KEYS)
    missing = sorted(k for k in ("base_url", "model") if not judge.get(k))
    if unknown or missing:
        raise ValueError(
            f"{task_id}: judge needs base_url and model (conn_id, timeout_s optional)"
            + (f"; missing: {missing}" if missing else "")
            + (f"; unknown keys: {unknown}" if unknown else "")
        )
    return dict(judge)
