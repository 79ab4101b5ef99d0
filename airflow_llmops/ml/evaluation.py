"""Task metrics on a prepared split: a fine-tuned classifier, and the TF-IDF + logistic-regression baseline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd


def load_split(dataset_dir: str | Path, split: str) -> pd.DataFrame:
    path = Path(str(dataset_dir).removeprefix("file://")) / f"{split}.parquet"
    return pd.read_parquet(io.BytesIO(path.read_bytes()))


def classification_metrics(y_true: list[str], y_pred: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def tfidf_logreg_baseline(dataset_dir: str | Path, *, split: str = "test", seed: int = 0) -> dict[str, Any]:
    """Word and character n-gram TF-IDF with logistic regression, fitted on train, scored on ``split``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, split)
    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
    )
    model = make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0, random_state=seed))
    model.fit(train["text"], train["label"])
    predictions = [str(p) for p in model.predict(test["text"])]
    return {**classification_metrics(list(test["label"]), predictions), "rows": len(test)}


def evaluate_classifier(
    model_dir: str | Path, dataset_dir: str | Path, *, split: str = "test", batch_size: int = 64, max_length: int = 128
) -> dict[str, Any]:
    """Accuracy and macro-F1 of a saved sequence classifier on ``split`` (labels from the model's config)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    frame = load_split(dataset_dir, split)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    unknown = sorted(set(frame["label"]) - set(id2label.values()))
    if unknown:
        raise ValueError(f"split {split!r} has labels the model does not know: {unknown[:10]}")
    predictions: list[str] = []
    texts = list(frame["text"])
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            logits = model(**batch).logits
            predictions.extend(id2label[int(i)] for i in logits.argmax(dim=-1))
    return {**classification_metrics(list(frame["label"]), predictions), "rows": len(frame)}


class EvaluationInputError(ValueError):
    """The model and the evaluation data do not fit together (labels, columns, an empty split)."""


def model_task(model_dir: str | Path) -> str:
    """``classification`` or ``causal_lm``, from the saved config's architecture."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    names = config.architectures or []
    return "causal_lm" if any(n.endswith("ForCausalLM") or "LMHead" in n for n in names) else "classification"


def evaluate_model(
    model_dir: str | Path,
    dataset_dir: str | Path,
    *,
    split: str = "test",
    max_rows: int | None = None,
    max_length: int = 128,
    generation_samples: int = 5,
) -> dict[str, Any]:
    """Task metrics of a saved model on a prepared split, with the details an evaluation report shows.

    Classification: accuracy, macro-F1, per-label F1 and the confusion counts. Causal LM: perplexity over the
    split's dialog turns, plus greedy continuations of a few held-out prompts (the generation check: non-empty,
    not a copy of the prompt).
    """
    frame = load_split(dataset_dir, split)
    if max_rows is not None:
        frame = frame.head(max_rows)
    if frame.empty:
        raise EvaluationInputError(f"split {split!r} of {dataset_dir} has no rows to evaluate on")
    if (Path(model_dir) / "quantization.json").is_file():
        return _quantized_details(model_dir, frame, split, max_length)
    task = model_task(model_dir)
    if task == "classification":
        return {"task": task, **_classification_details(model_dir, frame, split, max_length)}
    return {"task": task, **_causal_lm_details(model_dir, frame, max_length, generation_samples)}


def _quantized_details(model_dir: str | Path, frame: pd.DataFrame, split: str, max_length: int) -> dict[str, Any]:
    """A quantized artifact, through its own predictor (torch int8, torchao, ONNX Runtime)."""
    from airflow_llmops.ml.quantization import load_quantized

    predictor = load_quantized(model_dir, max_length=max_length)
    if predictor.task == "causal_lm":
        from airflow_llmops.ml.training.data import lm_texts

        texts = lm_texts(frame, str(predictor.tokenizer.eos_token or ""))
        return {"task": "causal_lm", "metrics": {"perplexity": predictor.perplexity(texts), "rows": float(len(texts))}}
    truth = _checked_labels(frame, split, list(predictor.labels))
    predicted = [str(p) for p in predictor.predict([str(t) for t in frame["text"]])]
    return {"task": "classification", **_label_report(truth, predicted)}


def _checked_labels(frame: pd.DataFrame, split: str, known: list[str]) -> list[str]:
    if "label" not in frame.columns:
        raise EvaluationInputError(f"split {split!r} has no 'label' column; columns: {list(frame.columns)}")
    truth = [str(v) for v in frame["label"]]
    unknown = sorted(set(truth) - set(known))
    if unknown:
        raise EvaluationInputError(
            f"split {split!r} has labels the model does not know: {unknown[:10]} (model labels: "
            f"{sorted(known)[:20]}); evaluate on data prepared for this model"
        )
    return truth


def _label_report(truth: list[str], predicted: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score

    labels = sorted(set(truth) | set(predicted))
    per_label = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
    return {
        "metrics": {**classification_metrics(truth, predicted), "rows": float(len(truth))},
        "per_label_f1": {label: float(score) for label, score in zip(labels, per_label, strict=True)},
        "labels": labels,
        "confusion": confusion_matrix(truth, predicted, labels=labels).tolist(),
    }


def _classification_details(model_dir: str | Path, frame: pd.DataFrame, split: str, max_length: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    truth = _checked_labels(frame, split, list(id2label.values()))
    predicted: list[str] = []
    texts = [str(t) for t in frame["text"]]
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = tokenizer(
                texts[start : start + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            predicted.extend(id2label[int(i)] for i in model(**batch).logits.argmax(dim=-1))
    return _label_report(truth, predicted)


def _causal_lm_details(model_dir: str | Path, frame: pd.DataFrame, max_length: int, samples: int) -> dict[str, Any]:
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    eos = tokenizer.eos_token or ""
    if {"prompt", "response"} <= set(frame.columns):
        texts = [f"{p}{eos}{r}{eos}" for p, r in zip(frame["prompt"], frame["response"], strict=True)]
        prompts = [str(p) for p in frame["prompt"]]
    elif "text" in frame.columns:
        texts = [f"{t}{eos}" for t in frame["text"]]
        prompts = [str(t) for t in frame["text"]]
    else:
        raise EvaluationInputError(f"causal LM evaluation needs prompt/response or text; got {list(frame.columns)}")
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total_loss += float(loss) * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
        generations = []
        for prompt in prompts[:samples]:
            batch = tokenizer(prompt + eos, return_tensors="pt")
            out = model.generate(
                **batch,
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            reply = str(tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)).strip()
            generations.append({"prompt": prompt, "reply": reply, "ok": bool(reply) and reply != prompt.strip()})
    if total_tokens == 0:
        raise EvaluationInputError("no evaluation text is longer than one token")
    mean = total_loss / total_tokens
    ok = sum(1 for g in generations if g["ok"]) / max(1, len(generations))
    return {
        "metrics": {
            "perplexity": math.exp(min(mean, 700.0)),
            "loss": mean,
            "generation_ok_rate": ok,
            "rows": float(len(texts)),
        },
        "generations": generations,
    }
