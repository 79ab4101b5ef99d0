"""ONNX path: export a sequence classifier with dynamic batch and sequence axes, then int8 with ONNX Runtime.

The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the default since torch 2.9; the
TorchScript exporter is deprecated.

- ``onnx_dynamic_int8``: weights of MatMul/Gemm become int8, activations are quantized per call; with
  ``quantize_embeddings`` the Gather of the embedding tables is quantized too, which is what brings a small encoder
  under a third of its fp32 size.
- ``onnx_static_int8``: first ONNX Runtime's transformer optimizer fuses what it recognises in a BERT-class encoder
  (LayerNorm with the residual Add, bias with GELU, attention where the pattern matches), then QDQ static int8:
  per-channel int8 weights and activations whose ranges were calibrated on sample texts (MinMax, Entropy or
  Percentile), so nothing is measured at run time. Only MatMuls with a weight operand are quantized (the
  activation-activation products of attention stay fp32).

Both can keep chosen layers in fp32: every quantizable node belongs to a layer group (:func:`node_groups`, from
the module path the exporter records on each node), and ``fp32_layers`` excludes the nodes of those groups.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from airflow_llmops.ml.quantization.layers import group_order, layer_group

# Inputs a BERT-style classifier takes, in the order the exported graph declares them.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin
# Encoder families ONNX Runtime's "bert" optimizer handles (its fusions match their graphs).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet"})
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CALIBRATION_BATCH = 8
_SCOPES = "pkg.torch.onnx.name_scopes"


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


def export_fp32(model: torch.nn.Module, tokenizer: Any, target: Path) -> dict[str, Any]:
    """Export ``model`` (a sequence classifier) to ``target`` in fp32; returns the input names and whether the
    weights went to an external data file."""
    names = input_names(tokenizer)
    sample = tokenizer(["a short example", "a slightly longer example sentence"], padding=True, return_tensors="pt")
    args = tuple(sample[name] for name in names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    # The dynamo exporter prints its progress on stdout; keep task logs for what matters.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        _quiet_loggers("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # pytree deprecations and axis-renaming notes, not actionable
        torch.onnx.export(
            _Logits(model, names).eval(),
            args,
            str(target),
            dynamo=True,
            input_names=list(names),
            output_names=["logits"],
            dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),  # one entry: the *inputs
            external_data=external,
            optimize=True,
        )
    return {"input_names": list(names), "external_data": external}


def optimize_encoder(source: Path, target: Path, config: Any) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (python fusions only, no hardware-specific ops) on a BERT-class
    encoder: writes ``target`` and returns the fusions it made. A model it does not handle, or a failed fusion
    pass, leaves the graph as exported (``target`` is then a copy) and says why."""
    import onnx

    model_type = str(getattr(config, "model_type", "") or "")
    if model_type not in ENCODER_TYPES:
        onnx.save_model(onnx.load(str(source)), str(target))
        return {"applied": False, "reason": f"model_type {model_type!r} is not a BERT-class encoder"}
    from onnxruntime.transformers.optimizer import optimize_model

    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "dim", 0) or 0)
    try:
        with _quiet_loggers("onnxruntime.transformers", "fusion", "onnx_model", "root"):
            optimized = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    except Exception as err:  # an unrecognised graph is a reason to skip the fusions, not to fail
        onnx.save_model(onnx.load(str(source)), str(target))
        return {"applied": False, "reason": f"ONNX Runtime's optimizer failed: {type(err).__name__}: {err}"}
    optimized.save_model_to_file(str(target))
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    return {"applied": True, "fusions": stats}


