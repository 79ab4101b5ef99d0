"""Accuracy-aware quantization: int8 everywhere unless that costs too much, then keep the costliest layers in fp32.

The approach of accuracy-driven tuning (Intel Neural Compressor's): quantize every eligible layer and measure the
quality drop against fp32 on the validation split; if it is over the tolerance, a sensitivity pass quantizes
everything but one layer group at a time (an encoder block, the embeddings, the head: few groups, so few trials)
and records what each group's int8 costs; then the costliest groups go back to fp32, one more at a time, until the
drop is within tolerance or the budget (trials, seconds) runs out. The result says which groups stayed in fp32,
what each cost and every trial's numbers. The drop it reports is measured on the rows it was tuned on: confirm it
on another split (``compare`` does, on ``QuantizationSpec.confirm_split``).

    artifact = search_quantization("job/model", "onnx_static_int8", "out/int8", texts, labels,
                                   max_quality_drop=1.0, calibration_texts=texts[:128])
    artifact.options["fp32_layers"]          # e.g. ["layer.5"]
    artifact.options["search"]["summary"]    # what it tried and why it stopped
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from airflow_llmops.ml.quantization.artifact import DEFAULT_MAX_LENGTH, QuantizedArtifact
from airflow_llmops.ml.quantization.errors import QuantizationInputError
from airflow_llmops.ml.quantization.measure import QUALITY_BATCH, check_labels, drop_points, set_threads
from airflow_llmops.ml.quantization.methods import (
    DEFAULT_CALIBRATION_METHOD,
    ONNX_METHODS,
    SEARCHABLE_METHODS,
    Quantizer,
    prepare,
)
from airflow_llmops.ml.quantization.predictors import OnnxPredictor, Predictor, TorchPredictor, load_fp32

Evaluate = Callable[[list[str]], "Score"]


@dataclass(frozen=True)
class Score:
    """One trial's quality against fp32 on the search rows.

    :ivar drop: points lost (accuracy points, or percent perplexity increase); positive is worse.
    :ivar divergence: mean KL divergence of the predicted distribution from fp32's (classifiers; for a causal LM
        the drop itself): separates trials whose accuracy is tied on a small split.
    """

    drop: float
    divergence: float
    quality: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Trial:
    """One quantize-and-measure step of the search (``step``: ``all-int8``, ``sensitivity`` or ``fallback``)."""

    step: str
    fp32_layers: list[str]
    drop: float
    divergence: float
    quality: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    """What the search chose and why.

    :ivar fp32_layers: the layer groups kept in fp32 in the chosen configuration (empty: int8 everywhere).
    :ivar drop: the chosen configuration's drop on the search rows (the validation split).
    :ivar met_tolerance: whether ``drop <= max_quality_drop``; when not, the chosen one is the best found.
    :ivar layer_costs: group → points its int8 costs (the all-int8 drop minus the drop with that group in fp32),
        for each group the sensitivity pass measured.
    :ivar stopped: why the search ended, in words.
    """

    fp32_layers: list[str]
    drop: float
    met_tolerance: bool
    max_quality_drop: float
    all_int8_drop: float
    layer_costs: dict[str, float]
    trials: list[Trial]
    stopped: str
    seconds: float
    groups: list[str]

    @property
    def summary(self) -> str:
        kept = ", ".join(f"{g} (costs {self.layer_costs.get(g, 0.0):+.2f})" for g in self.fp32_layers)
        head = f"int8 everywhere: drop {self.all_int8_drop:+.2f}"
        if not self.fp32_layers:
            return f"{head}; {self.stopped}; {len(self.trials)} trial(s), {self.seconds:.0f} s"
        return (
            f"{head}; kept in fp32: {kept} -> drop {self.drop:+.2f} "
            f"({'within' if self.met_tolerance else 'still over'} {self.max_quality_drop:g}); {self.stopped}; "
            f"{len(self.trials)} trials, {self.seconds:.0f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary}


def search_layers(
    groups: Sequence[str],
    evaluate: Evaluate,
    *,
    max_quality_drop: float,
    max_trials: int,
    max_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Choose the layer groups to keep in fp32 so that ``evaluate(fp32_layers).drop <= max_quality_drop``, keeping
    as few as the measurements allow.

    1. all groups int8; done if within tolerance.
    2. sensitivity: each group in fp32 alone; its cost is how much that lowers the drop. A single group that
       brings the drop within tolerance ends the search (the one with the smallest drop).
    3. fallback: the costliest groups in fp32 together, one more per trial, until within tolerance.

    The budget (``max_trials`` evaluations, ``max_seconds``) is checked before each trial; when it runs out, the
    best configuration measured so far is returned with ``met_tolerance=False``.
    """
    if max_trials < 1 or max_seconds <= 0:
        raise QuantizationInputError(
            f"the search needs max_trials >= 1 and max_seconds > 0, got {max_trials} and {max_seconds}"
        )
    search = _Search(
        list(dict.fromkeys(groups)),
        evaluate,
        tolerance=max_quality_drop,
        max_trials=max_trials,
        max_seconds=max_seconds,
        clock=clock,
    )
    return search.run()


