"""The Great Expectations side of the validation gate: the built-in suite and one checkpoint run with Data Docs.

GX is imported inside the functions (its import takes 12-15 s); importing this module costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from airflow_llmops.specs.validation import ValidationSpec

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
    from great_expectations.expectations.expectation import Expectation

_GX_LOGGERS = ("great_expectations", "alembic")

# Control characters except tab/newline/CR, the U+FFFD replacement character, and UTF-8 decoded as cp1252 or
# latin-1 ("Ã©" for "é", "â€™" for a right quote, "Â " for a no-break space). Raw string: reports show it readably.
INVALID_CHARS = (
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]"
    r"|Ã[\u00a0-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201e"
    r"\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
    r"|â€|Â[\u00a0-\u00bf]"
)


# Row checks of conversations: check → (helper column, what it expects). The helper is 1 where a conversation
# fails the check (see validate_chat), which a built-in expectation then requires to be 0.
CHAT_ROW_CHECKS: dict[str, tuple[str, str]] = {
    "chat_format": ("__chat_format", "a list of objects with string role and content"),
    "unknown_role": ("__chat_unknown_role", "roles system, user or assistant"),
    "role_sequence": (
        "__chat_role_sequence",
        "optional system message first, then user/assistant alternating, ending with assistant",
    ),
    "empty_turn": ("__chat_empty_turn", "no empty or whitespace-only message"),
    "invalid_chars:messages": ("__chat_invalid_chars", "no control characters, U+FFFD or mojibake in a message"),
}


@dataclass(frozen=True)
class SuiteLayout:
    """Which columns the built-in suite checks, as found in the dataset."""

    text_columns: list[str]  # expected text columns (a missing one fails ``ExpectColumnToExist``)
    present_text: list[str]
    label: str | None
    label_domain: str | None  # the column counted by the dataset-level label checks
    token_column: str
    token_source: Literal["n_tokens", "whitespace"]
    chat: bool = False  # conversations: the text column holds messages, checked by CHAT_ROW_CHECKS


@contextmanager
def quiet_gx() -> Iterator[None]:
    """GX logs an INFO line per registered metric on import (hundreds, under Airflow's log handler)."""
    loggers = [logging.getLogger(name) for name in _GX_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _tag(check: str, level: Literal["row", "dataset"], blocking: bool, expect: str = "") -> dict[str, Any]:
    """Meta that links a GX result back to its check (quarantine reason, gate role, message)."""
    return {"llmops": {"check": check, "level": level, "blocking": blocking, "expect": expect}}


def _text_expectations(column: str, spec: ValidationSpec) -> list[Expectation]:
    from great_expectations.expectations.core.expect_column_values_to_be_between import (
        ExpectColumnValuesToBeBetween,
    )
    from great_expectations.expectations.core.expect_column_values_to_be_of_type import ExpectColumnValuesToBeOfType
    from great_expectations.expectations.core.expect_column_values_to_match_regex import (
        ExpectColumnValuesToMatchRegex,
    )
    from great_expectations.expectations.core.expect_column_values_to_not_be_null import (
        ExpectColumnValuesToNotBeNull,
    )
    from great_expectations.expectations.core.expect_column_values_to_not_match_regex import (
        ExpectColumnValuesToNotMatchRegex,
    )

    empty = _tag(f"empty:{column}", "row", False)
    clean = f"no control characters, U+FFFD or mojibake (max ratio {spec.max_invalid_char_ratio} per text)"
    invalid = _tag(f"invalid_chars:{column}", "row", False, clean)
    return [
        ExpectColumnValuesToBeOfType(column=column, type_="str", meta=_tag(f"type:{column}", "row", False)),
        ExpectColumnValuesToNotBeNull(column=column, mostly=spec.mostly_non_empty, meta=empty),
        ExpectColumnValuesToMatchRegex(column=column, regex=r"\S", mostly=spec.mostly_non_empty, meta=empty),
        ExpectColumnValuesToBeBetween(
            column=f"__invalid_ratio_{column}",
            max_value=spec.max_invalid_char_ratio,
            mostly=spec.mostly_clean_text,
            meta=invalid,
        )
        if spec.max_invalid_char_ratio > 0
        else ExpectColumnValuesToNotMatchRegex(
            column=column, regex=INVALID_CHARS, mostly=spec.mostly_clean_text, meta=invalid
        ),
    ]


def _chat_expectations(spec: ValidationSpec) -> list[Expectation]:
    from great_expectations.expectations.core.expect_column_values_to_be_between import (
        ExpectColumnValuesToBeBetween,
    )

    mostly = {"empty_turn": spec.mostly_non_empty, "invalid_chars:messages": spec.mostly_clean_text}
    return [
        ExpectColumnValuesToBeBetween(
            column=helper,
            min_value=0,
            max_value=0,
            mostly=mostly.get(check, 1.0),
            meta=_tag(check, "row", False, expect),
        )
        for check, (helper, expect) in CHAT_ROW_CHECKS.items()
    ]


def builtin_expectations(layout: SuiteLayout, spec: ValidationSpec) -> list[Expectation]:
    from great_expectations.expectations.core.expect_column_mean_to_be_between import ExpectColumnMeanToBeBetween
    from great_expectations.expectations.core.expect_column_to_exist import ExpectColumnToExist
    from great_expectations.expectations.core.expect_column_values_to_be_between import (
        ExpectColumnValuesToBeBetween,
    )
    from great_expectations.expectations.core.expect_column_values_to_be_unique import ExpectColumnValuesToBeUnique
    from great_expectations.expectations.core.expect_column_values_to_not_be_null import (
        ExpectColumnValuesToNotBeNull,
    )

    found: list[Expectation] = [
        ExpectColumnValuesToBeUnique(column="record_id", meta=_tag("record_id_unique", "dataset", True)),
        *(
            ExpectColumnToExist(column=column, meta=_tag(f"missing_column:{column}", "dataset", True))
            for column in layout.text_columns
        ),
    ]
    for column in layout.present_text:
        found += _chat_expectations(spec) if layout.chat else _text_expectations(column, spec)
    length = _tag("token_length", "row", False)
    found.append(
        ExpectColumnValuesToBeBetween(
            column=layout.token_column,
            min_value=spec.min_tokens,
            max_value=spec.max_tokens,
            mostly=spec.mostly_length,
            meta=length,
        )
    )
    if layout.token_source == "n_tokens":
        found.append(ExpectColumnValuesToNotBeNull(column="n_tokens", mostly=spec.mostly_length, meta=length))
    if layout.present_text:
        duplicates = _tag("duplicate_ratio", "dataset", True)
        found.append(
            ExpectColumnMeanToBeBetween(column="__duplicate", max_value=spec.max_duplicate_ratio, meta=duplicates)
        )
    if layout.label is not None and layout.label_domain is not None:
        found += _label_expectations(layout.label, layout.label_domain, spec)
    found += [
        ExpectColumnValuesToBeBetween(
            column=f"__pii_{kind}", min_value=0, max_value=0, meta=_tag(f"pii:{kind}", "row", True)
        )
        for kind in spec.pii_types
    ]
    return found


def _label_expectations(label: str, domain: str, spec: ValidationSpec) -> list[Expectation]:
    from great_expectations.expectations.core.expect_column_min_to_be_between import ExpectColumnMinToBeBetween
    from great_expectations.expectations.core.expect_column_unique_value_count_to_be_between import (
        ExpectColumnUniqueValueCountToBeBetween,
    )
    from great_expectations.expectations.core.expect_column_values_to_be_in_set import ExpectColumnValuesToBeInSet
    from great_expectations.expectations.core.expect_column_values_to_not_be_null import (
        ExpectColumnValuesToNotBeNull,
    )

    found: list[Expectation] = [
        ExpectColumnValuesToNotBeNull(column=label, meta=_tag(f"empty:{label}", "row", False)),
        ExpectColumnUniqueValueCountToBeBetween(
            column=domain, min_value=spec.min_labels, meta=_tag("min_labels", "dataset", True)
        ),
        ExpectColumnMinToBeBetween(
            column="__label_rows", min_value=spec.min_rows_per_label, meta=_tag("min_rows_per_label", "dataset", True)
        ),
    ]
    if spec.allowed_labels is not None:
        found.append(
            ExpectColumnValuesToBeInSet(
                column=label, value_set=list(spec.allowed_labels), meta=_tag("label_not_allowed", "row", False)
            )
        )
    return found


def run_suite(
    frame: pd.DataFrame, suite_name: str, expectations: list[Expectation], report_dir: Path, example_rows: int
) -> ExpectationSuiteValidationResult:
    """Ephemeral context → pandas data source → dataframe asset → whole-frame batch → checkpoint with Data Docs."""
    import great_expectations as gx
    from great_expectations.checkpoint.actions import UpdateDataDocsAction
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site = "llmops_report"
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,  # no network calls from a training pipeline
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            site: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("llmops_records").add_dataframe_asset("records")
    batch = asset.add_batch_definition_whole_dataframe("all_records")
    suite = gx.ExpectationSuite(name=suite_name)
    for expectation in expectations:
        # A suite owns its expectations (GX refuses one that already has an id): add detached copies, which
        # also leaves the caller's objects reusable. Adding needs the context above to exist.
        suite.add_expectation(expectation.copy(update={"id": None}, deep=True))
    saved = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{saved.name}_validation", data=batch, suite=saved)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{saved.name}_checkpoint",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[site])],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": ["record_id"],
                "partial_unexpected_count": example_rows,
            },
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (result,) = outcome.run_results.values()
    return result