def node_groups(path: Path, op_types: Sequence[str], *, weights_only: bool) -> dict[str, list[str]]:
    """Layer group → names of the nodes of ``op_types`` in the ONNX model at ``path``.

    The group comes from the module path the exporter records on each node (``pkg.torch.onnx.name_scopes``),
    else from the weight's initializer name. ``weights_only`` keeps only nodes with a weight (initializer) operand:
    the ones static quantization touches when ``MatMulConstBOnly`` is set.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        weights = [name for name in node.input if name in initializers]
        if node.op_type == "Gather" and node.input[0] not in initializers:
            continue  # a Gather of activations, shapes or indices, not of an embedding table
        if weights_only and not weights:
            continue
        groups.setdefault(layer_group(_module_path(node, weights)), []).append(node.name)
    return {group: groups[group] for group in group_order(list(groups))}


def _module_path(node: Any, weights: list[str]) -> str:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            with contextlib.suppress(ValueError, SyntaxError):
                scopes = ast.literal_eval(prop.value)
                if isinstance(scopes, list) and scopes:
                    return max((str(scope) for scope in scopes), key=len)  # the deepest module (the last is the op)
    named = [w for w in weights if not w.startswith("val_")]
    return named[0] if named else node.name


def excluded_nodes(groups: Mapping[str, list[str]], fp32_layers: Sequence[str]) -> list[str]:
    return [node for group in fp32_layers for node in groups.get(group, [])]


def quantize_dynamic_onnx(
    source: Path, target: Path, ops: list[str], *, exclude: Sequence[str] = (), external: bool = False
) -> None:
    """Dynamic int8 (weights int8, activations quantized per call) of ``ops``, except the nodes ``exclude``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_loggers("root"):  # ORT logs a generic "consider pre-processing" warning on every call
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=ops,
            nodes_to_exclude=list(exclude) or None,
            use_external_data_format=external,
        )


class TextCalibration:
    """An ONNX Runtime ``CalibrationDataReader`` over texts, tokenized like the predictors do.

    MinMax reduces each batch to its extremes, so batches of similar length (little padding in the ranges) work;
    the histogram methods (entropy, percentile) stack every batch's activations, so they get batches of one shape:
    ``CALIBRATION_BATCH`` rows (the last one filled up from the start) padded to the longest text.
    """

    def __init__(
        self, tokenizer: Any, names: Sequence[str], texts: Sequence[str], max_length: int, *, same_shape: bool
    ) -> None:
        lengths = {t: len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts}
        ordered = sorted(texts, key=lengths.__getitem__)
        if same_shape and len(ordered) % CALIBRATION_BATCH:
            ordered += ordered[: CALIBRATION_BATCH - len(ordered) % CALIBRATION_BATCH]
        self._batches = [ordered[i : i + CALIBRATION_BATCH] for i in range(0, len(ordered), CALIBRATION_BATCH)]
        self._padding: dict[str, Any] = (
            {"padding": "max_length", "max_length": max(lengths.values())}
            if same_shape
            else {"padding": True, "max_length": max_length}
        )
        self._tokenizer, self._names = tokenizer, list(names)
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._batches):
            return None
        batch = self._tokenizer(self._batches[self._index], truncation=True, return_tensors="np", **self._padding)
        self._index += 1
        return {name: np.asarray(batch[name], dtype=np.int64) for name in self._names}

    def rewind(self) -> None:
        self._index = 0

    def __len__(self) -> int:
        return len(self._batches)


def quantize_static_onnx(
    source: Path,
    target: Path,
    ops: list[str],
    *,
    calibration: Callable[[], Any],
    method: str,
    cache: Path,
    exclude: Sequence[str] = (),
    external: bool = False,
) -> None:
    """QDQ static int8 of ``ops`` (per-channel int8 weights, uint8 activations, ranges calibrated on the data
    ``calibration()`` reads; computed once and kept in ``cache`` for later calls), except the nodes ``exclude``."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    reader = calibration() if not cache.is_file() else None
    if reader is not None and not isinstance(reader, CalibrationDataReader):
        reader = _as_reader(reader)
    # Activations in uint8, weights in symmetric int8: the combination ONNX Runtime's x86 kernels run fastest
    # (VNNI or not); reduce_range stays off, per-channel weights keep small output channels precise.
    with _quiet_loggers("root"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude) or None,
            use_external_data_format=external,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            calibration_cache_path=str(cache),
            extra_options={"MatMulConstBOnly": True},
        )


def _as_reader(data: Any) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._data = data

        def get_next(self) -> Any:
            return self._data.get_next()

    return _Reader()


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n if n != "root" else None) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def opset_of(path: Path) -> int:
    import onnx

    return next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import if not o.domain), 0)


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
