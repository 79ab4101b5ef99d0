"""Compare full precision with every method of a :class:`QuantizationSpec` on the validation split, and gate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from airflow_llmops.ml.evaluation import load_split
from airflow_llmops.ml.quantization.artifact import (
    DEFAULT_MAX_LENGTH,
    QuantizedArtifact,
    Task,
    local_path,
    model_folder,
)
from airflow_llmops.ml.quantization.errors import QuantizationInputError, QuantizationUnavailable, UnsupportedTaskError
from airflow_llmops.ml.quantization.measure import (
    Measurement,
    check_labels,
    drop_points,
    measure_many,
    quality,
    set_threads,
)
from airflow_llmops.ml.quantization.methods import SEARCHABLE_METHODS, quantize_model
from airflow_llmops.ml.quantization.predictors import FP32, Predictor, load_fp32, load_quantized
from airflow_llmops.ml.quantization.search import search_quantization
from airflow_llmops.specs.quantization import QuantizationSpec

REPORT_FILE = "comparison.json"


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on the measured rows.

    :ivar passed: ``all_must_pass``: every method within tolerance; ``fastest_within_tolerance``: at least one.
    :ivar chosen: the method to ship: the fastest method within tolerance (``Measurement.speed``: rows/s, or a
        causal LM's greedy decode tokens/s; ``None`` if none).
    :ivar drops: method → quality drop in points (``None`` where the method produced no numbers).
    :ivar message: the verdict with the numbers and the threshold, for logs and XCom.
    """

    passed: bool
    chosen: str | None
    rule: str
    max_quality_drop: float
    metric: str
    drops: dict[str, float | None]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ComparisonReport:
    """fp32 and every method, measured on the same rows, and the gate's decision (also in ``comparison.json``)."""

    rows: list[Measurement]
    decision: GateDecision
    split: str
    eval_rows: int
    threads: int
    out_root: str
    confirm_split: str | None = None

    def row(self, method: str) -> Measurement:
        return next(r for r in self.rows if r.method == method)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "eval_rows": self.eval_rows,
            "threads": self.threads,
            "out_root": self.out_root,
            "confirm_split": self.confirm_split,
            "decision": self.decision.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }


def eval_texts(
    dataset_dir: str | Path,
    split: str,
    max_rows: int,
    *,
    task: Task = "classification",
    eos: str = "",
    tokenizer: Any = None,
) -> tuple[list[str], list[str] | None]:
    """The first ``max_rows`` rows of a prepared split: texts and labels for a classifier; for a causal LM the
    texts it was trained on (``prompt<eos>response<eos>`` for dialogs; for conversations, a ``messages`` column as
    ``DatasetSpec(task="chat")`` prepares it, each well-formed one rendered by ``tokenizer``'s chat template, or
    the default template chat training gives a model without one) and no labels."""
    path = local_path(dataset_dir) / f"{split}.parquet"
    if not path.is_file():
        raise QuantizationInputError(
            f"dataset {dataset_dir} has no {split} split ({path} is missing); give a prepared dataset folder with "
            f"{split}.parquet"
        )
    frame = load_split(dataset_dir, split).head(max_rows)
    if frame.empty:
        raise QuantizationInputError(f"{path} has no rows; measure on a split with rows")
    if task == "causal_lm":
        from airflow_llmops.ml.training.data import lm_texts
        from airflow_llmops.ml.training.errors import TrainingInputError

        try:
            if "messages" in frame.columns and not {"prompt", "response", "text"} & set(frame.columns):
                return chat_texts(frame, tokenizer), None
            return lm_texts(frame, eos), None
        except TrainingInputError as err:
            raise QuantizationInputError(f"{path}: {err}") from None
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise QuantizationInputError(
            f"{path} lacks column(s) {missing} that scoring a classifier needs; it has {list(frame.columns)}"
        )
    return [str(t) for t in frame["text"]], [str(v) for v in frame["label"]]


