"""Quantize a saved model, load it back, measure it against full precision and gate on the quality drop.

    artifact = quantize_model("job/model", "torch_dynamic_int8", "out/int8")
    predictor = load_quantized(artifact.path)          # in any later process
    predictor.predict(["what is your name?"])          # -> ["greetings"]
    report = compare("job/model", "datasets/topics", QuantizationSpec(...), "out/")
    print(format_table(report.rows)); report.decision.passed
    # int8 except the layers whose quantization costs more than the tolerance allows, found on validation rows:
    artifact = search_quantization("job/model", "onnx_static_int8", "out/int8", texts, labels,
                                   max_quality_drop=1.0, calibration_texts=texts[:128])

No Airflow here: operators call these functions (importing this package lazily, it imports torch).
"""

from airflow_llmops.ml.quantization.artifact import QuantizedArtifact, weights_size
from airflow_llmops.ml.quantization.compare import ComparisonReport, GateDecision, compare, decide, format_table
from airflow_llmops.ml.quantization.errors import (
    QuantizationError,
    QuantizationInputError,
    QuantizationUnavailable,
    UnsupportedTaskError,
)
from airflow_llmops.ml.quantization.measure import Measurement, measure, measure_many, set_threads
from airflow_llmops.ml.quantization.methods import (
    ALL_METHODS,
    SEARCHABLE_METHODS,
    available_methods,
    method_availability,
    quantize_model,
)
from airflow_llmops.ml.quantization.predictors import (
    FP32,
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    load_fp32,
    load_predictor,
    load_quantized,
)
from airflow_llmops.ml.quantization.search import SearchResult, search_layers, search_quantization

__all__ = [
    "ALL_METHODS",
    "FP32",
    "SEARCHABLE_METHODS",
    "ComparisonReport",
    "GateDecision",
    "Measurement",
    "OnnxPredictor",
    "Predictor",
    "QuantizationError",
    "QuantizationInputError",
    "QuantizationUnavailable",
    "QuantizedArtifact",
    "SearchResult",
    "TorchPredictor",
    "UnsupportedTaskError",
    "available_methods",
    "compare",
    "decide",
    "format_table",
    "load_fp32",
    "load_predictor",
    "load_quantized",
    "measure",
    "measure_many",
    "method_availability",
    "quantize_model",
    "search_layers",
    "search_quantization",
    "set_threads",
    "weights_size",
]
