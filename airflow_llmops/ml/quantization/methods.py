"""The quantization methods: which ones run on this machine, how each is applied, saved and rebuilt on load.

Torch methods save ``model.pt``, the quantized ``state_dict``, and are rebuilt on load by replaying the same
quantization on a model made from ``config.json`` and then loading that state. This avoids pickling whole modules
(``torch.save(model)`` ties the file to import paths and breaks across transformers releases) and lets
``torch.load(weights_only=True)`` read the file: quantized tensors and torchao's tensor subclasses are allow-listed.
The ONNX method saves ``model.onnx``, which needs no Python model code at all to load.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from airflow_llmops.ml.quantization.artifact import (
    METADATA_FILE,
    QuantizedArtifact,
    Task,
    detect_task,
    library_versions,
    local_path,
    model_folder,
    weights_size,
)
from airflow_llmops.ml.quantization.errors import QuantizationInputError, QuantizationUnavailable, UnsupportedTaskError
from airflow_llmops.specs.quantization import QuantMethod

ALL_METHODS: tuple[str, ...] = get_args(QuantMethod)
TORCH_METHODS = ("torch_dynamic_int8", "torchao_int8_dynamic", "torchao_int8_weight_only", "torchao_int4_weight_only")
TORCH_WEIGHTS = "model.pt"
ONNX_WEIGHTS = "model.onnx"
INT4_GROUP_SIZE = 128

# torchao logs a warning for each CUDA-only extension it cannot load on a CPU machine, whenever anything (also
# transformers) imports it; those are not errors here. A level the application set explicitly is kept.
if logging.getLogger("torchao").level == logging.NOTSET:
    logging.getLogger("torchao").setLevel(logging.ERROR)


def method_availability() -> dict[str, str | None]:
    """Every method → ``None`` where it runs on this machine, else the reason it does not."""
    engines = torch.backends.quantized.supported_engines
    torchao = _missing("torchao")
    onnx = _missing("onnx") or _missing("onnxruntime") or _missing("onnxscript")
    cuda = torch.cuda.is_available()
    int4: str | None = torchao
    if int4 is None and not cuda:
        int4 = "torchao's int4 weight-only kernels need a CUDA GPU (tinygemm in bf16, or mslk); this machine has none"
    return {
        "torch_dynamic_int8": None
        if any(e in engines for e in ("x86", "fbgemm", "qnnpack", "onednn"))
        else f"torch has no quantized CPU engine (supported_engines={engines})",
        "torchao_int8_dynamic": torchao,
        "torchao_int8_weight_only": torchao,
        "torchao_int4_weight_only": int4,
        "onnx_dynamic_int8": onnx,
    }


def available_methods() -> list[str]:
    """The quantization methods that run on this machine's hardware and installed libraries."""
    return [method for method, reason in method_availability().items() if reason is None]


def check_method(method: str) -> None:
    """Raise :class:`QuantizationInputError` for an unknown method, :class:`QuantizationUnavailable` for one
    this machine cannot run."""
    if method not in ALL_METHODS:
        raise QuantizationInputError(f"unknown quantization method {method!r}; choose one of {list(ALL_METHODS)}")
    reason = method_availability()[method]
    if reason is not None:
        raise QuantizationUnavailable(method, reason, available_methods())


def _missing(module: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"the Python package {module!r} is not installed (extra `local`)"
    return None


def quantize_model(
    model_dir: str | Path, method: str, out_dir: str | Path, *, quantize_embeddings: bool = True
) -> QuantizedArtifact:
    """Quantize the saved model in ``model_dir`` with ``method`` and save a loadable artifact in ``out_dir``.

    ``out_dir`` is replaced when it holds an earlier artifact (a retry), and refused when it holds anything else.
    ``quantize_embeddings`` also stores the embedding tables in int8 (weight-only): for small encoders such as
    MiniLM the word-embedding table is about half of the weights.

    :raises QuantizationInputError: the model folder or ``out_dir`` is unusable, or the method is unknown.
    :raises QuantizationUnavailable: the method cannot run on this machine (e.g. int4 without CUDA).
    :raises UnsupportedTaskError: the method does not support the model's task (ONNX export of a causal LM).
    """
    source = model_folder(model_dir)
    check_method(method)
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    task = detect_task(config)
    if method == "onnx_dynamic_int8" and task != "classification":
        raise UnsupportedTaskError(
            f"method {method!r} supports classification models only, not {task}; use one of "
            f"{[m for m in available_methods() if m != method]} for a causal LM"
        )
    target = local_path(out_dir)
    _check_target(target, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target and moved in at the end: a failed or killed run leaves no half-written artifact.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        started = time.perf_counter()
        model = load_model(source, task)
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        options: dict[str, Any] = {"quantize_embeddings": quantize_embeddings}
        if method == "onnx_dynamic_int8":
            from airflow_llmops.ml.quantization.onnx import export_and_quantize

            options.update(export_and_quantize(model, tokenizer, staging / ONNX_WEIGHTS, quantize_embeddings))
            weights = sorted(p.name for p in staging.iterdir() if p.name.startswith(ONNX_WEIGHTS))
            extra: tuple[str, ...] = ("onnx", "onnxruntime", "onnxscript")
        else:
            model = apply_torch_method(model, method, quantize_embeddings=quantize_embeddings)
            torch.save(model.state_dict(), staging / TORCH_WEIGHTS)
            weights, extra = [TORCH_WEIGHTS], (("torchao",) if method.startswith("torchao") else ())
        elapsed = time.perf_counter() - started
        config.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        artifact = QuantizedArtifact(
            path=str(target),
            method=method,
            task=task,
            source_model=str(source.resolve()),
            size_bytes=weights_size(staging, weights),
            weights=weights,
            quantize_s=round(elapsed, 3),
            libraries=library_versions(*extra),
            options=options,
        )
        artifact.write(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return artifact


def _check_target(target: Path, source: Path) -> None:
    if target.resolve() == source.resolve():
        raise QuantizationInputError(f"out_dir {target} is the model folder itself; give a new folder")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / METADATA_FILE).exists())):
        raise QuantizationInputError(
            f"out_dir {target} exists and is not an earlier quantization artifact; give an empty or new folder"
        )


