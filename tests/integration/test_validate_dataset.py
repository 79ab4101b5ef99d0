"""The dataset validation gate on a real Great Expectations run (GX imports in ~12 s, so each scenario runs once
in a module-scoped fixture and several tests read its result)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from airflow_llmops.ml.data.validate import QUARANTINE_COLUMN, validate_dataset
from airflow_llmops.specs import ValidationSpec

LABELS = ["greeting", "weather"]


def records(per_label: int = 20) -> pd.DataFrame:
    """Classification records whose ordinary numbers, dates and versions must not look like PII."""
    rows = []
    for label in LABELS:
        for i in range(per_label):
            text = f"{label} note {i}: on 2024-03-{i % 28 + 1:02d} release 3.11.{i} served {i * 37} calls in {i}.5 s"
            rows.append({"record_id": f"{label}-{i:03d}", "text": text, "label": label, "n_tokens": len(text.split())})
    return pd.DataFrame(rows)


def reasons(result) -> dict[str, str]:
    return dict(zip(result.quarantine["record_id"], result.quarantine[QUARANTINE_COLUMN], strict=True))


def failed(result, check: str) -> dict:
    (entry,) = [e for e in result.failed_expectations if e["check"] == check]
    return entry


# --------------------------------------------------------------------------- a clean dataset passes


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    return validate_dataset(records(), ValidationSpec(allowed_labels=LABELS), docs_dir=docs)


def test_clean_dataset_passes_with_counts(clean):
    assert clean.success and clean.suite_success
    assert (clean.row_count, clean.clean_count, clean.quarantined_count) == (40, 40, 0)
    assert clean.quarantine_fraction == 0.0
    assert clean.failed_expectations == [] and clean.quarantine_reasons == {}
    assert clean.pii_found == {} and clean.pii_redacted == {}
    assert clean.token_count_source == "n_tokens"
    assert clean.text_columns == ["text"]
    assert clean.statistics["evaluated_expectations"] == clean.statistics["successful_expectations"] > 10
    assert list(clean.clean.columns) == ["record_id", "text", "label", "n_tokens"]
    assert clean.quarantine.empty and QUARANTINE_COLUMN in clean.quarantine.columns
    assert clean.failure_message().startswith("Dataset validation passed")


def test_report_is_a_data_docs_site_naming_the_suite(clean):
    index = clean.report_dir / "index.html"
    assert index.is_file()
    assert "llmops_text_dataset" in index.read_text(encoding="utf-8")
    pages = list((clean.report_dir / "validations").rglob("*.html"))
    assert len(pages) == 1 and "expect_column_values_to_be_between" not in pages[0].name


def test_summary_is_small_json(clean):
    summary = json.loads(json.dumps(clean.summary()))
    assert summary["success"] is True and summary["row_count"] == 40
    assert summary["report_dir"] == str(clean.report_dir)
    assert len(json.dumps(summary)) < 2000  # fit for XCom: no rows, only counts and ids


# --------------------------------------------------------------------------- row-level checks quarantine rows

BAD_ROWS = {
    0: ({"text": ""}, "empty:text"),
    1: ({"text": "   "}, "empty:text"),
    2: ({"text": None}, "empty:text"),
    3: ({"n_tokens": 700}, "token_length:700>512"),
    4: ({"n_tokens": 0}, "token_length:0<1"),
    5: ({"label": "spam"}, "label_not_allowed:spam"),
    6: ({"text": "a bell \x07 rings"}, "invalid_chars:text"),
    7: ({"text": "na\u00c3\u00afve caf\u00c3\u00a9 text"}, "invalid_chars:text"),
    8: ({"text": "broken \ufffd char"}, "invalid_chars:text"),
    9: ({"text": "", "n_tokens": 0}, "empty:text; token_length:0<1"),
}


def dirty_records() -> pd.DataFrame:
    frame = records(per_label=50)
    for index, (changes, _) in BAD_ROWS.items():
        for column, value in changes.items():
            frame.loc[index, column] = value
    return frame


@pytest.fixture(scope="module")
def dirty_lenient():
    return validate_dataset(dirty_records(), ValidationSpec(allowed_labels=LABELS, max_quarantine_fraction=0.15))


@pytest.fixture(scope="module")
def dirty_strict():
    return validate_dataset(dirty_records(), ValidationSpec(allowed_labels=LABELS, max_quarantine_fraction=0.05))


def test_each_row_check_quarantines_the_right_records(dirty_lenient):
    frame = dirty_records()
    expected = {frame.loc[i, "record_id"]: reason for i, (_, reason) in BAD_ROWS.items()}
    assert reasons(dirty_lenient) == expected
    assert dirty_lenient.quarantine.drop(columns=QUARANTINE_COLUMN).equals(frame.loc[list(BAD_ROWS)])
    assert dirty_lenient.quarantine_reasons == {
        "empty:text": 4,
        "invalid_chars:text": 3,
        "token_length": 3,
        "label_not_allowed": 1,
    }
    assert set(dirty_lenient.clean["record_id"]) == set(frame["record_id"]) - set(expected)


def test_gx_counts_agree_with_the_quarantine(dirty_lenient):
    assert dirty_lenient.suite_success is False  # mostly=1.0: GX itself fails the row checks
    for check in ("invalid_chars:text", "token_length", "label_not_allowed"):
        entry = failed(dirty_lenient, check)
        assert entry["level"] == "row" and entry["blocking"] is False
        assert entry["unexpected_count"] == dirty_lenient.quarantine_reasons[check]
        assert entry["mostly"] == 1.0
        assert set(entry["example_ids"]) <= set(reasons(dirty_lenient))


def test_small_quarantine_passes_the_gate_and_clean_rows_continue(dirty_lenient):
    assert dirty_lenient.success
    assert (dirty_lenient.row_count, dirty_lenient.clean_count, dirty_lenient.quarantined_count) == (100, 90, 10)
    assert dirty_lenient.quarantine_fraction == pytest.approx(0.10)


def test_quarantine_above_the_threshold_fails_the_gate(dirty_strict):
    assert not dirty_strict.success
    assert not any(e["blocking"] for e in dirty_strict.failed_expectations)
    message = dirty_strict.failure_message()
    assert "10 of 100 rows (10.00%) > max_quarantine_fraction 5.00%" in message
    assert "token_length: expect_column_values_to_be_between on 'n_tokens'" in message
    assert "greeting-003" in message  # example record ids


# --------------------------------------------------------------------------- PII: privacy gate or redaction

EMAIL, PHONE, CARD = "alice.smith@example.com", "+44 20 7946 0958", "4111 1111 1111 1111"


def pii_records() -> pd.DataFrame:
    frame = records()
    frame.loc[0, "text"] = f"please write to {EMAIL} today"
    frame.loc[1, "text"] = f"my number is {PHONE}"
    frame.loc[2, "text"] = f"card {CARD} and {EMAIL}"
    return frame


def test_pii_fail_mode_blocks_regardless_of_quarantine_threshold():
    result = validate_dataset(pii_records(), ValidationSpec(pii_action="fail", max_quarantine_fraction=1.0))
    assert not result.success
    assert result.pii_found == {"email": 2, "phone": 1, "credit_card": 1}
    assert result.pii_redacted == {}
    assert reasons(result) == {
        "greeting-000": "pii:email",
        "greeting-001": "pii:phone",
        "greeting-002": "pii:email; pii:credit_card",
    }
    assert failed(result, "pii:email")["blocking"] is True
    message = result.failure_message()
    assert "PII found (values not shown): credit_card 1, email 2, phone 1" in message
    assert "pii_action='redact'" in message
    shown = message + json.dumps(result.summary())
    shown += "".join(p.read_text(encoding="utf-8") for p in result.report_dir.rglob("*.html"))
    for value in (EMAIL, PHONE, CARD):
        assert value not in shown


def test_pii_redact_mode_redacts_and_continues():
    result = validate_dataset(pii_records(), ValidationSpec(pii_action="redact"))
    assert result.success and result.suite_success  # GX re-checks the redacted text: nothing left
    assert result.pii_found == result.pii_redacted == {"email": 2, "phone": 1, "credit_card": 1}
    assert result.quarantined_count == 0
    texts = result.clean.set_index("record_id")["text"]
    assert texts["greeting-000"] == "please write to [EMAIL] today"
    assert texts["greeting-002"] == "card [CARD] and [EMAIL]"
    assert not texts.str.contains(EMAIL, regex=False).any()


# --------------------------------------------------------------------------- dataset-level checks


@pytest.fixture(scope="module")
def unbalanced():
    frame = records(per_label=30)
    frame = frame[(frame["label"] == "greeting") | (frame.index < 32)].reset_index(drop=True)  # 30 + 2 rows
    frame.loc[20:29, "text"] = frame.loc[0, "text"]  # 10 copies of one text
    spec = ValidationSpec(min_labels=3, min_rows_per_label=5, max_duplicate_ratio=0.05)
    return validate_dataset(frame, spec)


def test_too_few_labels_per_label_minimum_and_duplicates_fail_with_observed_values(unbalanced):
    assert not unbalanced.success and unbalanced.quarantined_count == 0
    assert failed(unbalanced, "min_labels")["observed_value"] == 2
    assert failed(unbalanced, "min_rows_per_label")["observed_value"] == 2
    assert failed(unbalanced, "duplicate_ratio")["observed_value"] == pytest.approx(10 / 32)
    message = unbalanced.failure_message()
    assert "min_labels: expect_column_unique_value_count_to_be_between on 'label': observed 2" in message
    assert "rows per label: {'greeting': 30, 'weather': 2}" in message
    assert "min_rows_per_label: expect_column_min_to_be_between on '__label_rows': observed 2" in message
    assert "labels under 5 rows: {'weather': 2}" in message and "weather-000" in message
    assert "duplicate_ratio: expect_column_mean_to_be_between on '__duplicate': observed 0.3125" in message
    assert "10 of 32 rows repeat an earlier row's text" in message
    assert "Deduplicate upstream" in message
    json.dumps(unbalanced.summary())


# --------------------------------------------------------------------------- user expectations and suites


def test_extra_expectation_is_honoured():
    import great_expectations as gx

    too_many = gx.expectations.ExpectTableRowCountToBeBetween(min_value=1000)
    holds = gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS)
    result = validate_dataset(records(), ValidationSpec(), extra_expectations=[too_many, holds])
    assert not result.success and not result.suite_success
    (entry,) = result.failed_expectations
    assert entry["expectation"] == "expect_table_row_count_to_be_between"
    assert entry["blocking"] is True and entry["observed_value"] == 40
    assert "expect_table_row_count_to_be_between" in result.failure_message()
    assert too_many.id is None  # the caller's object is not taken over by our suite


def test_user_suite_replaces_the_builtin_one():
    import great_expectations as gx

    suite = gx.ExpectationSuite(name="team_suite", expectations=[gx.expectations.ExpectColumnToExist(column="text")])
    result = validate_dataset(dirty_records(), ValidationSpec(), suite=suite)
    assert result.success and result.suite_name == "team_suite"
    assert result.statistics["evaluated_expectations"] == 1
    assert result.quarantined_count == 0  # the built-in row checks are not part of this suite


# --------------------------------------------------------------------------- dialog data, missing columns


def dialog_records() -> pd.DataFrame:
    rows = [
        {"record_id": f"d{i:02d}", "prompt": f"how is the weather on day {i}?", "response": f"sunny, {i} degrees"}
        for i in range(40)
    ]
    rows[7]["response"] = " ".join(["word"] * 25)
    return pd.DataFrame(rows)


def test_dialog_data_uses_prompt_and_response_with_whitespace_token_counts():
    spec = ValidationSpec(max_tokens=20, max_quarantine_fraction=0.05)
    result = validate_dataset(dialog_records(), spec)
    assert result.success, result.failure_message()
    assert result.text_columns == ["prompt", "response"]
    assert result.token_count_source == "whitespace"
    assert reasons(result) == {"d07": "token_length:32>20"}
    assert result.clean_count == 39 and "__whitespace_tokens" not in result.clean.columns


def test_missing_text_column_is_a_failed_expectation_not_a_crash():
    result = validate_dataset(dialog_records(), ValidationSpec(text_columns=["prompt", "answer"]))
    assert not result.success
    entry = failed(result, "missing_column:answer")
    assert entry["expectation"] == "expect_column_to_exist" and entry["blocking"]
    assert "Set text_columns / label_column" in result.failure_message()


def test_invalid_character_ratio_tolerates_a_stray_character():
    frame = records()
    frame.loc[0, "text"] = "a long enough sentence with one stray \x07 control character in it"
    frame.loc[1, "text"] = "\ufffd\ufffd\ufffd ok"
    result = validate_dataset(frame, ValidationSpec(max_invalid_char_ratio=0.1, max_quarantine_fraction=0.05))
    assert reasons(result) == {"greeting-001": "invalid_chars:text"}
    assert result.success


# --------------------------------------------------------------------------- bad input


def test_empty_frame_and_missing_record_id_are_clear_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="dataset is empty"):
        validate_dataset(records().iloc[0:0], ValidationSpec(), docs_dir=tmp_path)
    with pytest.raises(ValueError, match="'record_id'"):
        validate_dataset(records().drop(columns="record_id"), ValidationSpec(), docs_dir=tmp_path)
