"""Reading JSONL, CSV and Parquet: good files load, bad ones fail clearly or quarantine their bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from airflow_llmops.ml.data.errors import DatasetError
from airflow_llmops.ml.data.sources import read_table


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reads_each_format_and_folders(tmp_path):
    rows = [{"text": "héllo", "label": "a"}, {"text": "wörld", "label": "b"}]
    _jsonl(tmp_path / "a.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    for name, fmt in (("a.jsonl", "jsonl"), ("b.csv", "csv"), ("c.parquet", "parquet")):
        records, bad = read_table(tmp_path / name, fmt)
        assert list(records["text"]) == ["héllo", "wörld"] and bad.empty
    folder = tmp_path / "parts"
    folder.mkdir()
    _jsonl(folder / "part-0.jsonl", rows[:1])
    _jsonl(folder / "part-1.jsonl", rows[1:])
    (folder / "_SUCCESS").write_text("")
    records, _ = read_table(folder, "jsonl")
    assert list(records["text"]) == ["héllo", "wörld"]


def test_missing_path_and_empty_inputs_fail_clearly(tmp_path):
    with pytest.raises(DatasetError, match=r"no file or folder at .*nope\.jsonl"):
        read_table(tmp_path / "nope.jsonl", "jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="holds no records"):
        read_table(tmp_path / "empty.jsonl", "jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetError, match="holds no records"):
        read_table(tmp_path / "empty.csv", "csv")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DatasetError, match="holds no csv files"):
        read_table(tmp_path / "dir", "csv")


def test_bad_jsonl_lines_are_quarantined_with_reasons_not_dropped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"text": "good", "label": "a"}\n')
        handle.write(b'{"text": "caf\xe9", "label": "a"}\n')  # latin-1 byte
        handle.write(b'{"text": broken\n')
        handle.write(b"[1, 2]\n")
        handle.write(b'{"text": "' + b"x" * 2_000 + b'", "label": "a"}\n')
        handle.write(b'{"text": "also good", "label": "b"}\n')
    records, bad = read_table(path, "jsonl", max_record_bytes=1_000)
    assert list(records["text"]) == ["good", "also good"]
    assert list(records["_source_line"]) == [1, 6]
    reasons = dict(zip(bad["line"], bad["quarantine_reasons"], strict=True))
    assert reasons[2].startswith("invalid_utf8")
    assert reasons[3].startswith("invalid_json")
    assert reasons[4] == "not_an_object:list"
    assert reasons[5].startswith("too_large:")


def test_a_50_mb_single_row_is_quarantined_without_loading_it_as_text(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"text": "' + b"a" * 50_000_000 + b'", "label": "a"}\n')
        handle.write(b'{"text": "small", "label": "a"}\n')
    records, bad = read_table(path, "jsonl")
    assert list(records["text"]) == ["small"]
    assert bad["raw_bytes"].iloc[0] > 50_000_000 and len(bad["raw_preview"].iloc[0]) <= 200


def test_non_utf8_csv_names_the_byte_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,a\ncafé,b\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"not valid UTF-8: byte 0xe9 at offset \d+ \(line 3\); re-encode"):
        read_table(path, "csv")


def test_truncated_parquet_fails_clearly(tmp_path):
    good = tmp_path / "good.parquet"
    pd.DataFrame({"text": ["a"] * 100, "label": ["x"] * 100}).to_parquet(good)
    data = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"not a readable Parquet file .* truncated"):
        read_table(tmp_path / "cut.parquet", "parquet")