def chat_texts(frame: Any, tokenizer: Any) -> list[str]:
    """The well-formed conversations of ``frame`` rendered as chat training renders them: by the model's saved chat
    template, or the default one chat training gives a model without one (``render_chat``'s format)."""
    from airflow_llmops.ml.data.chat import CHAT_TEMPLATE, render_chat
    from airflow_llmops.ml.training.data import conversations
    from airflow_llmops.ml.training.errors import TrainingInputError

    chats = conversations(frame)
    if not chats:
        raise TrainingInputError("it has no well-formed conversation to measure")
    if tokenizer is None:
        return [render_chat(messages) for messages in chats]
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    return [str(tokenizer.apply_chat_template(m, chat_template=template, tokenize=False)) for m in chats]


def compare(
    model_dir: str | Path,
    dataset_dir: str | Path,
    spec: QuantizationSpec,
    out_root: str | Path,
    *,
    split: str = "validation",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> ComparisonReport:
    """Quantize ``model_dir`` with every method in ``spec`` (artifacts in ``out_root/<method>``), measure fp32 and
    each artifact on ``split`` (first ``spec.max_eval_rows`` rows), and apply the gate ``spec.choose``.

    ``onnx_static_int8`` calibrates on the first ``spec.calibration_rows`` rows of ``split``. With
    ``spec.accuracy_aware`` each method that can keep layers in fp32 runs the search (:mod:`.search`) on ``split``
    first. Every method is then also scored on ``spec.confirm_split`` (when the dataset has it): a method tuned and
    chosen on ``split`` is not reported on it alone.

    A method this machine cannot run is a row with ``error`` (it fails ``all_must_pass``); bad input raises.
    ``comparison.json`` with the report is written to ``out_root``.

    :raises QuantizationInputError: missing model or split, or labels the model does not know.
    """
    source = model_folder(model_dir)
    threads = set_threads(spec.threads)
    baseline = load_fp32(source, max_length=max_length)
    eos = str(baseline.tokenizer.eos_token or "")
    texts, labels = eval_texts(
        dataset_dir, split, spec.max_eval_rows, task=baseline.task, eos=eos, tokenizer=baseline.tokenizer
    )
    if labels is not None:
        check_labels(baseline, labels)
    calibration: list[str] | None = None
    if "onnx_static_int8" in spec.methods and baseline.task == "classification":
        calibration = eval_texts(dataset_dir, split, spec.calibration_rows)[0]
    root = local_path(out_root)
    predictors: list[Predictor] = [baseline]
    failed: dict[str, str] = {}
    artifacts: dict[str, QuantizedArtifact] = {}
    for method in spec.methods:
        common: dict[str, Any] = {
            "quantize_embeddings": spec.quantize_embeddings,
            "calibration_texts": calibration,
            "calibration_method": spec.calibration_method,
            "max_length": max_length,
        }
        try:
            if spec.accuracy_aware and method in SEARCHABLE_METHODS:
                artifact = search_quantization(
                    source,
                    method,
                    root / method,
                    texts,
                    labels,
                    max_quality_drop=spec.max_quality_drop,
                    max_trials=spec.max_trials,
                    max_seconds=spec.max_search_s,
                    threads=threads,
                    baseline=baseline,
                    **common,
                )
            else:
                artifact = quantize_model(source, method, root / method, **common)
        except (QuantizationUnavailable, UnsupportedTaskError) as err:
            failed[method] = str(err)
            continue
        artifacts[method] = artifact
        predictors.append(load_quantized(artifact.path, max_length=max_length, threads=threads))
    measured = measure_many(predictors, texts, labels, batch_sizes=spec.batch_sizes, repeats=spec.latency_repeats)
    by_method = {m.method: m for m in measured}
    rows = [by_method[FP32]]
    for method in spec.methods:
        row = by_method.get(method) or Measurement(method=method, error=failed[method])
        if method in artifacts:
            _describe_artifact(row, artifacts[method], searched=spec.accuracy_aware)
        rows.append(row)
    relative_to_baseline(rows)
    confirm_split = spec.confirm_split if spec.confirm_split and spec.confirm_split != split else None
    if confirm_split and not (local_path(dataset_dir) / f"{confirm_split}.parquet").is_file():
        confirm_split = None  # a dataset without that split: nothing to confirm on (the report says so)
    if confirm_split:
        confirm(predictors, rows, dataset_dir, confirm_split, spec.max_eval_rows, eos=eos, tokenizer=baseline.tokenizer)
    report = ComparisonReport(
        rows=rows,
        decision=decide(rows, spec),
        split=split,
        eval_rows=len(texts),
        threads=threads,
        out_root=str(root),
        confirm_split=confirm_split,
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def _describe_artifact(row: Measurement, artifact: QuantizedArtifact, *, searched: bool) -> None:
    row.artifact = artifact.path
    if artifact.method in SEARCHABLE_METHODS:
        row.fp32_layers = list(artifact.options.get("fp32_layers", []))
    search = artifact.options.get("search")
    if isinstance(search, dict):
        row.search = {
            k: search[k] for k in ("summary", "met_tolerance", "drop", "layer_costs", "stopped") if k in search
        }
        row.search["trials"] = len(search.get("trials", []))
    elif searched:
        row.search = {"summary": f"{artifact.method} cannot keep layers in fp32: measured as quantized"}


def confirm(
    predictors: Sequence[Predictor],
    rows: Sequence[Measurement],
    dataset_dir: str | Path,
    split: str,
    max_rows: int,
    *,
    eos: str = "",
    tokenizer: Any = None,
) -> None:
    """Score every measured row's model on ``split`` too (quality only) and set ``confirm_*`` against fp32."""
    by_method = {p.method: p for p in predictors}
    baseline = next(r for r in rows if r.method == FP32)
    texts, labels = eval_texts(dataset_dir, split, max_rows, task=by_method[FP32].task, eos=eos, tokenizer=tokenizer)
    for row in rows:
        if row.ok and row.method in by_method:
            row.confirm_split = split
            row.confirm_quality = quality(by_method[row.method], texts, labels)
    for row in rows:
        if row.confirm_quality is not None and baseline.confirm_quality is not None:
            row.confirm_drop = drop_points(baseline.confirm_quality, row.confirm_quality)


def quality_drop(baseline: Measurement, row: Measurement) -> float:
    """Points lost against fp32 (positive is worse): accuracy points, or percent perplexity increase."""
    return drop_points(baseline.quality, row.quality)


def relative_to_baseline(rows: Sequence[Measurement]) -> None:
    """Set ``quality_drop``, ``size_ratio`` and ``speedup`` of every row against the ``fp32`` row."""
    baseline = next(r for r in rows if r.method == FP32)
    for row in rows:
        if not row.ok:
            continue
        row.quality_drop = quality_drop(baseline, row)
        row.size_ratio = row.size_bytes / baseline.size_bytes if baseline.size_bytes else None
        row.speedup = row.speed / baseline.speed if baseline.speed else None


def decide(rows: Sequence[Measurement], spec: QuantizationSpec) -> GateDecision:
    """Apply ``spec.choose`` with ``spec.max_quality_drop`` to rows whose ``quality_drop`` is set.

    ``all_must_pass``: passes only if every method ran and lost at most ``max_quality_drop`` points.
    ``fastest_within_tolerance``: picks the fastest method within tolerance (:attr:`Measurement.speed`); fails if
    there is none.
    Either way ``chosen`` is the fastest method within tolerance.
    """
    tolerance = spec.max_quality_drop
    baseline = next(r for r in rows if r.method == FP32)
    metric = baseline.quality_metric
    candidates = [r for r in rows if r.method != FP32]
    drops = {r.method: r.quality_drop for r in candidates}
    within = [r for r in candidates if r.ok and r.quality_drop is not None and r.quality_drop <= tolerance]
    over = [r for r in candidates if r.ok and r not in within]
    broken = [r for r in candidates if not r.ok]
    fastest = max(within, key=lambda r: r.speed, default=None)
    unit = "points" if metric == "accuracy" else "% perplexity"
    base = f"fp32 {metric} {baseline.quality[metric]:.4f}"
    limit = f"max_quality_drop={tolerance:g} {unit}"

    def describe(r: Measurement) -> str:
        kept = ""
        if r.fp32_layers:
            kept = f", fp32 layers: {', '.join(r.fp32_layers)}"
        elif r.search and r.fp32_layers is not None:
            kept = ", int8 in every layer"
        confirmed = ""
        if r.confirm_drop is not None and r.confirm_split:
            confirmed = f", drop on {r.confirm_split} {r.confirm_drop:+.2f}"
        return (
            f"{r.method} {metric} {r.quality[metric]:.4f} (drop {r.quality_drop:+.2f}), "
            f"{r.speed:.1f} {r.speed_unit} ({r.speedup or 0:.2f}x fp32){confirmed}{kept}"
        )

    parts = []
    if over:
        parts.append("over tolerance: " + "; ".join(describe(r) for r in over))
    if broken:
        parts.append("did not run: " + "; ".join(f"{r.method} ({r.error})" for r in broken))
    if spec.choose == "all_must_pass":
        passed = not over and not broken and bool(within)
        verdict = f"all {len(candidates)} methods within {limit}" if passed else f"gate failed ({limit})"
    else:
        passed = fastest is not None
        verdict = f"no method within {limit}" if not passed else f"within {limit}"
    if fastest is not None:
        parts.insert(0, f"fastest within tolerance: {describe(fastest)}")
    message = f"{verdict}; {base}; " + "; ".join(parts)
    return GateDecision(
        passed=passed,
        chosen=fastest.method if fastest else None,
        rule=spec.choose,
        max_quality_drop=tolerance,
        metric=metric,
        drops=drops,
        message=message,
    )


def format_table(rows: Sequence[Measurement]) -> str:
    """Fixed-width table of the rows, for task logs."""
    batch_sizes = sorted({b for r in rows for b in r.latency_ms})
    lm = any("perplexity" in r.quality for r in rows)
    headers = ["method", "size MB", "% fp32", *[f"p50 b{b} ms" for b in batch_sizes]]
    headers += [f"p95 b{max(batch_sizes)} ms"] if batch_sizes else []
    decode = any(r.decode_tokens_s is not None for r in rows)
    headers += ["rows/s", *(["decode tok/s"] if decode else []), "speedup"]
    headers += ["perplexity", "drop %"] if lm else ["accuracy", "macro-F1", "drop pts"]
    confirm_split = next((r.confirm_split for r in rows if r.confirm_split), None)
    layers = any(r.fp32_layers is not None for r in rows)
    headers += [f"{confirm_split} drop"] if confirm_split else []
    headers += ["fp32 layers"] if layers else []
    lines = []
    for r in rows:
        if not r.ok:
            lines.append([r.method, f"did not run: {(r.error or '')[:90]}"])
            continue
        cells = [r.method, f"{r.size_bytes / 1e6:.1f}", _pct(r.size_ratio)]
        cells += [f"{r.latency_ms[b]['p50']:.1f}" for b in batch_sizes]
        cells += [f"{r.latency_ms[max(batch_sizes)]['p95']:.1f}"] if batch_sizes else []
        cells += [f"{r.throughput_rows_s:.1f}"]
        cells += [f"{r.decode_tokens_s:.1f}" if r.decode_tokens_s is not None else "-"] if decode else []
        cells += [f"{r.speedup:.2f}x" if r.speedup else "-"]
        if lm:
            cells += [f"{r.quality['perplexity']:.3f}", _signed(r.quality_drop)]
        else:
            cells += [f"{r.quality['accuracy']:.4f}", f"{r.quality['macro_f1']:.4f}", _signed(r.quality_drop)]
        cells += [_signed(r.confirm_drop)] if confirm_split else []
        if layers:
            cells += ["-" if r.fp32_layers is None else (",".join(r.fp32_layers) or "none")]
        lines.append(cells)
    widths = [max(len(headers[i]), *(len(c[i]) for c in lines if len(c) == len(headers))) for i in range(len(headers))]
    out = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    for cells in lines:
        if len(cells) != len(headers):
            out.append(f"{cells[0].ljust(widths[0])}  {cells[1]}")
            continue
        out.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        )
    return "\n".join(out)


def _pct(ratio: float | None) -> str:
    return f"{ratio * 100:.0f}%" if ratio is not None else "-"


def _signed(value: float | None) -> str:
    return f"{value:+.2f}" if value is not None else "-"
