"""The MLflow pyfunc wrapper of our models: ``mlflow.pyfunc.load_model("models:/name@champion").predict(texts)``.

The registered artifact is the model folder itself (Hugging Face files, or a quantized artifact with its
``quantization.json``), so the same files serve through MLflow, the local model server and the cloud images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

MODEL_ARTIFACT = "model_dir"


class TextModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined,misc]
    """Classifier: texts → labels. Causal LM: prompts → greedy continuations (``max_new_tokens`` in params)."""

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts[MODEL_ARTIFACT])
        self._folder = folder
        if (folder / "quantization.json").is_file():
            from airflow_llmops.ml.quantization import load_quantized

            self._predictor: Any = load_quantized(folder)
            self._kind = "quantized"
            return
        from transformers import AutoConfig, AutoTokenizer

        from airflow_llmops.ml.predict import is_causal_lm

        config = AutoConfig.from_pretrained(str(folder))
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if is_causal_lm(config):
            from transformers import AutoModelForCausalLM

            model: Any = AutoModelForCausalLM.from_pretrained(str(folder))
            self._model = model.eval()
            self._kind = "causal_lm"
        else:
            from transformers import AutoModelForSequenceClassification

            self._model = AutoModelForSequenceClassification.from_pretrained(str(folder))  # type: ignore[no-redef]
            self._model.eval()
            self._kind = "classification"

    # ``model_input`` has no type hint on purpose: MLflow reads the hint for schema validation and warns on one that
    # is not ``list[...]``, while this model takes a string, a list of strings or a DataFrame.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:  # type: ignore[no-untyped-def]
        """Labels, or greedy continuations (``max_new_tokens`` in ``params``, default 32) that end at the model's
        stop tokens (:func:`airflow_llmops.ml.predict.stop_token_ids`), as the model server's do."""
        from airflow_llmops.ml import predict as P

        texts = _texts(model_input)
        new_tokens = int((params or {}).get("max_new_tokens", 32))
        if self._kind == "quantized":
            if self._predictor.task == "causal_lm":  # a torch int8 module, or the ONNX graph behind its model API
                return P.generate(self._predictor.model, self._predictor.tokenizer, texts, max_new_tokens=new_tokens)
            return [str(label) for label in self._predictor.predict(texts)]
        if self._kind == "classification":
            return [r.label for r in P.classify(self._model, self._tokenizer, texts, max_length=128)]
        return P.generate(self._model, self._tokenizer, texts, max_new_tokens=new_tokens)


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a DataFrame: the "text" column, else the first one
        column = "text" if "text" in columns else columns[0]
        return [str(t) for t in model_input[column]]
    return [str(t) for t in model_input]
