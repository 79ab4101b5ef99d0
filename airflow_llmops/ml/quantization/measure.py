"""Measure predictors on the same texts: size on disk, latency per batch size, throughput and quality.

Latency is measured interleaved (repeat r of every predictor, then repeat r+1) so a slow spell of a shared machine
hits every method alike, and end to end (tokenize + forward), which is what a caller of ``predict`` waits for.

A causal LM is also timed the way its endpoint uses it: greedy decoding of :data:`DECODE_TOKENS` new tokens at
batch 1 with the KV cache (``decode_tokens_s``), and that is its speed in the gate (:attr:`Measurement.speed`):
a forward pass over whole texts (the prompt's prefill) says little about how fast a model generates — ONNX Runtime
runs a decode step as one graph call, while an eager torch step spends most of its time in Python.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from airflow_llmops.ml.evaluation import classification_metrics
from airflow_llmops.ml.quantization.errors import QuantizationInputError
from airflow_llmops.ml.quantization.predictors import Predictor

QUALITY_BATCH = 32
WARMUP = 2
DECODE_TOKENS = 16  # new tokens per timed generation (a causal LM's speed)
DECODE_PROMPTS = 4  # timed generations per predictor, interleaved
DECODE_PROMPT_TOKENS = 24  # each prompt: the first tokens of an evaluation text


@dataclass
class Measurement:
    """One model's numbers. ``quality_drop``, ``size_ratio`` and ``speedup`` are relative to fp32 and are set by
    :func:`~airflow_llmops.ml.quantization.compare` (``None`` when measured alone).

    :ivar latency_ms: batch size → ``{"p50": ms, "p95": ms}``.
    :ivar throughput_rows_s: rows per second at the largest batch size (batch / median latency).
    :ivar quality: ``accuracy`` and ``macro_f1`` (0-1) for a classifier, ``perplexity`` for a causal LM.
    :ivar quality_drop: points lost against fp32: accuracy points for a classifier, percent perplexity increase
        for a causal LM; positive is worse.
    :ivar error: why the method produced no numbers (e.g. unavailable on this machine); other fields are empty.
    :ivar fp32_layers: layer groups the artifact keeps in full precision (``None``: not a layer-wise method).
    :ivar search: the accuracy-aware search's record (``summary``, ``layer_costs``, ``trials``...), if it ran.
    :ivar confirm_split: / :ivar confirm_quality: / :ivar confirm_drop: the same quality on a second split the
        method was not chosen or tuned on (the test split), set by ``compare``.
    """

    method: str
    size_bytes: int = 0
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    throughput_rows_s: float = 0.0
    throughput_batch: int = 0
    quality: dict[str, float] = field(default_factory=dict)
    rows: int = 0
    threads: int = 0
    quality_drop: float | None = None
    size_ratio: float | None = None
    speedup: float | None = None
    artifact: str | None = None
    error: str | None = None
    fp32_layers: list[str] | None = None
    search: dict[str, Any] | None = None
    confirm_split: str | None = None
    confirm_quality: dict[str, float] | None = None
    confirm_drop: float | None = None
    decode_tokens_s: float | None = None

    @property
    def speed(self) -> float:
        """What the gate ranks methods by: greedy decode tokens/s for a causal LM, rows/s for a classifier."""
        return self.decode_tokens_s if self.decode_tokens_s is not None else self.throughput_rows_s

    @property
    def speed_unit(self) -> str:
        return "tokens/s (greedy decode, batch 1)" if self.decode_tokens_s is not None else "rows/s"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def quality_metric(self) -> str:
        return "perplexity" if "perplexity" in self.quality else "accuracy"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency_ms"] = {str(b): v for b, v in self.latency_ms.items()}  # JSON keys are strings
        return data


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch intra-op threads (default: the cores this process may run on) and return it.

    ONNX predictors take the same number for ONNX Runtime, so every method gets the same cores.
    """
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads < 1:
        raise QuantizationInputError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def drop_points(baseline: dict[str, float], quality: dict[str, float]) -> float:
    """Points lost against fp32 (positive is worse): accuracy points, or percent perplexity increase."""
    if "perplexity" in baseline:
        return (quality["perplexity"] / baseline["perplexity"] - 1) * 100
    return (baseline["accuracy"] - quality["accuracy"]) * 100


def check_labels(predictor: Predictor, labels: Sequence[str]) -> None:
    unknown = sorted(set(labels) - set(predictor.labels))
    if unknown:
        raise QuantizationInputError(
            f"the evaluation set has labels the model {predictor.path} does not know: {unknown[:10]} (model labels: "
            f"{predictor.labels[:20]}); evaluate on a split of the dataset the model was trained on"
        )


