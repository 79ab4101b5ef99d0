"""PlanRunOperator: turn a run's Params into validated, typed specs before any costly task starts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.operators.base import LLMOpsBaseOperator
from airflow_llmops.specs import (
    DatasetSpec,
    DriftPolicy,
    QuantizationSpec,
    RolloutPlan,
    Spec,
    SpecValidationError,
    TrainingSpec,
)
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

SpecInput = Spec | Mapping[str, Any] | str | None


class PlanRunOperator(LLMOpsBaseOperator):
    """Validate the specs of one pipeline run and write them, with the run's data interval, to ``plan.json``.

    Bad Params fail here, naming each field and value, instead of after an hour of training. The task is not
    retried on a validation error (a retry cannot fix a typo). Returns ``{"plan_uri", "data_interval",
    "specs": {...}}`` for downstream tasks.

    :param dataset: :class:`DatasetSpec` (or a mapping / JSON; templated).
    :param training: :class:`TrainingSpec`, optional (templated).
    :param quantization: :class:`QuantizationSpec`, optional (templated).
    :param rollout: :class:`RolloutPlan`, optional (templated).
    :param drift: :class:`DriftPolicy`, optional (templated).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "dataset",
        "training",
        "quantization",
        "rollout",
        "drift",
    )
    ui_color = "#e8f4fd"

    _KINDS: Mapping[str, type[Spec]] = {
        "dataset": DatasetSpec,
        "training": TrainingSpec,
        "quantization": QuantizationSpec,
        "rollout": RolloutPlan,
        "drift": DriftPolicy,
    }

    def __init__(
        self,
        *,
        dataset: SpecInput,
        training: SpecInput = None,
        quantization: SpecInput = None,
        rollout: SpecInput = None,
        drift: SpecInput = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self.training = training
        self.quantization = quantization
        self.rollout = rollout
        self.drift = drift

    def validated_specs(self) -> dict[str, Spec]:
        specs: dict[str, Spec] = {}
        problems: list[str] = []
        for kind, spec_cls in self._KINDS.items():
            value = getattr(self, kind)
            if value is None:
                continue
            try:
                specs[kind] = spec_cls.parse(value)
            except SpecValidationError as err:
                problems.extend(err.problems)
        if problems:
            raise AirflowFailException("run plan is invalid: " + "; ".join(problems))
        return specs

    def execute(self, context: Context) -> dict[str, Any]:
        platform = self.check_platform()
        specs = self.validated_specs()
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        interval = {"start": start.isoformat(), "end": end.isoformat()} if start and end else None
        plan = {
            "dag_id": context["dag"].dag_id,
            "run_id": context["run_id"],
            "platform": platform,
            "data_interval": interval,
            "specs": {kind: spec.to_dict() for kind, spec in specs.items()},
        }
        folder = self.run_folder(context)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "plan.json"
        target.write_text(json.dumps(plan, indent=2, sort_keys=True))
        self.log.info("Run plan for %s written to %s (specs: %s)", platform, target, ", ".join(specs))
        return {"plan_uri": display_uri(target), "data_interval": interval, "specs": plan["specs"]}
