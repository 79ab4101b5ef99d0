"""ONNX path: export a sequence classifier with dynamic batch and sequence axes, then int8 with ONNX Runtime.

The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the default since torch 2.9; the
TorchScript exporter is deprecated. Weights of MatMul/Gemm become int8 (activations are quantized per call); with
``quantize_embeddings`` the Gather of the embedding tables is quantized too, which is what brings a small encoder
under a third of its fp32 size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

# Inputs a BERT-style classifier takes, in the order the exported graph declares them.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin


class _Logits(torch.nn.Module):
    """Positional inputs in, logits out: the exporter needs a plain tensor signature."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(**dict(zip(self.names, inputs, strict=True))).logits
        return logits


def input_names(tokenizer: Any) -> tuple[str, ...]:
    given = set(tokenizer.model_input_names)
    return tuple(name for name in _INPUTS if name in given)


def export_and_quantize(
    model: torch.nn.Module, tokenizer: Any, target: Path, quantize_embeddings: bool
) -> dict[str, Any]:
    """Write the int8 ONNX model to ``target``; returns the options the loader needs (input names, opset)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = input_names(tokenizer)
    sample = tokenizer(["a short example", "a slightly longer example sentence"], padding=True, return_tensors="pt")
    args = tuple(sample[name] for name in names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        # The dynamo exporter prints its progress on stdout; keep task logs for what matters.
        with (
            contextlib.redirect_stdout(io.StringIO()),
            _quiet_loggers("torch.onnx", "torch._dynamo", "torch.export"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # pytree deprecations and axis-renaming notes, not actionable
            torch.onnx.export(
                _Logits(model, names).eval(),
                args,
                str(fp32),
                dynamo=True,
                input_names=list(names),
                output_names=["logits"],
                dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),  # one entry: the *inputs
                external_data=external,
                optimize=True,
            )
        ops = ["MatMul", "Gemm", *(["Gather"] if quantize_embeddings else [])]
        with _quiet_loggers("root"):  # ORT logs a generic "consider pre-processing" warning on every call
            quantize_dynamic(
                str(fp32),
                str(target),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=ops,
                use_external_data_format=external,
            )
    import onnx

    opset = next((o.version for o in onnx.load(str(target), load_external_data=False).opset_import if not o.domain), 0)
    return {"input_names": list(names), "opset": opset, "quantized_ops": ops, "external_data": external}


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Any:
    loggers = [logging.getLogger(n if n != "root" else None) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (as many as torch uses, for a fair compare)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's own thread pool spins between calls by default, which steals a core from the next measurement.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
