"""Task metrics on a prepared split: a fine-tuned classifier, the TF-IDF + logistic-regression baseline, and causal
LMs and chat models (perplexity labelled as training labels it, greedy answers scored against references; see
docs/evaluation.md)."""

from __future__ import annotations

import io
from collections.abc import Sequence
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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from airflow_llmops.ml import predict as P

    frame = load_split(dataset_dir, split)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    unknown = sorted(set(frame["label"]) - set(P.class_labels(model.config)))
    if unknown:
        raise ValueError(f"split {split!r} has labels the model does not know: {unknown[:10]}")
    results = P.classify(
        model, tokenizer, [str(t) for t in frame["text"]], max_length=max_length, batch_size=batch_size
    )
    predictions = [r.label for r in results]
    return {**classification_metrics(list(frame["label"]), predictions), "rows": len(frame)}


class EvaluationInputError(ValueError):
    """The model and the evaluation data do not fit together (labels, columns, an empty split)."""


def model_task(model_dir: str | Path, dataset_columns: Sequence[str] | None = None) -> str:
    """``classification``, ``causal_lm`` or ``chat``.

    The saved config's architecture tells a classifier from a causal LM; a causal LM is scored as a ``chat`` model
    when the evaluation data holds conversations (a ``messages`` column, as ``DatasetSpec(task="chat")`` prepares
    it). The data decides rather than the tokenizer: a chat-tuned model scored on prompt/response rows is scored as
    a causal LM on those rows, and a causal LM without a chat template is scored on conversations with the default
    template that chat training would have given it.
    """
    from transformers import AutoConfig

    from airflow_llmops.ml.predict import is_causal_lm

    if not is_causal_lm(AutoConfig.from_pretrained(str(model_dir))):
        return "classification"
    return "chat" if dataset_columns is not None and "messages" in dataset_columns else "causal_lm"


