"""Errors of the quantization core: bad input a user can fix, and methods this machine cannot run."""

from __future__ import annotations


class QuantizationError(Exception):
    """Base of the errors raised by :mod:`airflow_llmops.ml.quantization`."""


class QuantizationInputError(QuantizationError, ValueError):
    """The model, dataset or arguments are wrong; the message names the value and what to change."""


class QuantizationUnavailable(QuantizationError, RuntimeError):
    """The method needs hardware or kernels this machine lacks; the message lists the methods that run here."""

    def __init__(self, method: str, reason: str, available: list[str]) -> None:
        self.method = method
        self.reason = reason
        self.available = available
        super().__init__(
            f"quantization method {method!r} is not available on this machine: {reason}; methods available here: "
            f"{', '.join(available) or 'none'}"
        )


class UnsupportedTaskError(QuantizationError, NotImplementedError):
    """The method (or the measurement) is not implemented for this task, e.g. ONNX export of a causal LM."""
