"""The drift check of one window with Evidently 0.7, and its result."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_llmops.ml.drift.features import (
    TEXT_DESCRIPTORS,
    embed_texts,
    reference_embeddings,
    text_descriptors,
    vocabulary,
)
from airflow_llmops.ml.drift.inputs import Reference, Window
from airflow_llmops.specs.drift import DriftPolicy

if TYPE_CHECKING:
    import pandas as pd

EMBEDDINGS_NAME = "minilm"
# Generated texts and labels are told apart by how many outputs are known labels: below this share the
# prediction check is skipped (a causal LM's outputs are not classes).
_MIN_KNOWN_LABEL_SHARE = 0.5


# ---- results ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckResult:
    """One check's verdict: ``drift`` is None when the check was skipped (``note`` says why)."""

    drift: bool | None
    score: float | None = None
    method: str = ""
    threshold: float | None = None
    note: str = ""
    columns: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DriftResult:
    """The verdict on one window. ``verdict`` is ``drift``, ``no_drift``, ``no_traffic`` or ``too_few_rows``."""

    drift: bool
    verdict: str
    rows: int
    sampled_rows: int
    reference_rows: int
    window_start: float
    window_end: float
    corrupt_lines: int = 0
    checks: dict[str, CheckResult] = dataclasses.field(default_factory=dict)
    note: str = ""
    reports: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def drifted_checks(self) -> list[str]:
        return [name for name, check in self.checks.items() if check.drift]

    def scores(self) -> dict[str, float]:
        """Flat ``check`` / ``check.column`` → score (MLflow metrics, the asset event's extra)."""
        out: dict[str, float] = {}
        for name, check in self.checks.items():
            if check.score is not None:
                out[name] = round(float(check.score), 6)
            for column, detail in check.columns.items():
                if detail.get("score") is not None:
                    out[f"{name}.{column}"] = round(float(detail["score"]), 6)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift": self.drift,
            "verdict": self.verdict,
            "drifted_checks": self.drifted_checks,
            "rows": self.rows,
            "sampled_rows": self.sampled_rows,
            "reference_rows": self.reference_rows,
            "window": {"start": self.window_start, "end": self.window_end},
            "corrupt_lines": self.corrupt_lines,
            "checks": {name: dataclasses.asdict(check) for name, check in self.checks.items()},
            "note": self.note,
            "seconds": round(self.seconds, 3),
        }


# ---- the check -------------------------------------------------------------------------------------------------
def _column_metric(column: str, policy: DriftPolicy) -> Any:
    """Evidently's per-column drift test: the descriptor test for text descriptors, else the column test."""
    from evidently.metrics import ValueDrift

    method: str
    if column in TEXT_DESCRIPTORS:
        method, threshold = policy.descriptor_method, policy.descriptor_threshold
    else:
        method, threshold = policy.column_method, policy.column_threshold
    return ValueDrift(column=column, method=None if method == "auto" else method, threshold=threshold)


def _value_drift(metric: dict[str, Any]) -> dict[str, Any]:
    """Evidently 0.7 reports the statistic only: p-values drift below the threshold, distances at or above it."""
    config = metric.get("config", {})
    method = str(config.get("method", ""))
    threshold = float(config.get("threshold", 0.05))
    score = float(metric["value"])
    drift = score < threshold if "p_value" in method else score >= threshold
    return {"drift": bool(drift), "score": score, "method": method, "threshold": threshold}


def _embedding_method(policy: DriftPolicy) -> Any:
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as methods

    factory = getattr(methods, policy.embedding_method)
    if policy.embedding_method == "ratio":  # no bootstrap option
        return factory(threshold=policy.embedding_cutoff)
    # bootstrap=False: the verdict is score > threshold for every method, so it can be read back from the score.
    return factory(threshold=policy.embedding_cutoff, bootstrap=False)


