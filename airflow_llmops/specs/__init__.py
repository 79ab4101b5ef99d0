"""Typed, validated, JSON-serialisable descriptions of the work (no Airflow imports)."""

from typing import TYPE_CHECKING, Any

from airflow_llmops.specs.base import Spec, SpecValidationError
from airflow_llmops.specs.dataset import DatasetSpec, SplitSpec
from airflow_llmops.specs.drift import DriftPolicy
from airflow_llmops.specs.quantization import QuantizationSpec
from airflow_llmops.specs.rollout import SLO, AutoscalingSpec, RolloutPlan
from airflow_llmops.specs.training import DistributedSpec, LoraSpec, TrainingSpec
from airflow_llmops.specs.validation import ValidationSpec

if TYPE_CHECKING:
    from airflow_llmops.specs.tuning import ParamRange, TuningSpec


def __getattr__(name: str) -> Any:
    # The tuning spec nests the training spec's whole schema; built on first use, it keeps DAG parsing light.
    if name in ("ParamRange", "TuningSpec"):
        from airflow_llmops.specs import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SLO",
    "AutoscalingSpec",
    "DatasetSpec",
    "DistributedSpec",
    "DriftPolicy",
    "LoraSpec",
    "ParamRange",
    "QuantizationSpec",
    "RolloutPlan",
    "Spec",
    "SpecValidationError",
    "SplitSpec",
    "TrainingSpec",
    "TuningSpec",
    "ValidationSpec",
]
