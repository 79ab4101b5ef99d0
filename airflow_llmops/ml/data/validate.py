"""The dataset validation gate: a Great Expectations 1.x suite over prepared LLM text records.

GX runs the suite and builds the Data Docs report; every expectation's verdict comes from that run. The same
row-level conditions are recomputed here with vectorised pandas, because GX reports only a sample of failing
rows and we need every failing ``record_id`` to quarantine it with its reason.

What GX sees is a privacy-safe copy: text columns with personal data already replaced by placeholders, plus
helper columns (``__pii_*`` counts, ``__duplicate``, ``__label_rows``, ``__whitespace_tokens``) that let
built-in expectations express checks GX has no expectation for. Reports therefore never carry the values.

Conversations (a ``messages`` column, see :mod:`airflow_llmops.ml.data.validate_chat`) are checked per message:
format, roles, role sequence, empty turns, invalid characters, personal data and the rendered token length.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from airflow_llmops.ml.data.pii import redact
from airflow_llmops.ml.data.validation_result import ValidationResult, failed_entry, hint_for
from airflow_llmops.ml.data.validation_suite import (
    INVALID_CHARS,
    SuiteLayout,
    builtin_expectations,
    quiet_gx,
    run_suite,
)
from airflow_llmops.specs.validation import PiiType, ValidationSpec

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
    from great_expectations.expectations.expectation import Expectation

__all__ = ["QUARANTINE_COLUMN", "ValidationResult", "validate_dataset"]

QUARANTINE_COLUMN = "quarantine_reasons"
BUILTIN_SUITE = "llmops_text_dataset"
CHAT_SUITE = "llmops_chat_dataset"
DEFAULT_TEXT_COLUMNS = ("text", "prompt", "response")
CHAT_COLUMN = "messages"
_HELPER_PREFIX = "__"


@dataclass
class _Plan:
    """Everything computed with pandas before GX runs: the frames, the row verdicts and dataset-level details."""

    out: pd.DataFrame  # the records as they continue (redacted when pii_action='redact')
    gx_frame: pd.DataFrame  # what GX validates: redacted text plus helper columns
    text_columns: list[str]
    present_text: list[str]
    label: str | None
    label_domain: str | None  # the column the dataset-level label checks count: label, or its allowed subset
    token_column: str
    token_source: Literal["n_tokens", "whitespace"]
    pii_found: dict[str, int]
    pii_redacted: dict[str, int]
    row_checks: dict[str, tuple[pd.Series, pd.Series]]  # check → (failing-row mask, reason per row)
    details: dict[str, tuple[str, list[str]]]  # dataset-level check → (explanation, example record ids)
    chat: bool = False  # conversations in a ``messages`` column


def validate_dataset(
    df: pd.DataFrame,
    spec: ValidationSpec,
    *,
    docs_dir: Path | None = None,
    extra_expectations: Sequence[Expectation] | None = None,
    suite: ExpectationSuite | None = None,
    chat: bool | None = None,
) -> ValidationResult:
    """Validate prepared records; quarantine failing rows; gate on dataset checks, quarantine size and PII.

    ``chat``: the records are conversations (a ``messages`` column of JSON lists of role/content messages);
    ``None`` decides by the columns (``messages`` and none of text/prompt/response).

    ``extra_expectations`` are added to the built-in suite; ``suite`` replaces it (the spec's row checks then
    do not apply, but PII is still redacted, or quarantined and gated, as ``spec.pii_action`` says). A failing
    user expectation fails the gate. User expectations see text with personal data already redacted.

    Raises ``ValueError`` for an empty frame, a missing ``record_id`` column, or a column name starting with
    ``__`` (reserved for helper columns). A missing text column is a failed expectation, not an error.
    """
    if len(df) == 0:
        raise ValueError("the dataset is empty (0 rows): nothing to validate; check the preparation step's output")
    if "record_id" not in df.columns:
        raise ValueError(f"the dataset has no 'record_id' column (columns: {list(df.columns)[:20]})")
    clashes = [c for c in df.columns if str(c).startswith(_HELPER_PREFIX)]
    if clashes:
        raise ValueError(f"column names starting with {_HELPER_PREFIX!r} are reserved for helper columns: {clashes}")
    if chat is None:
        chat = is_chat(df, spec)
    if chat:
        from airflow_llmops.ml.data.validate_chat import plan_chat

        plan = plan_chat(df, spec, builtin=suite is None)
    else:
        plan = _plan(df, spec, builtin=suite is None)
    report_dir = Path(docs_dir) if docs_dir is not None else Path(tempfile.mkdtemp(prefix="llmops-validation-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    with quiet_gx():
        if suite is None:
            name, expectations = (
                CHAT_SUITE if plan.chat else BUILTIN_SUITE,
                [*builtin_expectations(suite_layout(plan), spec), *(extra_expectations or [])],
            )
        else:
            name, expectations = suite.name, list(suite.expectations)
        gx_result = run_suite(plan.gx_frame, name, expectations, report_dir, spec.example_rows)
    return _result(plan, spec, gx_result, name, report_dir)


def suite_layout(plan: _Plan) -> SuiteLayout:
    """What the built-in suite needs to know about a planned frame."""
    return SuiteLayout(
        text_columns=plan.text_columns,
        present_text=plan.present_text,
        label=plan.label,
        label_domain=plan.label_domain,
        token_column=plan.token_column,
        token_source=plan.token_source,
        chat=plan.chat,
    )


def is_chat(df: pd.DataFrame, spec: ValidationSpec) -> bool:
    """Conversations: a ``messages`` column, no text columns asked for and none of the default ones present."""
    return (
        CHAT_COLUMN in df.columns
        and spec.text_columns is None
        and not any(column in df.columns for column in DEFAULT_TEXT_COLUMNS)
    )


def _text_columns(df: pd.DataFrame, spec: ValidationSpec) -> list[str]:
    if spec.text_columns:
        return list(spec.text_columns)
    present = [c for c in DEFAULT_TEXT_COLUMNS if c in df.columns]
    return present or ["text"]  # none found: "text" is then reported as a missing column


def _is_str(series: pd.Series) -> pd.Series:
    return series.map(lambda value: isinstance(value, str)).astype(bool)


def _scan_pii(series: pd.Series, types: list[PiiType]) -> tuple[pd.Series, dict[str, list[int]]]:
    """Redacted copy of a text column and the per-row count of each PII type."""
    counts: dict[str, list[int]] = {kind: [0] * len(series) for kind in types}
    redacted: list[object] = []
    for position, value in enumerate(series.tolist()):
        if not isinstance(value, str) or not types:
            redacted.append(value)
            continue
        new_text, found = redact(value, types)
        redacted.append(new_text)
        for kind, count in found.items():
            counts[kind][position] += count
    # A categorical column cannot hold the new placeholder strings: fall back to object.
    dtype = object if isinstance(series.dtype, pd.CategoricalDtype) else series.dtype
    return pd.Series(redacted, index=series.index, dtype=dtype), counts


def _plan(df: pd.DataFrame, spec: ValidationSpec, *, builtin: bool) -> _Plan:
    text_columns = _text_columns(df, spec)
    present = [c for c in text_columns if c in df.columns]
    label = spec.label_column if spec.label_column and spec.label_column in df.columns else None
    out, gx_frame = df.copy(), df.copy()
    per_row = pd.DataFrame(0, index=df.index, columns=list(spec.pii_types), dtype="int64")
    remaining = per_row.copy()
    for column in present:
        redacted, counts = _scan_pii(df[column], list(spec.pii_types))
        per_row += pd.DataFrame(counts, index=df.index)
        gx_frame[column] = redacted
        if spec.pii_action == "redact":
            out[column] = redacted
            # Re-scan what continues so the GX check proves the redaction left nothing behind.
            remaining += pd.DataFrame(_scan_pii(redacted, list(spec.pii_types))[1], index=df.index)
    pii_found = {kind: int(n) for kind, n in per_row.sum().items() if n}
    for kind in spec.pii_types:
        gx_frame[f"__pii_{kind}"] = (remaining if spec.pii_action == "redact" else per_row)[kind]
    token_source: Literal["n_tokens", "whitespace"] = "n_tokens" if "n_tokens" in df.columns else "whitespace"
    token_column = "n_tokens" if token_source == "n_tokens" else "__whitespace_tokens"
    if token_source == "whitespace":
        gx_frame[token_column] = sum(
            (out[c].where(_is_str(out[c]), "").astype(str).str.split().str.len() for c in present),
            start=pd.Series(0, index=df.index, dtype="int64"),
        )
    plan = _Plan(
        out=out,
        gx_frame=gx_frame,
        text_columns=text_columns,
        present_text=present,
        label=label,
        label_domain=label,
        token_column=token_column,
        token_source=token_source,
        pii_found=pii_found,
        pii_redacted=dict(pii_found) if spec.pii_action == "redact" else {},
        row_checks={},
        details={},
    )
    _dataset_helpers(plan, df, spec)
    if builtin:
        _row_checks(plan, spec)
    if spec.pii_action == "fail":
        for kind in spec.pii_types:
            mask = per_row[kind] > 0
            plan.row_checks[f"pii:{kind}"] = (mask, pd.Series(f"pii:{kind}", index=df.index))
    return plan


def _ids(df: pd.DataFrame, mask: pd.Series, limit: int) -> list[str]:
    return [str(v) for v in df.loc[mask, "record_id"].drop_duplicates().head(limit)]


def _dataset_helpers(plan: _Plan, df: pd.DataFrame, spec: ValidationSpec) -> None:
    """Helper columns for dataset-level checks, and the explanation shown when each one fails."""
    gx_frame, n = plan.gx_frame, len(df)
    plan.details["record_id_unique"] = (
        "record_id must identify one record; duplicated ids break quarantine and lineage",
        _ids(df, df["record_id"].duplicated(keep=False), spec.example_rows),
    )
    for column in plan.text_columns:
        shown = [str(c) for c in df.columns][:20]
        plan.details[f"missing_column:{column}"] = (f"columns present: {shown}", [])
    if plan.present_text:
        key = plan.out[plan.present_text[0]].astype(str)
        for column in plan.present_text[1:]:
            key = key + "\x1f" + plan.out[column].astype(str)
        duplicate = key.duplicated(keep="first")
        gx_frame["__duplicate"] = duplicate.astype("int64")
        plan.details["duplicate_ratio"] = (
            f"{int(duplicate.sum())} of {n} rows repeat an earlier row's text",
            _ids(df, duplicate, spec.example_rows),
        )
    if plan.label is not None:
        labels = df[plan.label]
        if spec.allowed_labels is not None:
            # Rows with a label outside the allowed set are quarantined; they must not make up a class.
            labels = labels.where(labels.isin(spec.allowed_labels))
            gx_frame["__allowed_label"] = labels
            plan.label_domain = "__allowed_label"
        counts = labels.value_counts()
        gx_frame["__label_rows"] = labels.map(counts)
        shown_counts = {str(k): int(v) for k, v in counts.head(10).items()}
        plan.details["min_labels"] = (f"rows per label: {shown_counts}", [])
        small = counts[counts < spec.min_rows_per_label]
        shown_small = {str(k): int(v) for k, v in small.head(10).items()}
        plan.details["min_rows_per_label"] = (
            f"labels under {spec.min_rows_per_label} rows: {shown_small}",
            _ids(df, labels.isin(small.index), spec.example_rows),
        )


def _row_checks(plan: _Plan, spec: ValidationSpec) -> None:
    """Per-row verdicts mirroring the built-in row-level expectations, on the frame GX validates."""
    frame, checks = plan.gx_frame, plan.row_checks
    for column in plan.present_text:
        values = frame[column]
        is_str = _is_str(values)
        text = values.where(is_str, "").astype(str)
        checks[f"type:{column}"] = (values.notna() & ~is_str, pd.Series(f"type:{column}", index=frame.index))
        empty = values.isna() | (is_str & ~text.str.contains(r"\S", regex=True))
        checks[f"empty:{column}"] = (empty, pd.Series(f"empty:{column}", index=frame.index))
        if spec.max_invalid_char_ratio > 0:
            ratio = text.str.count(INVALID_CHARS) / text.str.len().clip(lower=1)
            frame[f"__invalid_ratio_{column}"] = ratio
            invalid = ratio > spec.max_invalid_char_ratio
        else:
            invalid = is_str & text.str.contains(INVALID_CHARS, regex=True)
        checks[f"invalid_chars:{column}"] = (invalid, pd.Series(f"invalid_chars:{column}", index=frame.index))
    token_and_label_checks(plan, spec)


def token_and_label_checks(plan: _Plan, spec: ValidationSpec) -> None:
    """Row verdicts on the token count (``n_tokens`` or the helper count) and on the label, for text and chat."""
    frame, checks = plan.gx_frame, plan.row_checks
    tokens = pd.to_numeric(frame[plan.token_column], errors="coerce")
    shown = tokens.map(lambda value: "missing" if pd.isna(value) else f"{value:g}")
    reason = pd.Series("token_length:missing", index=frame.index)
    reason = reason.mask(tokens > spec.max_tokens, "token_length:" + shown + f">{spec.max_tokens}")
    reason = reason.mask(tokens < spec.min_tokens, "token_length:" + shown + f"<{spec.min_tokens}")
    checks["token_length"] = (tokens.isna() | (tokens < spec.min_tokens) | (tokens > spec.max_tokens), reason)
    if plan.label is not None:
        labels = frame[plan.label]
        checks[f"empty:{plan.label}"] = (labels.isna(), pd.Series(f"empty:{plan.label}", index=frame.index))
        if spec.allowed_labels is not None:
            not_allowed = labels.notna() & ~labels.isin(spec.allowed_labels)
            checks["label_not_allowed"] = (not_allowed, "label_not_allowed:" + labels.astype(str))


def _result(
    plan: _Plan, spec: ValidationSpec, gx_result: ExpectationSuiteValidationResult, suite_name: str, report_dir: Path
) -> ValidationResult:
    failed = []
    for outcome in gx_result.results:
        if not outcome.success:
            entry = failed_entry(outcome, spec.example_rows)
            detail, examples = plan.details.get(entry["check"], ("", []))
            entry["detail"] = ". ".join(part for part in (detail, hint_for(entry["check"])) if part)
            entry["example_ids"] = entry["example_ids"] or examples[: spec.example_rows]
            failed.append(entry)
    index = plan.out.index
    quarantined = pd.Series(False, index=index)
    reasons = pd.Series("", index=index, dtype=object)
    reason_counts: dict[str, int] = {}
    for check, (raw_mask, reason) in plan.row_checks.items():
        mask = raw_mask.fillna(False).astype(bool)
        if not mask.any():
            continue
        reason_counts[check] = int(mask.sum())
        quarantined |= mask
        reasons = reasons.mask(mask, reasons.where(reasons == "", reasons + "; ") + reason.astype(str))
    row_count = len(plan.out)
    fraction = float(quarantined.sum()) / row_count
    blocked = any(entry["blocking"] for entry in failed)
    pii_blocks = spec.pii_action == "fail" and bool(plan.pii_found)
    quarantine = plan.out[quarantined].copy()
    quarantine[QUARANTINE_COLUMN] = reasons[quarantined]
    return ValidationResult(
        success=not blocked and fraction <= spec.max_quarantine_fraction and not pii_blocks,
        suite_success=bool(gx_result.success),
        suite_name=suite_name,
        row_count=row_count,
        clean_count=row_count - int(quarantined.sum()),
        quarantined_count=int(quarantined.sum()),
        quarantine_fraction=fraction,
        max_quarantine_fraction=spec.max_quarantine_fraction,
        quarantine_reasons=reason_counts,
        failed_expectations=failed,
        pii_found=plan.pii_found,
        pii_redacted=plan.pii_redacted,
        pii_action=spec.pii_action,
        token_count_source=plan.token_source,
        text_columns=plan.text_columns,
        statistics={str(k): float(v) for k, v in (gx_result.statistics or {}).items()},
        report_dir=report_dir,
        clean=plan.out[~quarantined].copy(),
        quarantine=quarantine,
    )
