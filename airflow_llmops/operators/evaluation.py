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

    Task metrics: accuracy and macro-F1 for classifiers, perplexity and a held-out generation check for causal
    LMs, plus any ``scorers``. The champion is ``models:/<registered_model_name>@<champion_alias>``; with no
    champion yet the challenger passes if it reaches ``min_score``. A failed gate fails the task with a message
    stating both scores and the threshold, or, with ``fail_branch`` set, skips ``pass_branch`` and follows
    ``fail_branch`` instead. An HTML report goes to the artifact store (extra link "Evaluation report").

    :param model_uri: the challenger: a model folder or ``models:/`` URI (templated).
    :param dataset_uri: prepared dataset (templated); ``split`` of it is scored.
    :param registered_model_name: the registry entry whose ``champion_alias`` is the model to beat (templated).
    :param metric: the gated metric; ``auto``: accuracy for classifiers, perplexity for causal LMs.
    :param min_improvement: how much better than the champion the challenger must be (metric units).
    :param min_score: an absolute bound the challenger must reach, champion or not.
    :param scorers: extra metrics, ``{"name": "package.module:function"}``; each is called as
        ``function(model_dir, dataset_dir, split) -> float`` for both models.
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
            result = evaluate_model(folder, dataset, split=self.split, max_rows=self.max_rows)
        except (EvaluationInputError, RegistryError, OSError) as err:
            raise AirflowFailException(f"{self.task_id}: cannot evaluate {model_uri}: {err}") from None
        for name, path in self.scorers.items():
            module, _, attr = path.partition(":")
            result["metrics"][name] = float(
                getattr(importlib.import_module(module), attr)(str(folder), dataset, self.split)
            )
        return {**result, "source": model_uri}

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
            raise AirflowFailException(
                f"{self.task_id}: metric {metric!r} not computed; available: {sorted(challenger['metrics'])}"
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
        result = {
            **decision,
            "challenger": challenger["metrics"],
            "champion": champion["metrics"] if champion else None,
            "champion_uri": champion_uri,
            "model_uri": str(self.model_uri),
            "report_uri": display_uri(report),
        }
        context["ti"].xcom_push(key="evaluation", value=result)
        if self.fail_branch is not None:
            assert self.pass_branch is not None
            self.do_branch(context, self.pass_branch if passed else self.fail_branch)
            return result
        if not passed:
            raise AirflowFailException(f"{self.task_id}: evaluation gate failed: {message}")
        return result
