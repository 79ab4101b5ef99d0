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
