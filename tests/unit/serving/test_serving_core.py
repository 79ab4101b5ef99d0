"""The server's parts without a server: batching, metrics snapshots, the request log, config parsing, routing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from airflow_llmops.serving.batching import Batcher
from airflow_llmops.serving.config import ServerConfig, VariantSpec, parse_model_arg
from airflow_llmops.serving.errors import BadRequest, NotFound
from airflow_llmops.serving.request_log import RequestLogWriter, read_request_log
from airflow_llmops.serving.schemas import UpdateVariantRequest
from airflow_llmops.serving.telemetry import Telemetry, percentile
from airflow_llmops.serving.variants import VariantRegistry


def test_model_argument_parsing() -> None:
    spec = parse_model_arg("champion=models:/clf@champion:90")
    assert (spec.name, spec.source, spec.weight) == ("champion", "models:/clf@champion", 90.0)
    assert parse_model_arg("v=models:/clf/3").source == "models:/clf/3"
    assert parse_model_arg("a=file:///m/clf").source == "file:///m/clf"
    shadow = parse_model_arg("s=echo://:25", shadow=True)
    assert shadow.shadow and shadow.weight == 0 and shadow.mirror_percent == 25.0
    for bad in ("nosource", "=x", "bad name=x", "a=echo://:-1"):
        with pytest.raises(ValueError):
            parse_model_arg(bad)
    with pytest.raises(ValueError, match="unique"):
        ServerConfig(variants=[VariantSpec(name="a", source="echo://")] * 2)


def test_batcher_groups_concurrent_requests_and_isolates_a_bad_one() -> None:
    calls: list[list[str]] = []

    def run(batch: Sequence[list[str]]) -> list[list[str] | BaseException]:
        flat = [t for texts in batch for t in texts]
        calls.append(flat)
        if "boom" in flat:
            raise ValueError("boom in batch")
        return [[t.upper() for t in texts] for texts in batch]

    async def main() -> list[object]:
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        batcher: Batcher[list[str], list[str]] = Batcher("t", run, executor, max_size=8, max_delay_s=0.05, size_of=len)
        batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit([f"t{i}"]) for i in range(6)))
            mixed = await asyncio.gather(batcher.submit(["ok"]), batcher.submit(["boom"]), return_exceptions=True)
            big = await batcher.submit([f"b{i}" for i in range(20)])  # one request over max_size still runs
            return [first, mixed, big]
        finally:
            await batcher.stop()
            executor.shutdown()

    first, mixed, big = asyncio.run(main())
    assert first == [[f"T{i}"] for i in range(6)]
    assert calls[0] == [f"t{i}" for i in range(6)], "six concurrent requests, one call"
    assert mixed[0] == ["OK"] and isinstance(mixed[1], ValueError)  # type: ignore[index]
    assert len(big) == 20  # type: ignore[arg-type]


def test_batcher_splits_at_max_size() -> None:
    sizes: list[int] = []

    def run(batch: Sequence[int]) -> list[int | BaseException]:
        sizes.append(len(batch))
        return list(batch)

    async def main() -> None:
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        batcher: Batcher[int, int] = Batcher("t", run, executor, max_size=4, max_delay_s=1.0)
        batcher.start()
        started = time.monotonic()
        assert await asyncio.gather(*(batcher.submit(i) for i in range(8))) == list(range(8))
        assert time.monotonic() - started < 0.9, "full batches run without waiting for the delay"
        await batcher.stop()
        executor.shutdown()

    asyncio.run(main())
    assert sizes == [4, 4]


def test_metrics_snapshot_counts_since_a_timestamp() -> None:
    telemetry = Telemetry()
    for ms in (10, 20, 30, 40):
        telemetry.observe("a", "/v1/classify", shadow=False, latency_s=ms / 1000, error=ms == 40, tokens_in=3)
    snap = telemetry.snapshot("a", since=0)
    assert (snap["requests"], snap["errors"], snap["error_rate"], snap["tokens_in"]) == (4, 1, 0.25, 12)
    assert snap["p50_latency_ms"] == pytest.approx(25.0)
    assert snap["p95_latency_ms"] == pytest.approx(38.5)
    assert telemetry.snapshot("a", since=time.time() + 1)["requests"] == 0
    assert telemetry.snapshot("unknown", since=0)["p95_latency_ms"] is None
    telemetry.forget("a")
    assert telemetry.snapshot("a", since=0)["requests"] == 0
    assert percentile([1.0], 95) == 1.0 and percentile([], 50) is None


def test_request_log_rotates_by_size_and_reads_back(tmp_path: Path) -> None:
    writer = RequestLogWriter(tmp_path, max_bytes=1024, max_age_s=3600)
    for i in range(40):
        writer.append({"ts": time.time(), "request_id": str(i), "input": "x" * 100})
    writer.flush()
    writer.close()
    files = sorted(tmp_path.glob("requests-*.jsonl"))
    assert len(files) > 3, "rotated by size"
    assert [r["request_id"] for r in read_request_log(tmp_path)] == [str(i) for i in range(40)]
    # A line cut short by a crash is skipped, not fatal.
    with files[-1].open("a") as out:
        out.write('{"ts": 1, "request_')
    assert len(list(read_request_log(tmp_path))) == 40
    assert list(read_request_log(tmp_path, since=time.time() + 10)) == []


def test_request_log_appends_do_not_wait_for_the_disk(tmp_path: Path) -> None:
    dropped = threading.Event()
    writer = RequestLogWriter(tmp_path, max_queue=1, on_drop=dropped.set)
    for i in range(10_000):  # far faster than the writer thread: the queue fills and records are dropped
        writer.append({"i": i})
        if dropped.is_set():
            break
    writer.close()
    assert dropped.is_set()


def test_registry_weights_validation_and_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    config = ServerConfig(
        variants=[VariantSpec(name="a", source="echo://", weight=1), VariantSpec(name="b", source="echo://", weight=0)],
        state_file=state,
    )

    async def main() -> None:
        registry = VariantRegistry(config, Telemetry())
        await registry.start()
        await asyncio.sleep(0)  # let the echo loads finish
        for _ in range(100):
            if all(v.status == "ready" for v in registry.variants.values()):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(NotFound, match=r"unknown variant\(s\) \['c'\]"):
            registry.set_weights({"c": 1})
        with pytest.raises(BadRequest, match="would leave no traffic"):
            registry.set_weights({"a": 0})
        registry.set_weights({"a": 1, "b": 3})
        assert registry.traffic_percent(registry.variants["b"].spec) == 75.0
        assert {registry.pick("classify", None).name for _ in range(200)} == {"a", "b"}
        assert registry.pick("generate", "a").name == "a"
        registry.update("b", UpdateVariantRequest(shadow=True, mirror_percent=0))
        assert registry.shadows_for("classify") == []
        with pytest.raises(BadRequest, match="shadows and take no traffic weight"):
            registry.set_weights({"b": 1})
        await registry.close()

    asyncio.run(main())
    saved = json.loads(state.read_text())
    assert [(v["name"], v["weight"], v["shadow"]) for v in saved["variants"]] == [("a", 1.0, False), ("b", 3.0, True)]
