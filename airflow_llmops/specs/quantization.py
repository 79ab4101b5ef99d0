"""Quantization spec: which methods to try, how to measure them, the accuracy-aware search and the quality gate."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec

QuantMethod = Literal[
    "torch_dynamic_int8",
    "torchao_int8_dynamic",
    "torchao_int8_weight_only",
    "torchao_int4_weight_only",
    "onnx_dynamic_int8",
    "onnx_static_int8",
]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]

_DEFAULT_METHODS: tuple[QuantMethod, ...] = ("torch_dynamic_int8",)


class QuantizationSpec(Spec):
    """Methods to apply and compare against the full-precision model on the validation split.

    ``max_quality_drop`` is the tolerance of the gate, in points of the quality metric (accuracy for
    classifiers, perplexity increase in percent for causal LMs). ``quantize_embeddings`` also stores the embedding
    tables in int8 (for MiniLM they are half of the weights); ``threads`` is the CPU threads every method gets
    when measured (default: all cores of the worker).

    ``onnx_static_int8`` calibrates activation ranges on the first ``calibration_rows`` rows of the validation
    split with ``calibration_method`` (``minmax``, ``entropy`` or ``percentile``; case does not matter).

    ``accuracy_aware`` searches, for each method that supports it (``onnx_static_int8``, ``onnx_dynamic_int8``,
    ``torch_dynamic_int8``), which layers to keep in fp32: everything is quantized first; when the validation drop
    is over ``max_quality_drop``, each layer (an encoder block, the embeddings, the head) is tried in fp32 in turn
    and the costliest are kept there until the drop is within tolerance, within ``max_trials`` quantize-and-measure
    trials and ``max_search_s`` seconds per method. Because that tunes on the validation split, the chosen method
    is also scored on ``confirm_split`` (``None``: not) and the report gives both drops.
    """

    methods: list[QuantMethod] = Field(default_factory=lambda: list(_DEFAULT_METHODS), min_length=1)
    choose: Literal["all_must_pass", "fastest_within_tolerance"] = "fastest_within_tolerance"
    max_quality_drop: float = Field(default=1.0, ge=0)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 16], min_length=1)
    latency_repeats: int = Field(default=20, ge=1, le=10_000)
    max_eval_rows: int = Field(default=1000, ge=1)
    quantize_embeddings: bool = True
    threads: int | None = Field(default=None, ge=1)
    accuracy_aware: bool = False
    max_trials: int = Field(default=16, ge=1, le=1000)
    max_search_s: float = Field(default=900.0, gt=0)
    calibration_rows: int = Field(default=128, ge=1, le=100_000)
    calibration_method: CalibrationMethod = "percentile"
    confirm_split: str | None = "test"

    @field_validator("calibration_method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique(self) -> Self:
        dupes = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dupes:
            raise ValueError(f"methods lists {dupes} more than once")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}")
        return self
