"""Airflow operators of airflow-llmops. Importing this package stays light: no ML or cloud SDKs."""

from typing import TYPE_CHECKING, Any

from airflow_llmops.operators.base import LLMOpsBaseOperator
from airflow_llmops.operators.data import PrepareDatasetOperator, ValidateDatasetOperator
from airflow_llmops.operators.deploy import DeployModelOperator
from airflow_llmops.operators.drift import DriftCheckOperator, EndpointMetricsOperator
from airflow_llmops.operators.evaluation import EvaluateModelOperator
from airflow_llmops.operators.plan import PlanRunOperator
from airflow_llmops.operators.quantization import QuantizeModelOperator
from airflow_llmops.operators.registry import PromoteModelOperator, RegisterModelOperator
from airflow_llmops.operators.rollout import RolloutOperator
from airflow_llmops.operators.training import TrainModelOperator
from airflow_llmops.operators.tuning import TuneHyperparametersOperator

if TYPE_CHECKING:
    from airflow_llmops.operators.export import ExportModelOperator
    from airflow_llmops.operators.latest_only import LatestOnlyGateOperator

# Imported on first use (LatestOnlyGateOperator builds on the standard provider's LatestOnlyOperator).
_LAZY = {
    "ExportModelOperator": "airflow_llmops.operators.export",
    "LatestOnlyGateOperator": "airflow_llmops.operators.latest_only",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeployModelOperator",
    "DriftCheckOperator",
    "EndpointMetricsOperator",
    "EvaluateModelOperator",
    "ExportModelOperator",
    "LLMOpsBaseOperator",
    "LatestOnlyGateOperator",
    "PlanRunOperator",
    "PrepareDatasetOperator",
    "PromoteModelOperator",
    "QuantizeModelOperator",
    "RegisterModelOperator",
    "RolloutOperator",
    "TrainModelOperator",
    "TuneHyperparametersOperator",
    "ValidateDatasetOperator",
]