def quality(predictor: Predictor, texts: Sequence[str], labels: Sequence[str] | None) -> dict[str, float]:
    if predictor.task == "causal_lm":
        return {"perplexity": predictor.perplexity(texts, batch_size=QUALITY_BATCH)}
    if labels is None or len(labels) != len(texts):
        raise QuantizationInputError(
            f"a classifier needs one label per text: got {len(texts)} texts and "
            f"{'no' if labels is None else len(labels)} labels"
        )
    check_labels(predictor, labels)
    predictions: list[str] = []
    for start in range(0, len(texts), QUALITY_BATCH):
        predictions.extend(predictor.predict(texts[start : start + QUALITY_BATCH]))
    return classification_metrics(list(labels), predictions)


def _batches(texts: Sequence[str], size: int, count: int) -> list[list[str]]:
    """``count`` batches of ``size`` texts taken in turn from ``texts`` (wrapping around), the same for everyone."""
    return [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(count)]


def measure_many(
    predictors: Sequence[Predictor],
    texts: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 20,
) -> list[Measurement]:
    """Quality of each predictor on all ``texts``, then interleaved latency at each batch size.

    :param labels: gold labels (classification); ignored for a causal LM, whose quality is perplexity.
    :param repeats: timed batches per batch size and predictor (after 2 untimed warm-up batches).
    """
    if not texts:
        raise QuantizationInputError("no texts to measure on: the evaluation split is empty")
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise QuantizationInputError(f"need repeats >= 1 and positive batch sizes, got {repeats} and {batch_sizes}")
    results = [
        Measurement(
            method=p.method,
            size_bytes=p.size_bytes,
            quality=quality(p, texts, labels),
            rows=len(texts),
            threads=torch.get_num_threads(),
        )
        for p in predictors
    ]
    for size in sorted(set(batch_sizes)):
        timings: list[list[float]] = [[] for _ in predictors]
        batches = _batches(texts, size, repeats + WARMUP)
        for index, batch in enumerate(batches):
            # Rotate the order so that no method always runs right after the same neighbour.
            order = list(range(len(predictors)))
            shift = index % len(order)
            for k in order[shift:] + order[:shift]:
                started = time.perf_counter()
                predictors[k].logits(batch)
                if index >= WARMUP:
                    timings[k].append(time.perf_counter() - started)
        for result, times in zip(results, timings, strict=True):
            ms = np.asarray(times) * 1000
            result.latency_ms[size] = {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}
    largest = max(batch_sizes)
    for result in results:
        result.throughput_batch = largest
        result.throughput_rows_s = largest / (result.latency_ms[largest]["p50"] / 1000)
    if all(
        p.task == "causal_lm" and callable(getattr(getattr(p, "model", None), "generate", None)) for p in predictors
    ):
        for result, speed in zip(results, decode_speed(predictors, texts), strict=True):
            result.decode_tokens_s = speed
    return results


def decode_speed(predictors: Sequence[Predictor], texts: Sequence[str]) -> list[float]:
    """Greedy tokens/s of each causal LM at batch 1: exactly :data:`DECODE_TOKENS` new tokens (no stop token ends a
    generation early, so every method does the same work) after a prompt of the first
    :data:`DECODE_PROMPT_TOKENS` tokens of an evaluation text (both cut to fit a small position table);
    interleaved like the latencies, after one warm-up."""
    from airflow_llmops.ml.predict import positions

    tokenizer = predictors[0].tokenizer  # type: ignore[attr-defined]
    # Prompt and new tokens must fit the position table (the offline tiny GPT-2 has max_seq_length positions).
    table = positions(getattr(predictors[0].model, "config", None))  # type: ignore[attr-defined]
    new_tokens, prompt_tokens = DECODE_TOKENS, DECODE_PROMPT_TOKENS
    if table is not None:
        new_tokens = max(1, min(DECODE_TOKENS, table // 2))
        prompt_tokens = max(1, min(DECODE_PROMPT_TOKENS, table - new_tokens))
    prompts = []
    for text in list(texts)[:DECODE_PROMPTS]:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :prompt_tokens]
        prompts.append(ids if ids.shape[1] else torch.tensor([[tokenizer.eos_token_id or 0]]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spent = [0.0 for _ in predictors]
    for index, ids in enumerate([prompts[0], *prompts]):
        order = list(range(len(predictors)))
        shift = index % len(order)
        for k in order[shift:] + order[:shift]:
            model: Any = predictors[k].model  # type: ignore[attr-defined]
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=None,
                )
            if index > 0:  # the first round warms up
                spent[k] += time.perf_counter() - started
    return [new_tokens * len(prompts) / t if t > 0 else 0.0 for t in spent]


def measure(
    predictor: Predictor,
    texts: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 20,
) -> Measurement:
    """Size, latency (p50/p95 per batch size), throughput and quality of one predictor; see :func:`measure_many`."""
    return measure_many([predictor], texts, labels, batch_sizes=batch_sizes, repeats=repeats)[0]
