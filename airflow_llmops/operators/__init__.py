"""Airflow operators of airflow-llmops. Importing this package stays light: no ML or cloud SDKs."""

from airflow_llmops.operators.base import LLMOpsBaseOperator
from airflow_llmops.operators.data import PrepareDatasetOperator, ValidateDatasetOperator
from airflow_llmops.operators.deploy import DeployModelOperator
from airflow_llmops.operators.drift import DriftCheckOperator, EndpointMetricsOperator
from airflow_llmops.operators.evaluation import EvaluateModelOperator
from airflow_llmops.operators.plan import PlanRunOperator
from airflow_llmops.operators.quantization import QuantizeModelOperator
from airflow_llmops.operators.registry import PromoteModelOperator, RegisterModelOperator
from airflow_llmops.operators.training import TrainModelOperator
from airflow_llmops.operators.tuning import TuneHyperparametersOperator

__all__ = [
    "DeployModelOperator",
    "DriftCheckOperator",
    "EndpointMetricsOperator",
    "EvaluateModelOperator",
    "LLMOpsBaseOperator",
    "PlanRunOperator",
    "PrepareDatasetOperator",
    "PromoteModelOperator",
    "QuantizeModelOperator",
    "RegisterModelOperator",
    "TrainModelOperator",
    "TuneHyperparametersOperator",
    "ValidateDatasetOperator",
]
