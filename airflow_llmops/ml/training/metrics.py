"""The small metrics dict of a finished job: what status.json, XCom and MLflow carry."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from transformers import EvalPrediction, TrainerState

from airflow_llmops.ml.training.callbacks import ProgressCallback
from airflow_llmops.ml.training.energy import EnergyReading


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 (each label counts the same, so a rare topic is not hidden by a common one)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(prediction.label_ids).reshape(-1)
    return {"accuracy": float((predicted == labels).mean()), "macro_f1": macro_f1(labels, predicted)}


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (scikit-learn's default set); a
    class never predicted correctly scores 0. Computed here to keep scikit-learn's import out of the job."""
    scores = []
    for cls in np.union1d(labels, predicted):
        tp = float(np.sum((predicted == cls) & (labels == cls)))
        fp = float(np.sum((predicted == cls) & (labels != cls)))
        fn = float(np.sum((predicted != cls) & (labels == cls)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy); ``None`` where it overflows (JSON has no infinity)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def _last_logged_loss(state: TrainerState) -> float | None:
    for entry in reversed(state.log_history):
        for key in ("loss", "train_loss"):
            if key in entry:
                return float(entry[key])
    return None


def _rounded(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits) if abs(value) >= 1e-3 else float(f"{value:.4g}")


def final_metrics(
    task: str,
    state: TrainerState,
    *,
    result: Any,
    evaluation: dict[str, float],
    energy: EnergyReading,
    progress: ProgressCallback,
) -> dict[str, float | None]:
    """Rates and energy cover this attempt (a resumed job measured only the steps it ran); ``train_tokens`` is
    every token the model has been trained on, across attempts."""
    steps_now = state.global_step - progress.start_step
    runtime = float(result.metrics.get("train_runtime", 0.0))
    tokens_now = progress.tokens_this_attempt(state)
    train_loss = float(result.training_loss) if steps_now > 0 else _last_logged_loss(state)
    metrics: dict[str, float | None] = {
        "train_loss": train_loss,
        "eval_loss": evaluation.get("eval_loss"),
        "train_tokens": int(state.num_input_tokens_seen),
        "train_runtime_s": runtime,
        "tokens_per_s": tokens_now / runtime if runtime > 0 else None,
        "energy_kwh": energy.energy_kwh,
        "emissions_kg": energy.emissions_kg,
        "energy_kwh_per_1k_tokens": (
            energy.energy_kwh / tokens_now * 1000 if energy.energy_kwh is not None and tokens_now > 0 else None
        ),
    }
    if task == "classification":
        metrics["eval_accuracy"] = evaluation.get("eval_accuracy")
        metrics["eval_macro_f1"] = evaluation.get("eval_macro_f1")
    else:
        metrics["eval_perplexity"] = perplexity(evaluation.get("eval_loss"))
    return {k: _rounded(v) for k, v in metrics.items()}
