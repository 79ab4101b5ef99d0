"""QuantizeModelOperator: quantize a trained model with several methods, measure each, and gate on quality."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.artifacts import QuantizationReportLink
from airflow_llmops.operators.base import LLMOpsBaseOperator, is_remote, local_folder, staged_output
from airflow_llmops.operators.training import default_mlflow_tracking_uri
from airflow_llmops.specs import QuantizationSpec, SpecValidationError
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context


class QuantizeModelOperator(LLMOpsBaseOperator):
    """Quantize ``model_uri`` with every method of ``spec`` and measure each against full precision.

    For each method: on-disk size, p50/p95 latency per batch size, throughput and the quality metric's change on
    the validation split. ``spec.choose`` gates: ``all_must_pass`` fails the task unless every method stays
    within ``spec.max_quality_drop`` points; ``fastest_within_tolerance`` picks the fastest method that does (and
    fails if none). With ``spec.accuracy_aware`` each method that can first searches which layers to keep in fp32
    for its validation drop to be within tolerance (the layers and what each cost are in the table, MLflow and
    XCom). Since that tunes on the validation split, every method is also scored on ``spec.confirm_split`` (the
    test split) and both drops are reported; the evaluation stage then scores the chosen artifact on the test
    split again, against the champion. The table goes to the task log, to MLflow (a run with one metric set per
    method) and, in summary, to XCom with the chosen artifact's URI, ready for registration.

    :param model_uri: saved model folder (the training task's ``model_uri``; templated).
    :param dataset_uri: prepared dataset whose validation split is measured (templated).
    :param spec: :class:`~airflow_llmops.specs.QuantizationSpec` or a mapping / JSON of one (templated).
    :param mlflow_tracking_uri: where to log the comparison; default ``[llmops] mlflow_tracking_uri``.
    :param fallback_to_source: when no method passes the gate, hand on the full-precision model (the task
        succeeds with ``chosen_method: "none"`` and says why) instead of failing.
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "model_uri",
        "dataset_uri",
        "spec",
        "mlflow_tracking_uri",
    )
    operator_extra_links = (QuantizationReportLink(),)
    ui_color = "#e0f2f1"

    def __init__(
        self,
        *,
        model_uri: str,
        dataset_uri: str,
        spec: QuantizationSpec | Mapping[str, Any] | str | None = None,
        mlflow_tracking_uri: str | None = None,
        experiment: str = "llmops",
        fallback_to_source: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fallback_to_source = fallback_to_source
        self.model_uri = model_uri
        self.dataset_uri = dataset_uri
        self.spec = spec
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.experiment = experiment

    def execute(self, context: Context) -> dict[str, Any]:
        try:
            spec = QuantizationSpec.parse(self.spec or {})
        except SpecValidationError as err:
            raise AirflowFailException(str(err)) from None
        from airflow_llmops.ml.quantization import QuantizationInputError, compare, format_table

        target = self.run_folder(context) / "quantized" / self.task_id
        # The model and the dataset may be on a remote artifact store: the ML core reads local copies, staged
        # through the connection, and the artifacts go back to the store the same way.
        model_dir = self.stage_in(str(self.model_uri), "model")
        dataset_dir = self.stage_in(str(self.dataset_uri), "dataset")
        with staged_output(target, prefix="llmops-quantize-") as out_root:
            try:
                report = compare(model_dir, dataset_dir, spec, out_root)
            except QuantizationInputError as err:
                raise AirflowFailException(f"{self.task_id}: {err}") from None
            if is_remote(str(self.model_uri)):
                _record_source(report, str(self.model_uri))
        uploaded = local_folder(target) is None
        table = format_table(report.rows)
        self.log.info(
            "Quantization on %d %s rows (%d threads):\n%s", report.eval_rows, report.split, report.threads, table
        )
        self.log.info("%s", report.decision.message)
        for row in report.rows:
            if row.search:
                self.log.info("Accuracy-aware search, %s: %s", row.method, row.search.get("summary"))
        chosen_row = report.row(report.decision.chosen) if report.decision.chosen else None
        if (
            chosen_row is not None
            and chosen_row.confirm_drop is not None
            and (chosen_row.confirm_drop > report.decision.max_quality_drop)
        ):
            self.log.warning(
                "%s lost %.2f points on the %s split (%.2f on %s, where it was chosen): over max_quality_drop=%g",
                chosen_row.method,
                chosen_row.confirm_drop,
                chosen_row.confirm_split,
                chosen_row.quality_drop or 0.0,
                report.split,
                report.decision.max_quality_drop,
            )
        run_id = self._log_to_mlflow(context, report, table)
        QuantizationReportLink().persist(context, display_uri(target / "comparison.json"))
        decision = report.decision
        chosen = report.row(decision.chosen) if decision.chosen else None
        chosen_uri = None
        if not decision.passed or chosen is None:
            if not self.fallback_to_source:
                raise AirflowFailException(f"{self.task_id}: quantization gate failed: {decision.message}")
            self.log.warning("No method passed the gate; handing on the full-precision model %s", self.model_uri)
            chosen_uri = str(self.model_uri)
        elif chosen.artifact:
            chosen_uri = display_uri(target / chosen.method) if uploaded else chosen.artifact
        return {
            "passed": decision.passed,
            "chosen_method": decision.chosen if chosen_uri != str(self.model_uri) else "none",
            "chosen_model_uri": chosen_uri,
            "message": decision.message,
            "fp32_layers": chosen.fp32_layers if chosen is not None and chosen_uri != str(self.model_uri) else None,
            "source_model_uri": str(self.model_uri),
            "report_uri": display_uri(target / "comparison.json"),
            "mlflow_run_id": run_id,
            "methods": {
                row.method: {
                    "size_mb": round(row.size_bytes / 1e6, 2),
                    "size_ratio": row.size_ratio,
                    "speedup": row.speedup,
                    "throughput_rows_s": round(row.throughput_rows_s, 1),
                    "decode_tokens_s": None if row.decode_tokens_s is None else round(row.decode_tokens_s, 1),
                    "p50_ms": {str(b): round(v["p50"], 2) for b, v in row.latency_ms.items()},
                    "quality": row.quality,
                    "quality_drop": row.quality_drop,
                    "confirm_split": row.confirm_split,
                    "confirm_drop": row.confirm_drop,
                    "fp32_layers": row.fp32_layers,
                    "search": row.search,
                    "error": row.error,
                }
                for row in report.rows
            },
        }

    def _log_to_mlflow(self, context: Context, report: Any, table: str) -> str | None:
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        if not tracking:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(tracking)
        client = MlflowClient(tracking_uri=tracking)
        experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        run = client.create_run(
            experiment_id,
            tags={
                "mlflow.runName": f"quantize {context['dag'].dag_id}/{self.task_id}",
                "llmops.kind": "quantization",
                "llmops.run_key": self.job_name(context),
                "llmops.source_model": str(self.model_uri),
                "llmops.chosen_method": str(report.decision.chosen),
            },
        )
        run_id = str(run.info.run_id)
        for row in report.rows:
            if not row.ok:
                client.set_tag(run_id, f"error.{row.method}", str(row.error)[:4000])
                continue
            metrics = {"size_mb": row.size_bytes / 1e6, "throughput_rows_s": row.throughput_rows_s, **row.quality}
            if row.decode_tokens_s is not None:
                metrics["decode_tokens_s"] = row.decode_tokens_s
            metrics.update({f"p50_ms_b{b}": v["p50"] for b, v in row.latency_ms.items()})
            for key in ("quality_drop", "size_ratio", "speedup", "confirm_drop"):
                if getattr(row, key) is not None:
                    metrics[key] = float(getattr(row, key))
            if row.confirm_quality:
                metrics.update({f"{row.confirm_split}_{k}": v for k, v in row.confirm_quality.items()})
            if row.fp32_layers is not None:
                client.set_tag(run_id, f"fp32_layers.{row.method}", ",".join(row.fp32_layers) or "none")
            if row.search:
                client.set_tag(run_id, f"search.{row.method}", str(row.search.get("summary", ""))[:4000])
                metrics["search_trials"] = float(row.search.get("trials", 0))
                for layer, cost in (row.search.get("layer_costs") or {}).items():
                    metrics[f"layer_cost.{layer}"] = float(cost)
            for name, value in metrics.items():
                client.log_metric(run_id, f"{row.method}.{name}", float(value))
        client.log_text(run_id, table, "quantization_table.txt")
        client.log_dict(run_id, report.to_dict(), "comparison.json")
        client.set_terminated(run_id, status="FINISHED" if report.decision.passed else "FAILED")
        return run_id


def _record_source(report: Any, model_uri: str) -> None:
    """Each artifact's ``quantization.json`` names the model it was made from: the URI the task was given, not the
    local copy it read (the registry tags the version with it)."""
    for row in report.rows:
        meta = Path(row.artifact) / "quantization.json" if row.artifact else None
        if meta is not None and meta.is_file():
            data = json.loads(meta.read_text(encoding="utf-8"))
            data["source_model"] = display_uri(model_uri)
            meta.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
