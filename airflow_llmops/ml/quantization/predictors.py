"""Predictors: a saved model (full precision or quantized) behind one interface that takes raw texts.

Every predictor tokenizes the same way (the model's tokenizer, padding to the longest text of the batch,
truncation at ``max_length``), so latencies compare the models, not the preprocessing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from airflow_llmops.ml import predict as P
from airflow_llmops.ml.quantization.artifact import (
    DEFAULT_MAX_LENGTH,
    METADATA_FILE,
    QuantizedArtifact,
    Task,
    detect_task,
    local_path,
    model_folder,
    weights_size,
)
from airflow_llmops.ml.quantization.errors import QuantizationInputError, UnsupportedTaskError
from airflow_llmops.ml.quantization.methods import ONNX_METHODS, check_method, load_model, load_torch_artifact

FP32 = "fp32"


class Predictor(ABC):
    """A loaded model that serves raw texts.

    :ivar method: ``fp32`` or the quantization method.
    :ivar task: ``classification`` or ``causal_lm``.
    :ivar path: the folder it was loaded from.
    :ivar size_bytes: bytes of its weight files on disk.
    :ivar labels: class names in logit order (classification; empty for a causal LM).
    """

    def __init__(self, *, method: str, task: Task, path: Path, size_bytes: int, max_length: int) -> None:
        self.method = method
        self.task = task
        self.path = path
        self.size_bytes = size_bytes
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Positions past the model's table fail inside the forward pass (tiny-gpt2 has max_seq_length positions).
        self.max_length = P.input_limit(config, self.tokenizer, max_length)
        self.labels: list[str] = P.class_labels(config) if task == "classification" else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, path={str(self.path)!r})"

    def encode(self, texts: Sequence[str], return_tensors: str = "pt") -> Any:
        if isinstance(texts, str):
            raise QuantizationInputError("texts must be a list of strings, not one string")
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors=return_tensors
        )

    @abstractmethod
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Raw model outputs for one batch: ``(batch, labels)`` for a classifier, ``(batch, seq, vocab)`` for an LM."""

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Predicted label names, one per text (classification only)."""
        if self.task != "classification":
            raise UnsupportedTaskError(f"predict() returns labels of a classifier; this model is a {self.task}")
        if not texts:
            return []
        return [r.label for r in self.classify(texts)]

    def classify(self, texts: Sequence[str]) -> list[P.LabelScores]:
        """Label, probability and every label's probability per text (classification only; softmax of
        :meth:`logits`)."""
        if self.task != "classification":
            raise UnsupportedTaskError(f"classify() needs a classifier; this model is a {self.task}")
        if not texts:
            return []
        return P.label_scores(self.logits(texts), self.labels)

    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> float:
        """Token-level perplexity of ``texts`` (causal LMs whose predictor has a ``model`` with the transformers
        causal-LM interface: torch, or an ONNX graph behind it), by the predictor layer's
        :func:`airflow_llmops.ml.predict.text_nll` (``inf`` where it overflows)."""
        model = getattr(self, "model", None)
        if model is None:
            raise UnsupportedTaskError(f"perplexity is measured for torch causal LMs, not {type(self).__name__}")
        if self.task != "causal_lm":
            raise UnsupportedTaskError(f"perplexity is measured for causal LMs; this model is a {self.task}")
        total_nll, total_tokens = P.text_nll(
            model, self.tokenizer, texts, max_length=self.max_length, batch_size=batch_size
        )
        if total_tokens == 0:
            raise QuantizationInputError("perplexity needs texts of at least 2 tokens; every text was shorter")
        return P.perplexity(total_nll / total_tokens)


class TorchPredictor(Predictor):
    """Full-precision or torch/torchao-quantized model, run with torch on CPU (CUDA for int4)."""

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model.eval()
        self.device = next(model.parameters(), torch.empty(0)).device
        if self.device.type == "meta":
            self.device = torch.device("cpu")

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        batch = self.encode(texts).to(self.device)
        with torch.inference_mode():
            result: np.ndarray = self.model(**batch).logits.float().cpu().numpy()
        return result


class OnnxPredictor(Predictor):
    """An int8 ONNX classifier (dynamic or static QDQ) run by ONNX Runtime on CPU with ``threads`` intra-op
    threads."""

    def __init__(self, *, threads: int, input_names: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from airflow_llmops.ml.quantization.onnx import session

        self.threads = threads
        self.input_names = input_names
        self.session = session(self.path / "model.onnx", threads)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        batch = self.encode(texts, return_tensors="np")
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self.input_names}
        result: np.ndarray = self.session.run(["logits"], feed)[0]
        return result


def load_fp32(model_dir: str | Path, *, max_length: int = DEFAULT_MAX_LENGTH) -> Predictor:
    """The full-precision baseline: a saved Hugging Face model folder, run with torch in fp32."""
    path = model_folder(model_dir)
    task = detect_task(AutoConfig.from_pretrained(str(path), local_files_only=True))
    return TorchPredictor(
        load_model(path, task), method=FP32, task=task, path=path, size_bytes=weights_size(path), max_length=max_length
    )


def load_quantized(
    out_dir: str | Path, *, max_length: int = DEFAULT_MAX_LENGTH, threads: int | None = None
) -> Predictor:
    """Load an artifact written by :func:`quantize_model` (in this or any later process).

    :param threads: ONNX Runtime intra-op threads; default: ``torch.get_num_threads()``, so that both runtimes
        use the same number of cores.
    :raises QuantizationInputError: the folder is not an artifact.
    :raises QuantizationUnavailable: the artifact's method cannot run here (an int4 artifact on a CPU machine).
    """
    artifact = QuantizedArtifact.read(out_dir)
    check_method(artifact.method)
    common: dict[str, Any] = {
        "method": artifact.method,
        "task": artifact.task,
        "path": Path(artifact.path),
        "size_bytes": artifact.size_bytes,
        "max_length": max_length,
    }
    # --- ONNX causal LMs (KV-cache graph, airflow_llmops.ml.quantization.causal) ---
    if artifact.method in ONNX_METHODS and artifact.task == "causal_lm":
        from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor

        return OnnxCausalPredictor(threads=threads or torch.get_num_threads(), options=artifact.options, **common)
    # --- end ONNX causal LMs ---
    if artifact.method in ONNX_METHODS:
        names = list(artifact.options.get("input_names", ["input_ids", "attention_mask"]))
        return OnnxPredictor(threads=threads or torch.get_num_threads(), input_names=names, **common)
    return TorchPredictor(load_torch_artifact(artifact), **common)


def load_predictor(folder: str | Path, **kwargs: Any) -> Predictor:
    """A quantized artifact (it has ``quantization.json``) or else a full-precision model folder."""
    if (local_path(folder) / METADATA_FILE).is_file():
        return load_quantized(folder, **kwargs)
    kwargs.pop("threads", None)
    return load_fp32(folder, **kwargs)
