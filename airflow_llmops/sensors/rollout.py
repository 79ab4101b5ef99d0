"""Deprecated name of :class:`~airflow_llmops.operators.rollout.RolloutOperator` (the rollout acts on traffic,
so it is an operator, not a sensor)."""

from __future__ import annotations

import warnings
from typing import Any

from airflow_llmops.operators.rollout import RolloutOperator


class RolloutHealthSensor(RolloutOperator):
    """Deprecated: use :class:`~airflow_llmops.operators.rollout.RolloutOperator` (same arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        warnings.warn(
            "RolloutHealthSensor is deprecated: use airflow_llmops.operators.RolloutOperator (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(**kwargs)
