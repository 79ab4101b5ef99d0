"""The server ships its rotated request-log files to an fsspec URI (``--request-log-ship-uri``), where the drift
check reads them like a local log; a failing upload never breaks serving and is retried."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_module

from airflow_llmops.ml.drift import read_window
from airflow_llmops.serving.config import ENV_REQUEST_LOG_SHIP_URI, ServerConfig, VariantSpec
from airflow_llmops.serving.request_log import (
    ENV_SERVER_ID,
    SHIPPED_FILE,
    RequestLogShipper,
    RequestLogWriter,
    log_files,
    read_request_log,
    shipped_name,
)
from airflow_llmops.serving.server import build_parser, config_from_args

require_module("fastapi")


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def config(tmp_path: Path, ship_uri: str, **kwargs: Any) -> ServerConfig:
    return ServerConfig(
        variants=[VariantSpec(name="clf", source="echo://")],
        request_log_max_bytes=1024,  # the smallest: a few requests rotate the file
        request_log_ship_uri=ship_uri,
        wait_for_models_s=30,
        **kwargs,
    )


def send(client: Any, start: int, n: int) -> None:
    for i in range(start, start + n):
        answer = client.post("/v1/classify", json={"inputs": f"request {i} " + "x" * 200})
        assert answer.status_code == 200, answer.text


def shipped(folder: Path) -> list[Path]:
    return sorted(folder.glob("requests-*.jsonl"))


def test_rotated_files_are_shipped_with_the_same_rows_and_the_drift_reader_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from airflow_llmops.serving.app import create_app

    monkeypatch.setenv(ENV_SERVER_ID, "replica a/1")
    local, ship = tmp_path / "requests", tmp_path / "ship"
    start = time.time()
    with TestClient(create_app(config(tmp_path, f"file://{ship}", request_log=local))) as client:
        writer: RequestLogWriter = client.app.state.llmops.request_log  # type: ignore[attr-defined]
        assert writer.shipper is not None and writer.shipper.server == "replica_a_1"
        send(client, 0, 20)
        writer.flush()
        # Shipped while serving: every closed file (all but the one being written).
        wait_for(lambda: len(shipped(ship)) >= len(list(local.glob("requests-*.jsonl"))) - 1 >= 2, "rotated files")
        assert len(shipped(ship)) == len(list(local.glob("requests-*.jsonl"))) - 1
    # A clean shutdown ships the last file too.
    names = sorted(p.name for p in local.glob("requests-*.jsonl"))
    assert [p.name for p in shipped(ship)] == [shipped_name(n, "replica_a_1") for n in names]
    assert all(n.startswith("requests-") and n.endswith("-replica_a_1.jsonl") for n in (p.name for p in shipped(ship)))
    for name in names:
        assert (ship / shipped_name(name, "replica_a_1")).read_bytes() == (local / name).read_bytes()
    assert not list(ship.glob("*.part"))
    assert sorted((local / SHIPPED_FILE).read_text().split()) == names
    # The shipped names still carry their start time, and the rows read back in order.
    assert [s for _, s in log_files(ship)] == [s for _, s in log_files(local)]
    rows = list(read_request_log(ship))
    assert [r["input"] for r in rows] == [f"request {i} " + "x" * 200 for i in range(20)]
    assert rows == list(read_request_log(local))
    # What DriftCheckOperator(request_log_uri=<ship folder>) reads: a window of the shipped files.
    window = read_window(f"file://{ship}", start - 1, time.time() + 1)
    assert len(window.data) == 20 and window.files_read == len(names) and window.corrupt_lines == 0
    assert set(window.data["variant"]) == {"clf"} and set(window.data["status"]) == {200}


def test_a_failing_upload_does_not_break_serving_and_is_retried_at_the_next_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from airflow_llmops.serving.app import create_app

    monkeypatch.setenv(ENV_SERVER_ID, "r1")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the ship folder should be")
    local, ship = tmp_path / "requests", blocker / "ship"
    with TestClient(create_app(config(tmp_path, str(ship), request_log=local))) as client:
        writer: RequestLogWriter = client.app.state.llmops.request_log  # type: ignore[attr-defined]
        shipper = writer.shipper
        assert shipper is not None
        send(client, 0, 10)  # rotations, each upload fails: requests are still answered
        writer.flush()
        wait_for(lambda: shipper.failures > 0, "a failed upload")
        assert shipper.pending() and not (local / SHIPPED_FILE).exists()
        blocker.unlink()  # the target becomes writable
        send(client, 10, 10)  # the next rotation ships what is left
        writer.flush()
        wait_for(lambda: len(shipper.pending()) == 0, "the retry")
    names = sorted(p.name for p in local.glob("requests-*.jsonl"))
    assert [p.name for p in shipped(ship)] == [shipped_name(n, "r1") for n in names]
    assert len(list(read_request_log(ship))) == 20


def test_a_restarted_shipper_ships_only_what_is_left(tmp_path: Path) -> None:
    local, ship = tmp_path / "requests", tmp_path / "ship"
    writer = RequestLogWriter(local, max_bytes=1024, shipper=RequestLogShipper(local, str(ship), server="s"))
    for i in range(20):
        writer.append({"ts": time.time(), "input": f"{i}" + "x" * 100})
    writer.close()
    first = {p.name: p.stat().st_mtime_ns for p in shipped(ship)}
    assert len(first) == len(list(local.glob("requests-*.jsonl"))) > 2
    (local / "requests-20000101T000000000000Z.jsonl").write_text('{"ts": 1}\n')  # left by a crashed run
    again = RequestLogShipper(local, str(ship), server="s")
    again.close()
    now = {p.name: p.stat().st_mtime_ns for p in shipped(ship)}
    assert set(now) == {*first, shipped_name("requests-20000101T000000000000Z.jsonl", "s")}
    assert all(now[name] == mtime for name, mtime in first.items()), "a shipped file was shipped again"


def test_without_a_request_log_folder_the_log_passes_through_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from airflow_llmops.serving.app import create_app

    ship = tmp_path / "ship"
    monkeypatch.setenv(ENV_REQUEST_LOG_SHIP_URI, f"file://{ship}")  # how a cloud runtime sets it
    with TestClient(create_app(ServerConfig(variants=[VariantSpec(name="clf", source="echo://")]))) as client:
        writer: RequestLogWriter = client.app.state.llmops.request_log  # type: ignore[attr-defined]
        folder = writer.folder
        send(client, 0, 3)
    assert len(list(read_request_log(ship))) == 3
    assert not folder.exists(), "the temporary folder is removed once everything is shipped"


def test_ship_uri_option_and_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_REQUEST_LOG_SHIP_URI, raising=False)
    base = ["--model", "clf=echo://"]
    assert config_from_args(build_parser().parse_args(base)).request_log_ship_uri is None
    monkeypatch.setenv(ENV_REQUEST_LOG_SHIP_URI, "gs://bucket/endpoints/clf/requests")
    assert config_from_args(build_parser().parse_args(base)).request_log_ship_uri == (
        "gs://bucket/endpoints/clf/requests"
    )
    given = build_parser().parse_args([*base, "--request-log-ship-uri", "s3://b/p"])
    assert config_from_args(given).request_log_ship_uri == "s3://b/p"