def compute_drift(
    reference: Reference,
    window: Window,
    policy: DriftPolicy,
    *,
    reference_latency: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> DriftResult:
    """Run the enabled checks of ``policy`` on ``window`` against ``reference``; write HTML reports to
    ``report_dir`` (``drift-report.html``, ``latency-report.html``) when given."""
    import time

    started = time.perf_counter()
    current = window.data
    if not current.empty:
        current = current[current["input"].str.len() > 0]
    result = DriftResult(
        drift=False,
        verdict="no_traffic",
        rows=len(current),
        sampled_rows=0,
        reference_rows=len(reference.data),
        window_start=window.start,
        window_end=window.end,
        corrupt_lines=window.corrupt_lines,
    )
    if current.empty:
        result.note = "no traffic in window"
        return result
    if len(current) < policy.min_rows:
        result.verdict = "too_few_rows"
        result.note = f"{len(current)} requests in window, fewer than min_rows={policy.min_rows}: no verdict"
        return result
    current = _sample(current, policy)
    result.sampled_rows = len(current)
    report_path = Path(report_dir) if report_dir is not None else None
    result.checks.update(
        _main_checks(reference, current, policy, cache_dir=cache_dir, report_dir=report_path, result=result)
    )
    if "latency" in policy.checks:
        result.checks["latency"] = _latency_check(current, reference_latency, policy, report_path, result)
    drifted = len(result.drifted_checks)
    result.drift = drifted >= policy.checks_to_agree
    result.verdict = "drift" if result.drift else "no_drift"
    result.note = f"{drifted} of {sum(c.drift is not None for c in result.checks.values())} checks drifted"
    result.seconds = time.perf_counter() - started
    return result


def _sample(data: pd.DataFrame, policy: DriftPolicy) -> pd.DataFrame:
    if len(data) <= policy.sample_size:
        return data.reset_index(drop=True)
    return data.sample(n=policy.sample_size, random_state=policy.seed).reset_index(drop=True)


def _split_reference(data: pd.DataFrame, policy: DriftPolicy) -> tuple[pd.DataFrame, frozenset[str]]:
    """(reference sample, vocabulary): the vocabulary comes from the *other* reference rows, so the reference's
    own out-of-vocabulary rate is measured out of sample, like live traffic's (else it is 0 by construction)."""
    shuffled = data.sample(frac=1.0, random_state=policy.seed).reset_index(drop=True)
    n_vocab = max(len(shuffled) // 2, len(shuffled) - policy.sample_size)
    return shuffled.iloc[n_vocab:].reset_index(drop=True), vocabulary(shuffled["text"].iloc[:n_vocab].astype(str))


@contextlib.contextmanager
def _fast_embedding_plot() -> Iterator[None]:
    """Evidently plots embeddings drift with a t-SNE of up to 5,000 points: ~90% of the check's run time on a
    CPU (20 s for 700 points on two cores). A PCA projection draws the same kind of 2-D plot in milliseconds."""
    from evidently.legacy.metrics.data_drift import embeddings_drift
    from sklearn.decomposition import PCA

    class _Projection:
        def __init__(self, n_components: int = 2, **_: Any) -> None:
            self._pca = PCA(n_components=n_components, random_state=0)

        def fit_transform(self, data: Any) -> Any:
            return self._pca.fit_transform(data)

    original = embeddings_drift.TSNE
    embeddings_drift.TSNE = _Projection
    try:
        yield
    finally:
        embeddings_drift.TSNE = original


def _run_report(
    metrics: list[Any],
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    definition: Any,
    *,
    html: Path | None,
    result: DriftResult,
) -> list[dict[str, Any]]:
    from evidently import Dataset, Report

    with _fast_embedding_plot():
        snapshot = Report(metrics).run(
            current_data=Dataset.from_pandas(cur, data_definition=definition),
            reference_data=Dataset.from_pandas(ref, data_definition=definition),
        )
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html))
        result.reports.append(str(html))
    return list(snapshot.dict()["metrics"])


def _main_checks(
    reference: Reference,
    current: pd.DataFrame,
    policy: DriftPolicy,
    *,
    cache_dir: str | Path | None,
    report_dir: Path | None,
    result: DriftResult,
) -> dict[str, CheckResult]:
    import pandas as pd
    from evidently import DataDefinition

    checks: dict[str, CheckResult] = {}
    ref, vocab = _split_reference(reference.data, policy)
    result.reference_rows = len(ref)
    ref_texts = ref["text"].astype(str).tolist()
    cur_texts = current["input"].astype(str).tolist()
    ref_frame = pd.DataFrame(index=range(len(ref)))
    cur_frame = pd.DataFrame(index=range(len(current)))
    metrics: list[Any] = []
    categorical: list[str] = []

    if "text_descriptors" in policy.checks:
        ref_frame = ref_frame.join(text_descriptors(ref_texts, vocab))
        cur_frame = cur_frame.join(text_descriptors(cur_texts, vocab))
        metrics.extend(_column_metric(c, policy) for c in TEXT_DESCRIPTORS)

    if "prediction" in policy.checks:
        skip = _prediction_skip_reason(reference.data, current)
        if skip:
            checks["prediction"] = CheckResult(drift=None, note=skip)
        else:
            ref_frame["label"] = ref["label"].astype(str).to_numpy()
            cur_frame["label"] = current["output"].astype(str).to_numpy()
            categorical.append("label")
            metrics.append(_column_metric("label", policy))

    if metrics:
        definition = DataDefinition(
            numerical_columns=[c for c in TEXT_DESCRIPTORS if c in ref_frame.columns], categorical_columns=categorical
        )
        html = report_dir / "drift-report.html" if report_dir is not None else None
        descriptors: dict[str, dict[str, Any]] = {}
        for metric in _run_report(metrics, ref_frame, cur_frame, definition, html=html, result=result):
            column = metric.get("config", {}).get("column")
            if column == "label":
                verdict = _value_drift(metric)
                checks["prediction"] = CheckResult(
                    drift=verdict["drift"],
                    score=verdict["score"],
                    method=verdict["method"],
                    threshold=verdict["threshold"],
                    note="predicted labels of the window vs the reference's labels",
                )
            elif column in TEXT_DESCRIPTORS:
                descriptors[str(column)] = _value_drift(metric)
        if descriptors:
            share = sum(d["drift"] for d in descriptors.values()) / len(descriptors)
            checks["text_descriptors"] = CheckResult(
                drift=share >= policy.drift_share,
                score=share,
                method="share of drifted descriptors",
                threshold=policy.drift_share,
                columns=descriptors,
            )

    if "embeddings" in policy.checks:
        checks["embeddings"] = _embeddings_check(
            ref_texts, cur_texts, reference, policy, cache_dir=cache_dir, report_dir=report_dir, result=result
        )
    return {name: checks[name] for name in policy.checks if name in checks}


