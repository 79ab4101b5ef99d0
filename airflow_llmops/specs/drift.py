"""Drift policy: which drift checks run on live traffic, with which thresholds, and how often it may retrain."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec

DriftCheck = Literal["text_descriptors", "embeddings", "prediction", "latency"]

_ALL_CHECKS: tuple[DriftCheck, ...] = ("text_descriptors", "embeddings", "prediction", "latency")


class DriftPolicy(Spec):
    """Thresholds are per check; a window drifts when at least ``min_drifted_checks`` checks flag it."""

    checks: list[DriftCheck] = Field(default_factory=lambda: list(_ALL_CHECKS), min_length=1)
    window_minutes: int = Field(default=60, ge=1)
    sample_size: int = Field(default=2000, ge=10)
    min_rows: int = Field(default=30, ge=1, description="fewer rows in the window: no verdict, not an alarm")
    embedding_method: Literal["model", "ratio", "distance", "mmd"] = "model"
    embedding_threshold: float = Field(default=0.55, gt=0)
    column_method: Literal["auto", "ks", "psi", "wasserstein", "jensenshannon", "chisquare"] = "auto"
    column_threshold: float | None = Field(default=None, gt=0)
    drift_share: float = Field(default=0.5, gt=0, le=1, description="share of drifted columns that marks drift")
    min_drifted_checks: int = Field(default=1, ge=1)
    embedding_model: str = Field(default="all-MiniLM-L6-v2", min_length=1, description="sentence encoder")
    cooldown_hours: float = Field(default=24.0, ge=0, description="no second retrain signal inside this period")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_drifted_checks > len(self.checks):
            raise ValueError(
                f"min_drifted_checks={self.min_drifted_checks} exceeds the {len(self.checks)} checks enabled"
            )
        if self.min_rows > self.sample_size:
            raise ValueError(f"min_rows={self.min_rows} exceeds sample_size={self.sample_size}")
        return self
