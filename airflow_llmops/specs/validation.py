"""Validation spec: the checks a prepared LLM text dataset must pass before training may start."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec

PiiType = Literal["email", "phone", "credit_card", "iban", "ip_address", "secret"]
ALL_PII: tuple[PiiType, ...] = ("email", "phone", "credit_card", "iban", "ip_address", "secret")


class ValidationSpec(Spec):
    """Thresholds of the built-in suite. ``mostly_*`` are the fraction of rows that must pass a row-level check
    (Great Expectations' ``mostly``); rows that fail row-level checks are quarantined with their reason.

    ``pii_action``: ``fail`` stops the pipeline when personal data is found (privacy gate); ``redact`` replaces
    each match with a placeholder such as ``[EMAIL]`` and continues, recording what was redacted.
    """

    text_columns: list[str] | None = Field(default=None, description="None: the dataset's text/prompt columns")
    label_column: str | None = "label"
    min_tokens: int = Field(default=1, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    allowed_labels: list[str] | None = None
    min_rows_per_label: int = Field(default=5, ge=1)
    min_labels: int = Field(default=2, ge=1, description="a classifier needs at least two classes")
    max_duplicate_ratio: float = Field(default=0.05, ge=0, le=1)
    max_invalid_char_ratio: float = Field(default=0.0, ge=0, le=1, description="mojibake / control characters")
    mostly_non_empty: float = Field(default=1.0, gt=0, le=1)
    mostly_length: float = Field(default=1.0, gt=0, le=1)
    mostly_clean_text: float = Field(default=1.0, gt=0, le=1)
    pii_types: list[PiiType] = Field(default_factory=lambda: list(ALL_PII))
    pii_action: Literal["fail", "redact"] = "fail"
    max_quarantine_fraction: float = Field(default=0.02, ge=0, le=1)
    example_rows: int = Field(default=5, ge=1, le=100, description="row ids shown per failed check")

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        if self.allowed_labels is not None and len(set(self.allowed_labels)) != len(self.allowed_labels):
            raise ValueError(f"allowed_labels has duplicates: {self.allowed_labels}")
        return self
