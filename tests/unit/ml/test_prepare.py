"""Data preparation: normalisation, duplicates, stable splits, token counts, manifest and determinism."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from airflow_llmops.ml.data.chatterbot import load_chatterbot, parse_uri
from airflow_llmops.ml.data.errors import DatasetError
from airflow_llmops.ml.data.prepare import normalise_text, prepare_records, serialise
from airflow_llmops.specs import DatasetSpec

SPEC = DatasetSpec(name="t", source="file:///x.jsonl")


def _frame(rows):
    return pd.DataFrame(rows, columns=["text", "label"])


def test_normalisation_folds_unicode_forms_and_whitespace():
    assert normalise_text("  \uff28\uff45\uff4c\uff4c\uff4f\u00a0 wor\tld \r\n again ") == "Hello wor ld again"
    assert normalise_text("e\u0301") == "\u00e9"
    assert normalise_text(None) == "" and normalise_text(float("nan")) == ""


def test_exact_duplicates_after_normalisation_are_removed_and_recorded():
    rows = [("Hello  world", "a"), ("Hello world", "a"), ("Other text here", "b")]
    prepared = prepare_records(_frame(rows), SPEC)
    kept = pd.concat(prepared.splits.values())
    assert sorted(kept["text"]) == ["Hello world", "Other text here"]
    removed = prepared.removed
    assert list(removed["quarantine_reasons"]) == ["exact_duplicate"]
    assert removed["text"].iloc[0] == "Hello world"
    assert prepared.manifest["removed"] == {"exact_duplicate": 1}
    assert prepared.manifest["input_rows"] == 3 and prepared.manifest["output_rows"] == 2


def test_case_only_variants_are_near_duplicates():
    prepared = prepare_records(_frame([("Hello world", "a"), ("hello world", "a")]), SPEC)
    assert prepared.manifest["removed"] == {"near_duplicate_of": 1}


def test_near_duplicates_are_found_with_minhash_and_point_to_the_kept_record():
    base = "The quick brown fox jumps over the lazy dog near the river bank every single morning"
    rows = [
        (base, "a"),
        (base + "!", "a"),
        (base.replace("morning", "mornings"), "a"),
        ("A completely different sentence about training language models on CPUs", "b"),
    ]
    prepared = prepare_records(_frame(rows), SPEC)
    near = prepared.removed[prepared.removed["quarantine_reasons"].str.startswith("near_duplicate_of:")]
    assert len(near) == 2
    kept_ids = set(pd.concat(prepared.splits.values())["record_id"])
    for reason in near["quarantine_reasons"]:
        assert reason.split(":", 1)[1] in kept_ids
    assert prepared.manifest["output_rows"] == 2


def test_same_text_with_different_labels_is_quarantined_as_mislabelled():
    rows = [("Is this spam?", "spam"), ("Is this spam?", "ham"), ("Totally fine message", "ham")]
    prepared = prepare_records(_frame(rows), SPEC)
    conflicts = prepared.removed[prepared.removed["quarantine_reasons"] == "conflicting_labels"]
    assert sorted(conflicts["label"]) == ["ham", "spam"]
    assert list(pd.concat(prepared.splits.values())["text"]) == ["Totally fine message"]


def test_empty_and_oversized_records_are_removed_with_a_reason():
    spec = SPEC.model_copy(update={"max_record_bytes": 1000})
    rows = [("   ", "a"), ("x" * 5000, "a"), ("fine", "a")]
    prepared = prepare_records(_frame(rows), spec)
    reasons = sorted(prepared.removed["quarantine_reasons"])
    assert reasons == ["empty", "too_large:>1000 bytes"]


def test_split_is_stable_per_record_and_close_to_the_fractions():
    rows = [(f"record number {i} about topic {i % 7}", f"l{i % 3}") for i in range(3000)]
    full = prepare_records(_frame(rows), SPEC)
    sizes = {k: len(v) for k, v in full.splits.items()}
    assert abs(sizes["train"] / 3000 - 0.8) < 0.03 and abs(sizes["test"] / 3000 - 0.1) < 0.02
    # Labels are spread over every split (stratified in expectation by the per-record hash).
    for split in full.splits.values():
        assert set(split["label"]) == {"l0", "l1", "l2"}
    # A backfill that sees only part of the data puts each record in the same split as before.
    part = prepare_records(_frame(rows[::3]), SPEC)
    where = {rid: s for s, f in full.splits.items() for rid in f["record_id"]}
    for name, frame in part.splits.items():
        assert all(where[rid] == name for rid in frame["record_id"])
    salted = prepare_records(
        _frame(rows), SPEC.model_copy(update={"split": SPEC.split.model_copy(update={"salt": "b"})})
    )
    assert set(salted.splits["test"]["record_id"]) != set(full.splits["test"]["record_id"])


def test_output_is_byte_identical_on_rerun_and_on_reordered_input():
    rows = [(f"sentence {i} with some words", f"l{i % 4}") for i in range(400)] + [("dup", "x")] * 3
    first = serialise(prepare_records(_frame(rows), SPEC))
    again = serialise(prepare_records(_frame(rows), SPEC))
    shuffled = serialise(prepare_records(_frame(rows).sample(frac=1, random_state=7), SPEC))
    assert first == again == shuffled
    manifest = json.loads(first["manifest.json"])
    assert set(manifest["files"]) == {"train.parquet", "validation.parquet", "test.parquet", "removed.parquet"}
    assert len(manifest["content_hash"]) == 64
    assert manifest["schema"] == {"record_id": "object", "text": "object", "label": "object", "n_tokens": "int64"}
    assert sum(manifest["splits"]["train"]["labels"].values()) == manifest["splits"]["train"]["rows"]
    train = pd.read_parquet(io.BytesIO(first["train.parquet"]))
    assert len(train) == manifest["splits"]["train"]["rows"]


def test_token_counts_come_from_the_given_tokenizer():
    calls = []

    def count(texts):
        calls.append(len(texts))
        return [len(t) for t in texts]  # a character "tokenizer" makes the source of the numbers visible

    prepared = prepare_records(
        _frame([("abcd", "a"), ("abcdefgh", "b")]), SPEC, count_tokens=count, tokenizer_name="chars"
    )
    tokens = dict(
        zip(pd.concat(prepared.splits.values())["text"], pd.concat(prepared.splits.values())["n_tokens"], strict=True)
    )
    assert tokens == {"abcd": 4, "abcdefgh": 8} and calls == [2]
    assert prepared.manifest["tokenizer"] == "chars"


def test_missing_columns_name_what_was_expected_and_found():
    with pytest.raises(DatasetError, match=r"no column\(s\) \['label'\]; found \['text', 'category'\]"):
        prepare_records(pd.DataFrame({"text": ["a"], "category": ["b"]}), SPEC)
    with pytest.raises(DatasetError, match="0 readable rows"):
        prepare_records(pd.DataFrame(), SPEC)


def test_dialog_records_use_prompt_and_response():
    spec = DatasetSpec(name="d", source="chatterbot://english", task="causal_lm")
    frame = pd.DataFrame({"prompt": ["Hi", "Hi"], "response": ["Hello!", "Hey"], "label": ["g", "g"]})
    prepared = prepare_records(frame, spec)
    assert set(pd.concat(prepared.splits.values())["response"]) == {"Hello!", "Hey"}


def test_chatterbot_source_gives_topics_and_dialog_pairs():
    assert parse_uri("chatterbot://english?topics=ai,food") == ("english", ["ai", "food"])
    topics = load_chatterbot("chatterbot://english?topics=ai,food")
    assert set(topics["label"]) == {"ai", "food"} and list(topics.columns) == ["text", "label"]
    dialog = load_chatterbot("chatterbot://spanish", kind="dialog")
    assert list(dialog.columns) == ["prompt", "response", "label"] and len(dialog) > 50
    with pytest.raises(DatasetError, match="no language 'klingon'"):
        load_chatterbot("chatterbot://klingon")
    with pytest.raises(DatasetError, match=r"no topics \['cooking'\]"):
        load_chatterbot("chatterbot://english?topics=cooking")