def _embeddings_check(
    ref_texts: list[str],
    cur_texts: list[str],
    reference: Reference,
    policy: DriftPolicy,
    *,
    cache_dir: str | Path | None,
    report_dir: Path | None,
    result: DriftResult,
) -> CheckResult:
    """Drift of the sentence embeddings. Repeated inputs are embedded once: the reference is deduplicated by the
    data stage, and copies of one text on both sides of the model method's train/test split inflate its AUC."""
    import pandas as pd
    from evidently import DataDefinition
    from evidently.metrics import EmbeddingsDrift

    ref_unique = list(dict.fromkeys(ref_texts))
    cur_unique = list(dict.fromkeys(cur_texts))
    if len(cur_unique) < policy.min_rows:
        return CheckResult(
            drift=None, note=f"{len(cur_unique)} distinct inputs, fewer than min_rows={policy.min_rows}: skipped"
        )
    ref_emb, cached = reference_embeddings(
        ref_unique, content_hash=reference.content_hash, model_name=policy.embedding_model, cache_dir=cache_dir
    )
    cur_emb = embed_texts(cur_unique, policy.embedding_model)
    columns = [f"emb_{i}" for i in range(ref_emb.shape[1])]
    definition = DataDefinition(embeddings={EMBEDDINGS_NAME: columns})
    metric = EmbeddingsDrift(embeddings_name=EMBEDDINGS_NAME, drift_method=_embedding_method(policy))
    html = report_dir / "embeddings-report.html" if report_dir is not None else None
    out = _run_report(
        [metric],
        pd.DataFrame(ref_emb, columns=columns),
        pd.DataFrame(cur_emb, columns=columns),
        definition,
        html=html,
        result=result,
    )
    score = float(out[0]["value"])
    return CheckResult(
        drift=score > policy.embedding_cutoff,
        score=score,
        method=policy.embedding_method,
        threshold=policy.embedding_cutoff,
        note=f"{policy.embedding_model}, {len(ref_unique)} vs {len(cur_unique)} distinct texts; reference "
        f"embeddings {'from cache' if cached else 'computed'}",
    )


def _prediction_skip_reason(reference: pd.DataFrame, current: pd.DataFrame) -> str:
    if "label" not in reference.columns:
        return "the reference has no labels"
    ok = current[(current["status"] < 400) & current["output"].notna()]
    if ok.empty:
        return "no successful predictions in window"
    known = set(reference["label"].astype(str))
    share = ok["output"].astype(str).isin(known).mean()
    if share < _MIN_KNOWN_LABEL_SHARE:
        return f"only {share:.0%} of outputs are reference labels: not a classifier's predictions"
    return ""


def _latency_check(
    current: pd.DataFrame,
    baseline: Sequence[float] | None,
    policy: DriftPolicy,
    report_dir: Path | None,
    result: DriftResult,
) -> CheckResult:
    import pandas as pd
    from evidently import DataDefinition

    if not baseline:
        return CheckResult(drift=None, note="no latency baseline yet (no earlier window, no baseline file): skipped")
    latencies = current["latency_ms"].dropna()
    if len(latencies) < policy.min_rows or len(baseline) < policy.min_rows:
        return CheckResult(
            drift=None,
            note=f"{len(latencies)} latencies in window / {len(baseline)} in baseline, fewer than "
            f"min_rows={policy.min_rows}: skipped",
        )
    definition = DataDefinition(numerical_columns=["latency_ms"])
    ref = pd.DataFrame({"latency_ms": list(baseline)[: policy.sample_size]}, dtype="float64")
    cur = pd.DataFrame({"latency_ms": latencies.to_numpy()}, dtype="float64")
    html = report_dir / "latency-report.html" if report_dir is not None else None
    metrics = _run_report([_column_metric("latency_ms", policy)], ref, cur, definition, html=html, result=result)
    verdict = _value_drift(metrics[0])
    return CheckResult(
        drift=verdict["drift"],
        score=verdict["score"],
        method=verdict["method"],
        threshold=verdict["threshold"],
        note=f"window p50 {latencies.median():.1f} ms vs baseline p50 {pd.Series(baseline).median():.1f} ms",
    )