class _Search:
    def __init__(
        self,
        groups: list[str],
        evaluate: Evaluate,
        *,
        tolerance: float,
        max_trials: int,
        max_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self.groups, self.evaluate, self.tolerance = groups, evaluate, tolerance
        self.max_trials, self.max_seconds, self.clock = max_trials, max_seconds, clock
        self.started = clock()
        self.trials: list[Trial] = []
        self.costs: dict[str, float] = {}
        self.gains: dict[str, float] = {}

    def run(self) -> SearchResult:
        base = self.trial([], "all-int8")
        if base.drop <= self.tolerance:
            return self.result(base, "int8 everywhere is within tolerance")
        if len(self.groups) < 2:
            return self.result(base, "only one layer group: keeping it in fp32 would undo the quantization")
        return self.sensitivity(base) or self.fallback()

    def sensitivity(self, base: Trial) -> SearchResult | None:
        """Each group in fp32 alone: its cost; a result when the budget ends or one group is enough."""
        for group in self.groups:
            if reason := self.out_of_budget():
                return self.result(self.best(), f"{reason} during the sensitivity pass")
            trial = self.trial([group], "sensitivity")
            self.costs[group] = round(base.drop - trial.drop, 4)
            self.gains[group] = base.divergence - trial.divergence
        passing = [t for t in self.trials if t.step == "sensitivity" and t.drop <= self.tolerance]
        if passing:
            chosen = min(passing, key=lambda t: (t.drop, t.divergence))
            return self.result(chosen, f"one layer in fp32 is enough: {chosen.fp32_layers[0]}")
        return None

    def fallback(self) -> SearchResult:
        """The costliest groups in fp32 together, one more per trial."""
        # A group whose fp32 copy lowers neither the drop nor the divergence cannot help.
        helpful = [g for g in self.groups if self.costs[g] > 0 or self.gains[g] > 0]
        ranked = sorted(helpful, key=lambda g: (self.costs[g], self.gains[g]), reverse=True)
        for count in range(2, min(len(ranked), len(self.groups) - 1) + 1):
            if reason := self.out_of_budget():
                return self.result(self.best(), reason)
            trial = self.trial(ranked[:count], "fallback")
            if trial.drop <= self.tolerance:
                return self.result(trial, f"the {count} costliest layers in fp32 are enough")
        return self.result(self.best(), "no choice of layers in fp32 met the tolerance; kept the best measured")

    def trial(self, layers: list[str], step: str) -> Trial:
        begun = self.clock()
        score = self.evaluate(list(layers))
        seconds = round(self.clock() - begun, 3)
        trial = Trial(step, list(layers), score.drop, score.divergence, dict(score.quality), seconds)
        self.trials.append(trial)
        return trial

    def out_of_budget(self) -> str | None:
        if len(self.trials) >= self.max_trials:
            return f"budget spent: max_trials={self.max_trials}"
        if self.clock() - self.started >= self.max_seconds:
            return f"budget spent: max_search_s={self.max_seconds:g}"
        return None

    def best(self) -> Trial:
        return min(self.trials, key=lambda t: (t.drop, t.divergence, len(t.fp32_layers)))

    def result(self, chosen: Trial, stopped: str) -> SearchResult:
        return SearchResult(
            fp32_layers=chosen.fp32_layers,
            drop=chosen.drop,
            met_tolerance=chosen.drop <= self.tolerance,
            max_quality_drop=self.tolerance,
            all_int8_drop=self.trials[0].drop,
            layer_costs=dict(self.costs),
            trials=list(self.trials),
            stopped=stopped,
            seconds=round(self.clock() - self.started, 3),
            groups=list(self.groups),
        )


def search_quantization(
    model_dir: str | Path,
    method: str,
    out_dir: str | Path,
    texts: Sequence[str],
    labels: Sequence[str] | None,
    *,
    max_quality_drop: float,
    max_trials: int = 16,
    max_seconds: float = 900.0,
    quantize_embeddings: bool = True,
    calibration_texts: Sequence[str] | None = None,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    max_length: int = DEFAULT_MAX_LENGTH,
    threads: int | None = None,
    baseline: Predictor | None = None,
) -> QuantizedArtifact:
    """Quantize ``model_dir`` with ``method``, keeping in fp32 the layer groups :func:`search_layers` finds must
    stay there for the drop on ``texts`` (the validation split) to be within ``max_quality_drop``; save the
    artifact in ``out_dir`` with the search in ``options["search"]`` and the groups in ``options["fp32_layers"]``.

    :param labels: gold labels of ``texts`` (classifier); ``None`` for a causal LM (quality is perplexity).
    :param baseline: the fp32 predictor, when the caller has it loaded already.
    :raises QuantizationInputError: bad input, or a method that cannot keep layers in fp32.
    """
    if method not in SEARCHABLE_METHODS:
        raise QuantizationInputError(
            f"the accuracy-aware search needs a method that can keep layers in fp32: {list(SEARCHABLE_METHODS)}; "
            f"{method!r} is not one"
        )
    if not texts:
        raise QuantizationInputError("the accuracy-aware search needs texts to measure on; got none")
    threads = threads or set_threads()
    fp32 = baseline or load_fp32(model_dir, max_length=max_length)
    if labels is not None:
        check_labels(fp32, labels)
    reference = _outputs(fp32, texts, labels)
    with prepare(
        model_dir,
        method,
        out_dir,
        quantize_embeddings=quantize_embeddings,
        calibration_texts=calibration_texts,
        calibration_method=calibration_method,
        max_length=max_length,
    ) as quantizer:
        last: dict[str, Any] = {}

        def evaluate(layers: list[str]) -> Score:
            applied = quantizer.apply(layers)
            last.update(layers=layers, applied=applied)
            outputs = _outputs(_trial_predictor(quantizer, applied, threads, max_length), texts, labels)
            return _score(reference, outputs)

        found = search_layers(
            list(quantizer.groups),
            evaluate,
            max_quality_drop=max_quality_drop,
            max_trials=max_trials,
            max_seconds=max_seconds,
        )
        reuse = last.get("applied") if last.get("layers") == found.fp32_layers else None
        search = {**found.to_dict(), "rows": len(texts), "split": "validation"}
        return quantizer.finish(found.fp32_layers, applied=reuse, extra={"search": search})


def _trial_predictor(quantizer: Quantizer, applied: Any, threads: int, max_length: int) -> Predictor:
    common: dict[str, Any] = {
        "method": quantizer.method,
        "task": quantizer.task,
        "path": quantizer.staging,
        "size_bytes": 0,
        "max_length": max_length,
    }
    if quantizer.method in ONNX_METHODS and quantizer.task == "causal_lm":
        from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor

        return OnnxCausalPredictor(threads=threads, options=quantizer.options, **common)
    if quantizer.method in ONNX_METHODS:
        return OnnxPredictor(threads=threads, input_names=list(quantizer.options["input_names"]), **common)
    return TorchPredictor(applied, **common)


@dataclass(frozen=True)
class _Outputs:
    quality: dict[str, float]
    probabilities: np.ndarray | None


def _outputs(predictor: Predictor, texts: Sequence[str], labels: Sequence[str] | None) -> _Outputs:
    from airflow_llmops.ml.evaluation import classification_metrics

    if predictor.task == "causal_lm":
        return _Outputs({"perplexity": predictor.perplexity(texts, batch_size=QUALITY_BATCH)}, None)
    if labels is None or len(labels) != len(texts):
        raise QuantizationInputError(
            f"a classifier needs one label per text: got {len(texts)} texts and "
            f"{'no' if labels is None else len(labels)} labels"
        )
    logits = np.concatenate(
        [predictor.logits(texts[i : i + QUALITY_BATCH]) for i in range(0, len(texts), QUALITY_BATCH)]
    ).astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    predictions = [predictor.labels[int(i)] for i in logits.argmax(axis=1)]
    return _Outputs(classification_metrics(list(labels), predictions), probabilities)


def _score(reference: _Outputs, outputs: _Outputs) -> Score:
    drop = drop_points(reference.quality, outputs.quality)
    if reference.probabilities is None or outputs.probabilities is None:
        return Score(drop=drop, divergence=drop, quality=outputs.quality)
    p, q = np.clip(reference.probabilities, 1e-12, 1), np.clip(outputs.probabilities, 1e-12, 1)
    divergence = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    return Score(drop=drop, divergence=divergence, quality=outputs.quality)
