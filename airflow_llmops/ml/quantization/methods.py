"""The quantization methods: which ones run on this machine, how each is applied, saved and rebuilt on load.

Torch methods save ``model.pt``, the quantized ``state_dict``, and are rebuilt on load by replaying the same
quantization on a model made from ``config.json`` and then loading that state. This avoids pickling whole modules
(``torch.save(model)`` ties the file to import paths and breaks across transformers releases) and lets
``torch.load(weights_only=True)`` read the file: quantized tensors and torchao's tensor subclasses are allow-listed.
The ONNX methods save ``model.onnx``, which needs no Python model code at all to load (for a causal LM a graph
with the KV cache as inputs and outputs, see :mod:`.causal`). A GPT-2's ``Conv1D`` projections become
``nn.Linear`` before any method (``options.conv1d_to_linear``, replayed on load), so that int8 reaches them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from airflow_llmops.ml.quantization.artifact import (
    DEFAULT_MAX_LENGTH,
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
from airflow_llmops.ml.quantization.layers import group_order, layer_group
from airflow_llmops.specs.quantization import QuantMethod

ALL_METHODS: tuple[str, ...] = get_args(QuantMethod)
TORCH_METHODS = ("torch_dynamic_int8", "torchao_int8_dynamic", "torchao_int8_weight_only", "torchao_int4_weight_only")
TORCH_WEIGHTS = "model.pt"
ONNX_WEIGHTS = "model.onnx"
ONNX_METHODS = ("onnx_dynamic_int8", "onnx_static_int8")
# Methods that can keep chosen layers in fp32, so the accuracy-aware search applies to them.
SEARCHABLE_METHODS = ("torch_dynamic_int8", "onnx_dynamic_int8", "onnx_static_int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "percentile"
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
        "onnx_static_int8": onnx,
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
    model_dir: str | Path,
    method: str,
    out_dir: str | Path,
    *,
    quantize_embeddings: bool = True,
    fp32_layers: Sequence[str] = (),
    calibration_texts: Sequence[str] | None = None,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> QuantizedArtifact:
    """Quantize the saved model in ``model_dir`` with ``method`` and save a loadable artifact in ``out_dir``.

    ``out_dir`` is replaced when it holds an earlier artifact (a retry), and refused when it holds anything else.
    ``quantize_embeddings`` also stores the embedding tables in int8 (weight-only): for small encoders such as
    MiniLM the word-embedding table is about half of the weights. ``fp32_layers`` keeps those layer groups
    (``embeddings``, ``layer.N``, ``head``; see :attr:`Quantizer.groups`) in full precision
    (``torch_dynamic_int8`` and the ONNX methods). ``onnx_static_int8`` calibrates its activation ranges on
    ``calibration_texts`` (truncated at ``max_length`` tokens, as the predictors do) with ``calibration_method``
    (``minmax``, ``entropy`` or ``percentile``).

    :raises QuantizationInputError: the model folder or ``out_dir`` is unusable, the method is unknown, a layer
        group does not exist, or static int8 got no calibration texts.
    :raises QuantizationUnavailable: the method cannot run on this machine (e.g. int4 without CUDA).
    :raises UnsupportedTaskError: the method does not support the model (static ONNX int8 of a causal LM, ONNX
        export of a causal LM other than GPT-2).
    """
    with prepare(
        model_dir,
        method,
        out_dir,
        quantize_embeddings=quantize_embeddings,
        calibration_texts=calibration_texts,
        calibration_method=calibration_method,
        max_length=max_length,
    ) as quantizer:
        return quantizer.finish(fp32_layers)


@contextmanager
def prepare(
    model_dir: str | Path,
    method: str,
    out_dir: str | Path,
    *,
    quantize_embeddings: bool = True,
    calibration_texts: Sequence[str] | None = None,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Iterator[Quantizer]:
    """A :class:`Quantizer` for ``model_dir`` and ``method`` whose artifact goes to ``out_dir``.

    The artifact is built in a staging folder next to ``out_dir`` and moved in by :meth:`Quantizer.finish`; leaving
    the block without it (or with an error) leaves no half-written artifact and ``out_dir`` untouched.
    """
    source = model_folder(model_dir)
    check_method(method)
    if calibration_method not in CALIBRATION_METHODS:
        raise QuantizationInputError(
            f"unknown calibration_method {calibration_method!r}; choose one of {sorted(CALIBRATION_METHODS)}"
        )
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    task = detect_task(config)
    if method == "onnx_static_int8" and task != "classification":
        raise UnsupportedTaskError(
            f"method {method!r} supports classification models only, not {task} (its calibration has no KV cache "
            f"inputs); use onnx_dynamic_int8 or torch_dynamic_int8 for a causal LM"
        )
    if method in ONNX_METHODS and task == "causal_lm":
        from airflow_llmops.ml.quantization.causal import check_architecture

        check_architecture(config)
    if method == "onnx_static_int8" and not calibration_texts:
        raise QuantizationInputError(
            "method 'onnx_static_int8' calibrates activation ranges on sample texts: pass calibration_texts (compare() "
            "takes the first calibration_rows rows of the validation split)"
        )
    target = local_path(out_dir)
    _check_target(target, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target and moved in at the end: a failed or killed run leaves no half-written artifact.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.work-", dir=target.parent))
    try:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        config.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        quantizer = Quantizer(
            method=method,
            task=task,
            source=source,
            target=target,
            staging=staging,
            work=work,
            model=load_model(source, task),
            config=config,
            tokenizer=tokenizer,
            quantize_embeddings=quantize_embeddings,
            calibration_texts=list(calibration_texts or []),
            calibration_method=calibration_method,
            max_length=max_length,
            started=started,
        )
        yield quantizer
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)  # gone already when finish() moved it in


class Quantizer:
    """One model prepared for one method (the fp32 model loaded, exported to ONNX where the method needs it), so
    that :meth:`apply` can quantize it several times with different layers kept in fp32 (the accuracy-aware
    search) before :meth:`finish` saves the artifact. Made by :func:`prepare`.

    :ivar groups: layer group → what it holds (module names for torch, node names for ONNX), in model order.
    """

    def __init__(
        self,
        *,
        method: str,
        task: Task,
        source: Path,
        target: Path,
        staging: Path,
        work: Path,
        model: torch.nn.Module,
        config: Any,
        tokenizer: Any,
        quantize_embeddings: bool,
        calibration_texts: list[str],
        calibration_method: str,
        max_length: int,
        started: float,
    ) -> None:
        self.method, self.task, self.source, self.target = method, task, source, target
        self.staging, self.work, self.model, self.tokenizer = staging, work, model, tokenizer
        self.quantize_embeddings = quantize_embeddings
        self.calibration_texts, self.calibration_method = calibration_texts, calibration_method
        self.max_length = max_length
        self.options: dict[str, Any] = {"quantize_embeddings": quantize_embeddings}
        self._started = started
        self.groups: dict[str, list[str]]
        if task == "causal_lm":
            # GPT-2's projections are transformers' Conv1D, which neither torch.ao nor torchao quantize (and which
            # export as Gemm, which ONNX Runtime's dynamic int8 skips): the same numbers as nn.Linear first.
            from airflow_llmops.ml.quantization.causal import conv1d_to_linear

            converted = conv1d_to_linear(model)
            if converted:
                self.options["conv1d_to_linear"] = converted
        if method in ONNX_METHODS:
            from airflow_llmops.ml.quantization import onnx as ox

            exported = work / "model.fp32.onnx"
            if task == "causal_lm":
                from airflow_llmops.ml.quantization.causal import export_causal_onnx

                self.options.update(export_causal_onnx(model, exported))
            else:
                self.options.update(ox.export_fp32(model, tokenizer, exported))
            self._ops = ["MatMul", "Gemm", *(["Gather"] if quantize_embeddings else [])]
            self.options["quantized_ops"] = self._ops
            if method == "onnx_static_int8":
                self._onnx_source = work / "model.optimized.onnx"
                self.options["transformer_optimizer"] = ox.optimize_encoder(exported, self._onnx_source, config)
                self.options.update(calibration_method=calibration_method, calibration_rows=len(calibration_texts))
            else:
                self._onnx_source = exported
            static = method == "onnx_static_int8"
            self.groups = ox.node_groups(self._onnx_source, self._ops, weights_only=static)
        elif method == "torch_dynamic_int8":
            self.groups = torch_groups(model, embeddings=quantize_embeddings)
        else:
            self.groups = {}

    @property
    def searchable(self) -> bool:
        """Whether :meth:`apply` can keep layers in fp32 (torch dynamic int8 and the ONNX methods)."""
        return self.method in SEARCHABLE_METHODS and bool(self.groups)

    def _check_layers(self, fp32_layers: Sequence[str]) -> list[str]:
        layers = list(dict.fromkeys(fp32_layers))
        if layers and not self.searchable:
            raise QuantizationInputError(
                f"method {self.method!r} cannot keep layers in fp32; methods that can: {list(SEARCHABLE_METHODS)}"
            )
        unknown = [g for g in layers if g not in self.groups]
        if unknown:
            raise QuantizationInputError(
                f"fp32_layers {unknown} are not layer groups of this model; its groups: {list(self.groups)}"
            )
        if layers and len(layers) == len(self.groups):
            raise QuantizationInputError(
                f"fp32_layers keeps every layer group in fp32 ({layers}): nothing would be quantized"
            )
        return layers

    def apply(self, fp32_layers: Sequence[str] = ()) -> Any:
        """Quantize with ``fp32_layers`` kept in full precision: the quantized torch module, or the path of the
        quantized ONNX model (``model.onnx`` in the staging folder, replaced on each call)."""
        layers = self._check_layers(fp32_layers)
        if self.method in ONNX_METHODS:
            from airflow_llmops.ml.quantization import onnx as ox

            target = self.staging / ONNX_WEIGHTS
            exclude = ox.excluded_nodes(self.groups, layers)
            external = bool(self.options.get("external_data"))
            if self.method == "onnx_static_int8":
                ox.quantize_static_onnx(
                    self._onnx_source,
                    target,
                    self._ops,
                    calibration=lambda: ox.TextCalibration(
                        self.tokenizer,
                        self.options["input_names"],
                        self.calibration_texts,
                        self.max_length,
                        same_shape=self.calibration_method != "minmax",
                    ),
                    method=self.calibration_method,
                    cache=self.work / "calibration.json",
                    exclude=exclude,
                    external=external,
                )
            else:
                ox.quantize_dynamic_onnx(self._onnx_source, target, self._ops, exclude=exclude, external=external)
            return target
        modules = [m for g in layers for m in self.groups.get(g, [])]
        return apply_torch_method(
            self.model, self.method, quantize_embeddings=self.quantize_embeddings, fp32_modules=modules
        )

    def finish(
        self, fp32_layers: Sequence[str] = (), applied: Any = None, extra: dict[str, Any] | None = None
    ) -> QuantizedArtifact:
        """Save the artifact (``applied``: the result of :meth:`apply` with the same ``fp32_layers``, else it is
        quantized now) with ``extra`` options, and move it to the target folder."""
        layers = self._check_layers(fp32_layers)
        if applied is None:
            applied = self.apply(layers)
        options = {**self.options, "fp32_layers": layers, **(extra or {})}
        if self.method in ONNX_METHODS:
            from airflow_llmops.ml.quantization.onnx import opset_of

            options["opset"] = opset_of(self.staging / ONNX_WEIGHTS)
            weights = sorted(p.name for p in self.staging.iterdir() if p.name.startswith(ONNX_WEIGHTS))
            libraries: tuple[str, ...] = ("onnx", "onnxruntime", "onnxscript")
        else:
            if layers:
                options["fp32_modules"] = [m for g in layers for m in self.groups[g]]
            torch.save(applied.state_dict(), self.staging / TORCH_WEIGHTS)
            weights, libraries = [TORCH_WEIGHTS], (("torchao",) if self.method.startswith("torchao") else ())
        artifact = QuantizedArtifact(
            path=str(self.target),
            method=self.method,
            task=self.task,
            source_model=str(self.source.resolve()),
            size_bytes=weights_size(self.staging, weights),
            weights=weights,
            quantize_s=round(time.perf_counter() - self._started, 3),
            libraries=library_versions(*libraries),
            options=options,
        )
        artifact.write(self.staging)
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.staging, self.target)
        return artifact


def torch_groups(model: torch.nn.Module, *, embeddings: bool) -> dict[str, list[str]]:
    """Layer group → names of the modules ``torch_dynamic_int8`` quantizes (Linear; Embedding with
    ``embeddings``), in model order."""
    kinds: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear,)
    if embeddings:
        kinds += (torch.nn.Embedding,)
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            group = "embeddings" if isinstance(module, torch.nn.Embedding) else layer_group(name)
            groups.setdefault(group, []).append(name)
    return {group: groups[group] for group in group_order(list(groups))}


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


def apply_torch_method(
    model: torch.nn.Module, method: str, *, quantize_embeddings: bool, fp32_modules: Sequence[str] = ()
) -> torch.nn.Module:
    """Quantize ``model`` in place (torchao) or into a copy (torch.ao) and return the quantized model;
    ``fp32_modules`` (names, torch dynamic int8 only) stay in full precision."""
    if method == "torch_dynamic_int8":
        return _torch_dynamic_int8(model, quantize_embeddings, fp32_modules)
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


def _torch_dynamic_int8(model: torch.nn.Module, embeddings: bool, fp32_modules: Sequence[str]) -> torch.nn.Module:
    with _quiet():
        from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, quantize_dynamic

        spec: dict[Any, Any] = {torch.nn.Linear: default_dynamic_qconfig}
        if embeddings:
            spec[torch.nn.Embedding] = float_qparams_weight_only_qconfig
        if fp32_modules:
            # By name instead of by type: every Linear (and Embedding) except the ones kept in fp32.
            keep, linear, table = set(fp32_modules), default_dynamic_qconfig, float_qparams_weight_only_qconfig
            spec = {
                name: linear if isinstance(module, torch.nn.Linear) else table
                for name, module in model.named_modules()
                if name not in keep
                and (isinstance(module, torch.nn.Linear) or (embeddings and isinstance(module, torch.nn.Embedding)))
            }
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
    if artifact.options.get("conv1d_to_linear"):  # replayed as quantize_model did it (GPT-2's Conv1D -> Linear)
        from airflow_llmops.ml.quantization.causal import conv1d_to_linear

        conv1d_to_linear(model)
    embeddings = bool(artifact.options.get("quantize_embeddings", True))
    fp32_modules = [str(m) for m in artifact.options.get("fp32_modules", [])]
    model = apply_torch_method(model, artifact.method, quantize_embeddings=embeddings, fp32_modules=fp32_modules)
    int4 = artifact.method == "torchao_int4_weight_only"
    device = torch.device("cuda", torch.cuda.current_device()) if int4 else torch.device("cpu")
    with _quiet():
        state = torch.load(path / TORCH_WEIGHTS, map_location=device, weights_only=True)
        # assign=True: torchao's weights are tensor subclasses that must replace the parameters, not be copied.
        model.load_state_dict(state, strict=True, assign=artifact.method.startswith("torchao"))
    return model.eval()
