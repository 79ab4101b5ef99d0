"""Typed, validated, JSON-serialisable descriptions of the work (no Airflow imports)."""

from airflow_llmops.specs.base import Spec, SpecValidationError
from airflow_llmops.specs.dataset import DatasetSpec, SplitSpec
from airflow_llmops.specs.drift import DriftPolicy
from airflow_llmops.specs.quantization import QuantizationSpec
from airflow_llmops.specs.rollout import SLO, RolloutPlan
from airflow_llmops.specs.training import DistributedSpec, LoraSpec, TrainingSpec
from airflow_llmops.specs.tuning import ParamRange, TuningSpec
from airflow_llmops.specs.validation import ValidationSpec

__all__ = [
    "SLO",
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
