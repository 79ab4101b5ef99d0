"""The outcome of the dataset validation gate: verdicts, quarantine, PII counts, and how to read them.

No Great Expectations import here: the GX result objects are read by duck typing, so building a summary or a
failure message costs nothing at import time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

_HINTS = {
    "record_id_unique": "Re-run the preparation step, which derives one id per record.",
    "missing_column": "Set text_columns / label_column in the ValidationSpec to the dataset's column names.",
    "duplicate_ratio": "Deduplicate upstream (PrepareDataset) or raise max_duplicate_ratio.",
    "min_labels": "Add data for more labels, or lower min_labels.",
    "min_rows_per_label": "Add rows for these labels, drop them upstream, or lower min_rows_per_label.",
    "pii": "Remove personal data upstream, or set pii_action='redact' to replace it with placeholders.",
}
# Keys of an expectation's kwargs that say where it applies rather than what it expects.
_NOT_EXPECTED = {"column", "batch_id", "result_format", "catch_exceptions", "include_config", "meta"}


def hint_for(check: str) -> str:
    return _HINTS.get(check.split(":", 1)[0], "")


def plain(value: Any) -> Any:
    """JSON-safe copy of a GX value: numpy scalars to Python, NaN/inf to None, anything odd to its str."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, str | bytes):
        try:
            value = value.item()  # numpy scalar
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _exception_message(outcome: Any) -> str | None:
    """GX nests exception info per metric for some failures and flat for others; find any raised message."""
    info = getattr(outcome, "exception_info", None) or {}
    candidates = [info, *(v for v in info.values() if isinstance(v, dict))]
    for candidate in candidates:
        if candidate.get("raised_exception"):
            return str(candidate.get("exception_message") or "exception while computing the expectation")
    return None


def failed_entry(outcome: Any, example_rows: int) -> dict[str, Any]:
    """Small, JSON-safe description of one failed GX expectation result."""
    config = outcome.expectation_config
    kwargs = dict(config.kwargs)
    tag = (config.meta or {}).get("llmops", {})
    result = outcome.result or {}
    error = _exception_message(outcome)
    expected = {k: v for k, v in kwargs.items() if k not in _NOT_EXPECTED}
    shown = str(tag.get("expect") or (json.dumps(plain(expected)) if expected else ""))
    mostly = kwargs.get("mostly")
    if mostly is None and result.get("unexpected_count") is not None:
        mostly = 1.0  # GX leaves a default ``mostly`` out of the kwargs
    # dict.fromkeys: a duplicated id appears once per row in GX's list.
    ids = list(
        dict.fromkeys(
            str(row.get("record_id"))
            for row in (result.get("partial_unexpected_index_list") or [])
            if isinstance(row, dict) and "record_id" in row
        )
    )[:example_rows]
    return {
        "expectation": str(config.type),
        "check": str(tag.get("check", config.type)),
        "level": str(tag.get("level", "dataset")),
        # User expectations and errors block; so do built-in dataset checks and the privacy checks.
        "blocking": bool(tag.get("blocking", True)) or error is not None,
        "column": plain(kwargs.get("column")),
        "expected": shown if len(shown) <= 200 else shown[:197] + "...",
        "mostly": plain(mostly),
        "observed_value": plain(result.get("observed_value")),
        "element_count": plain(result.get("element_count")),
        "unexpected_count": plain(result.get("unexpected_count")),
        "unexpected_percent": plain(result.get("unexpected_percent")),
        "example_ids": ids,
        "error": error,
    }