def auto_class(task: Task) -> Any:
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_model(folder: Path, task: Task) -> torch.nn.Module:
    """The full-precision model in eval mode."""
    model: torch.nn.Module = auto_class(task).from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    return model.eval()


def apply_torch_method(model: torch.nn.Module, method: str, *, quantize_embeddings: bool) -> torch.nn.Module:
    """Quantize ``model`` in place (torchao) or into a copy (torch.ao) and return the quantized model."""
    if method == "torch_dynamic_int8":
        return _torch_dynamic_int8(model, quantize_embeddings)
    if method in ("torchao_int8_dynamic", "torchao_int8_weight_only", "torchao_int4_weight_only"):
        return _torchao(model, method, quantize_embeddings)
    raise QuantizationInputError(f"method {method!r} is not a torch method; torch methods: {list(TORCH_METHODS)}")


@contextmanager
def _quiet() -> Iterator[None]:
    # torch.ao.quantization warns on import and on every quantized tensor it creates that it is deprecated in
    # favour of torchao; it still gives the fastest int8 CPU inference here, so the warning is only noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|TypedStorage).*")
        yield


def _torch_dynamic_int8(model: torch.nn.Module, embeddings: bool) -> torch.nn.Module:
    with _quiet():
        from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, quantize_dynamic

        spec: dict[type[torch.nn.Module], Any] = {torch.nn.Linear: default_dynamic_qconfig}
        if embeddings:
            spec[torch.nn.Embedding] = float_qparams_weight_only_qconfig
        quantized: torch.nn.Module = quantize_dynamic(model, spec, dtype=torch.qint8)  # type: ignore[no-untyped-call]
    return quantized


def import_torchao() -> Any:
    """``torchao.quantization`` (imported on first use: it is slow to import)."""
    import torchao.quantization

    return torchao.quantization


def _torchao(model: torch.nn.Module, method: str, embeddings: bool) -> torch.nn.Module:
    ao = import_torchao()
    if method == "torchao_int4_weight_only":
        # Only tinygemm's bf16 CUDA layout needs no extra package; the method is offered only where CUDA exists.
        # An explicit index: tensors on "cuda" and storages on "cuda:0" refuse to meet in load_state_dict.
        model = model.to(device=torch.device("cuda", torch.cuda.current_device()), dtype=torch.bfloat16)
        config = ao.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    elif method == "torchao_int8_dynamic":
        config = ao.Int8DynamicActivationInt8WeightConfig()
    else:
        config = ao.Int8WeightOnlyConfig()
    ao.quantize_(model, config)
    if embeddings:
        is_embedding: Callable[[torch.nn.Module, str], bool] = lambda module, _: isinstance(  # noqa: E731
            module, torch.nn.Embedding
        )
        ao.quantize_(model, ao.IntxWeightOnlyConfig(weight_dtype=torch.int8), filter_fn=is_embedding)
    return model


def load_torch_artifact(artifact: QuantizedArtifact) -> torch.nn.Module:
    """Rebuild a torch-method artifact: model from config, the same quantization replayed, then the saved state."""
    path = Path(artifact.path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = auto_class(artifact.task).from_config(config, dtype=torch.float32).eval()
    embeddings = bool(artifact.options.get("quantize_embeddings", True))
    model = apply_torch_method(model, artifact.method, quantize_embeddings=embeddings)
    int4 = artifact.method == "torchao_int4_weight_only"
    device = torch.device("cuda", torch.cuda.current_device()) if int4 else torch.device("cpu")
    with _quiet():
        state = torch.load(path / TORCH_WEIGHTS, map_location=device, weights_only=True)
        # assign=True: torchao's weights are tensor subclasses that must replace the parameters, not be copied.
        model.load_state_dict(state, strict=True, assign=artifact.method.startswith("torchao"))
    return model.eval()
