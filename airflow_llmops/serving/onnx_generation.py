"""Serving ``onnx_dynamic_int8`` (and fp32 ONNX) causal-LM artifacts: the KV-cache graph of
:mod:`airflow_llmops.ml.quantization.causal`, run by ONNX Runtime, decoded by the same continuous-batching loop as
a torch model.

Design: :class:`~airflow_llmops.ml.quantization.causal.OnnxCausalLM` puts the graph behind the torch-model
interface the :class:`~airflow_llmops.serving.generation.DecodeEngine` drives (``forward`` with an attention mask,
position ids and a transformers ``DynamicCache`` holding the graph's ``present`` tensors), so
:class:`OnnxServedCausalLM` is :class:`~airflow_llmops.serving.models.HFCausalLM` on that facade. Everything a
request gets is therefore the torch path's own code: prompt encoding and the context check, per-request
``max_tokens`` / ``temperature`` / ``top_p`` / ``seed`` (:func:`airflow_llmops.ml.predict.pick_token` on the logits
as torch tensors), stop strings with the held-back stream tail, the shared stop token ids (EOS and chat role
markers), streaming through ``on_text``, cancellation, and the observer's metrics. Batching is *continuous*: one
decode thread per model; requests that arrive while others decode are prefilled (left-padded) and their caches
merged into the running batch, finished ones cut out, exactly as for torch. A batch-1 greedy generation feeds the
graph the same tensors as :meth:`OnnxCausalPredictor.generate_ids`, so it returns the same tokens.
"""

from __future__ import annotations

from typing import Any

from airflow_llmops.serving.models import HFCausalLM


class OnnxServedCausalLM(HFCausalLM):
    """A quantized causal-LM artifact whose method is ONNX (see the module docstring)."""

    def __init__(self, predictor: Any) -> None:
        """``predictor``: an :class:`~airflow_llmops.ml.quantization.causal.OnnxCausalPredictor` (its ``model``
        is the graph's torch-style facade, its tokenizer the artifact's)."""
        self.predictor = predictor
        self.method = str(predictor.method)
        super().__init__(None, loaded=(predictor.model, predictor.tokenizer))