@dataclass
class ValidationResult:
    """What the gate decided and why. ``clean`` continues to training; ``quarantine`` holds the rejected rows
    with a ``quarantine_reasons`` column. ``summary()`` is small and JSON-safe (for XCom); the DataFrames and
    the report folder are for the caller to store."""

    success: bool
    suite_success: bool
    suite_name: str
    row_count: int
    clean_count: int
    quarantined_count: int
    quarantine_fraction: float
    max_quarantine_fraction: float
    quarantine_reasons: dict[str, int]
    failed_expectations: list[dict[str, Any]]
    pii_found: dict[str, int]
    pii_redacted: dict[str, int]
    pii_action: Literal["fail", "redact"]
    token_count_source: Literal["n_tokens", "whitespace"]
    text_columns: list[str]
    statistics: dict[str, float]
    report_dir: Path
    clean: pd.DataFrame = field(repr=False)
    quarantine: pd.DataFrame = field(repr=False)

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    def summary(self) -> dict[str, Any]:
        summary = {
            "success": self.success,
            "suite_success": self.suite_success,
            "suite_name": self.suite_name,
            "row_count": self.row_count,
            "clean_count": self.clean_count,
            "quarantined_count": self.quarantined_count,
            "quarantine_fraction": round(self.quarantine_fraction, 6),
            "max_quarantine_fraction": self.max_quarantine_fraction,
            "quarantine_reasons": dict(self.quarantine_reasons),
            "failed_expectations": self.failed_expectations,
            "pii_found": dict(self.pii_found),
            "pii_redacted": dict(self.pii_redacted),
            "pii_action": self.pii_action,
            "token_count_source": self.token_count_source,
            "text_columns": list(self.text_columns),
            "statistics": dict(self.statistics),
            "report_dir": str(self.report_dir),
        }
        return plain(summary)  # type: ignore[no-any-return]

    def failure_message(self) -> str:
        """Multi-line, actionable explanation of a failed gate; never contains personal data values."""
        evaluated = int(self.statistics.get("evaluated_expectations", 0))
        met = int(self.statistics.get("successful_expectations", 0))
        head = (
            f"suite {self.suite_name!r}, {self.row_count} rows, {met}/{evaluated} expectations met, "
            f"{self.quarantined_count} rows quarantined"
        )
        if self.success:
            return f"Dataset validation passed ({head})."
        lines = [f"Dataset validation FAILED ({head})."]
        blocking = [e for e in self.failed_expectations if e["blocking"]]
        row_level = [e for e in self.failed_expectations if not e["blocking"]]
        if blocking:
            lines.append("Blocking checks:")
            lines += [f"  - {_describe(e)}" for e in blocking]
        if row_level:
            lines.append("Row checks (failing rows are quarantined):")
            lines += [f"  - {_describe(e)}" for e in row_level]
        verdict = ">" if self.quarantine_fraction > self.max_quarantine_fraction else "<="
        lines.append(
            f"Quarantine: {self.quarantined_count} of {self.row_count} rows ({self.quarantine_fraction:.2%}) "
            f"{verdict} max_quarantine_fraction {self.max_quarantine_fraction:.2%}"
            + ("; fix those rows upstream or raise max_quarantine_fraction." if verdict == ">" else ".")
        )
        if self.quarantine_reasons:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantine_reasons.items()))
            lines.append(f"Quarantine reasons (rows): {reasons}")
        if self.pii_found:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.pii_found.items()))
            if self.pii_action == "fail":
                lines.append(f"PII found (values not shown): {counts}. pii_action='fail' blocks: {_HINTS['pii']}")
            else:
                lines.append(f"PII redacted (values not shown): {counts}.")
        lines.append(f"Report: {self.report_index}")
        return "\n".join(lines)


def _describe(entry: dict[str, Any]) -> str:
    where = f" on {entry['column']!r}" if entry.get("column") is not None else ""
    text = f"{entry['check']}: {entry['expectation']}{where}"
    if entry.get("error"):
        text += f" raised an error: {entry['error']}"
    elif entry.get("unexpected_count") is not None:
        percent = entry.get("unexpected_percent")
        share = f" ({percent:.1f}%)" if isinstance(percent, int | float) else ""
        total = f" of {entry['element_count']}" if entry.get("element_count") is not None else ""
        text += f": {entry['unexpected_count']}{total} rows unexpected{share}, mostly={entry['mostly']}"
    else:
        text += f": observed {entry.get('observed_value')!r}"
    if entry.get("expected"):
        text += f", expected {entry['expected']}"
    if entry.get("example_ids"):
        text += f"; e.g. record_id {', '.join(entry['example_ids'])}"
    if entry.get("detail"):
        text += f". {entry['detail']}"
    return text