def evaluate_model(
    model_dir: str | Path,
    dataset_dir: str | Path,
    *,
    split: str = "test",
    max_rows: int | None = None,
    max_length: int = 128,
    generation_rows: int = 64,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Task metrics of a saved model on a prepared split, with the details an evaluation report shows.

    Classification: accuracy, macro-F1, per-label F1 and the confusion counts. Causal LM and chat: perplexity over
    the split (on the assistant's tokens for chat, labelled as training labels them), and greedy answers to the
    first ``generation_rows`` held-out prompts scored against their references with ROUGE-L, BLEU and chrF (see
    :mod:`airflow_llmops.ml.generation_metrics`); the answers are in ``samples``.
    """
    frame = load_split(dataset_dir, split)
    if max_rows is not None:
        frame = frame.head(max_rows)
    if frame.empty:
        raise EvaluationInputError(f"split {split!r} of {dataset_dir} has no rows to evaluate on")
    generation = {"generation_rows": generation_rows, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    if (Path(model_dir) / "quantization.json").is_file():
        return _quantized_details(model_dir, frame, split, max_length, generation)
    task = model_task(model_dir, list(frame.columns))
    if task == "classification":
        return {"task": task, **_classification_details(model_dir, frame, split, max_length)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return {"task": task, **causal_lm_details(model.eval(), tokenizer, frame, task, max_length, **generation)}


def _quantized_details(
    model_dir: str | Path, frame: pd.DataFrame, split: str, max_length: int, generation: dict[str, int]
) -> dict[str, Any]:
    """A quantized artifact, through its own predictor (torch int8, torchao, ONNX Runtime)."""
    from airflow_llmops.ml.quantization import load_quantized

    predictor = load_quantized(model_dir, max_length=max_length)
    if predictor.task == "causal_lm":
        task = "chat" if "messages" in frame.columns else "causal_lm"
        model = getattr(predictor, "model", None)
        # torch and torchao artifacts, and ONNX ones through their torch-style facade (OnnxCausalLM): the full LM
        # check, labelled, prompted and stopped as for the full-precision model.
        if model is not None and hasattr(model, "generate"):
            return {
                "task": task,
                **causal_lm_details(model, predictor.tokenizer, frame, task, max_length, **generation),
            }
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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from airflow_llmops.ml import predict as P

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    truth = _checked_labels(frame, split, P.class_labels(model.config))
    results = P.classify(model, tokenizer, [str(t) for t in frame["text"]], max_length=max_length, batch_size=64)
    return _label_report(truth, [r.label for r in results])


def _lm_inputs(
    tokenizer: Any, frame: pd.DataFrame, task: str, max_length: int
) -> tuple[list[dict[str, list[int]]], list[str], list[str] | None, list[str]]:
    """Perplexity examples (labelled as training labels them), generation prompts, their references (None for
    plain text rows) and notes."""
    from airflow_llmops.ml.training import data as D
    from airflow_llmops.ml.training.errors import TrainingInputError

    notes: list[str] = []
    try:
        if task == "chat":
            if D.ensure_chat_template(tokenizer):
                notes.append("the tokenizer has no chat template; conversations rendered with the default one")
            dataset, stats = D.tokenize_chat(tokenizer, frame, max_length)
            notes.extend(stats.notes("evaluation", max_length))
            chats = D.conversations(frame)
            prompts = [
                str(tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True)) for c in chats
            ]
            return dataset.examples, prompts, [c[-1]["content"] for c in chats], notes
        eos = str(tokenizer.eos_token or "")
        texts = D.lm_texts(frame, eos)
        examples = D.tokenize(tokenizer, texts, max_length).examples
    except TrainingInputError as err:
        raise EvaluationInputError(str(err)) from None
    except Exception as err:  # jinja2's TemplateError from apply_chat_template
        if task != "chat":
            raise
        raise EvaluationInputError(
            f"the model's chat template cannot render a prompt ({type(err).__name__}: {err})"
        ) from None
    if {"prompt", "response"} <= set(frame.columns):
        # As training joins them: prompt<eos>response<eos>; the answer follows the prompt's EOS.
        return examples, [f"{p}{eos}" for p in frame["prompt"].astype(str)], list(frame["response"].astype(str)), notes
    return examples, [f"{t}{eos}" for t in frame["text"].astype(str)], None, notes


def _perplexity(model: Any, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL over the labelled tokens (assistant tokens for chat, every real token otherwise) and
    their count."""
    import torch

    from airflow_llmops.ml.predict import nll_sum
    from airflow_llmops.ml.training.data import PadCollator

    collate = PadCollator(pad_id, causal_lm=True)
    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        nll, n = nll_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + nll, count + n
    return total, count


def _bare(prompt: str, tokenizer: Any) -> str:
    """The prompt as an answer that copies it would read (decoded without the EOS that ends it)."""
    return prompt.removesuffix(str(tokenizer.eos_token or "")).strip()


def causal_lm_details(
    model: Any,
    tokenizer: Any,
    frame: pd.DataFrame,
    task: str,
    max_length: int,
    *,
    generation_rows: int = 64,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Perplexity and the generation check of a loaded causal LM (``task``: ``causal_lm`` or ``chat``).

    Prompts: for chat the conversation up to its last assistant turn rendered with the model's chat template
    (``add_generation_prompt=True``), the reference being that last turn; for prompt/response rows the prompt and
    its EOS, the reference the response; plain text rows get answers but no reference metrics.
    """
    from airflow_llmops.ml import generation_metrics as G
    from airflow_llmops.ml import predict as P

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    positions = P.positions(getattr(model, "config", None))
    if positions is not None:
        max_length = min(max_length, positions)
    examples, prompts, references, notes = _lm_inputs(tokenizer, frame, task, max_length)
    total, count = _perplexity(model, examples, int(tokenizer.pad_token_id or 0), batch_size)
    if count == 0:
        raise EvaluationInputError(
            "no evaluation token to score: every text is shorter than two tokens"
            + (" or has no assistant token left" if task == "chat" else "")
        )
    new_tokens = max(1, min(max_new_tokens, positions // 2)) if positions is not None else max(1, max_new_tokens)
    prompt_budget = max(1, min(max_length, positions - new_tokens) if positions is not None else max_length)
    chosen = prompts[: max(0, generation_rows)]
    answers = [  # stripped: the scores compare words, not the space a tokenizer puts before the first one
        a.strip()
        for a in P.generate(
            model,
            tokenizer,
            chosen,
            add_special_tokens=task != "chat",  # a chat template writes the special tokens it wants
            max_new_tokens=new_tokens,
            max_prompt_tokens=prompt_budget,
            batch_size=batch_size,
        )
    ]
    wanted = (references or [""] * len(prompts))[: len(chosen)]
    samples = [{"prompt": p, "reference": r, "answer": a} for p, r, a in zip(chosen, wanted, answers, strict=True)]
    mean = total / count
    metrics: dict[str, float] = {
        "perplexity": P.perplexity(mean),
        "loss": mean,
        "rows": float(len(examples)),
        "scored_tokens": float(count),
        "generated": float(len(samples)),
        "generation_ok_rate": sum(1 for s in samples if s["answer"] and s["answer"] != _bare(s["prompt"], tokenizer))
        / max(1, len(samples)),
    }
    if references is not None and samples:
        metrics.update(G.reference_metrics(wanted, answers))
    return {
        "metrics": metrics,
        "samples": samples,
        "generation": {
            "max_new_tokens": new_tokens,
            "max_prompt_tokens": prompt_budget,
            "greedy": True,
            "stop_token_ids": sorted(P.stop_token_ids(tokenizer, model)),
        },
        "notes": notes,
    }
