"""Endpoint health as numbers: the snapshot → metrics arithmetic, and the schedule switch of the reference DAGs."""

from __future__ import annotations

import pytest

from airflow_llmops.operators.drift import endpoint_metrics
from airflow_llmops.schedules import reference_schedule


def _snapshot(cpu_seconds: float | None = 7.2) -> dict:
    variants = {
        "v1": {"requests": 300, "errors": 3, "error_rate": 0.01, "p50_latency_ms": 20.0, "p95_latency_ms": 45.0,
               "tokens_in": 6000, "tokens_out": 0, "shadow": False},
        "v2": {"requests": 100, "errors": 0, "error_rate": 0.0, "p50_latency_ms": 18.0, "p95_latency_ms": 40.0,
               "tokens_in": 2000, "tokens_out": 0, "shadow": False},
        "mirror": {"requests": 400, "errors": 0, "error_rate": 0.0, "p50_latency_ms": 19.0, "p95_latency_ms": None,
                   "tokens_in": 8000, "tokens_out": 0, "shadow": True},
    }  # fmt: skip
    process = {} if cpu_seconds is None else {"cpu_seconds": cpu_seconds}
    return {"variants": variants, "process": process}


def test_energy_is_cpu_time_times_watts_shared_over_the_requests_served():
    metrics = endpoint_metrics(_snapshot(), window_minutes=10, watts_per_cpu_core=5.0)
    # Shadow copies cost energy but serve nobody: 400 requests served, not 800.
    assert metrics["endpoint.requests"] == 400 and metrics["endpoint.requests_per_minute"] == 40
    assert metrics["endpoint.energy_wh"] == pytest.approx(7.2 * 5 / 3600)
    assert metrics["endpoint.energy_wh_per_1k_requests"] == pytest.approx(0.01 * 1000 / 400)
    assert metrics["endpoint.energy_wh_per_1k_tokens"] == pytest.approx(0.01 * 1000 / 16000)
    assert metrics["v1.p95_latency_ms"] == 45 and metrics["v1.requests_per_minute"] == 30
    assert "mirror.p95_latency_ms" not in metrics  # no value, no metric (MLflow refuses None)


def test_no_cpu_reading_or_no_traffic_gives_no_energy_per_request():
    assert "endpoint.energy_wh" not in endpoint_metrics(_snapshot(None), window_minutes=10, watts_per_cpu_core=5)
    quiet = endpoint_metrics({"variants": {}, "process": {"cpu_seconds": 0.5}}, window_minutes=60, watts_per_cpu_core=5)
    assert quiet["endpoint.requests"] == 0 and "endpoint.energy_wh_per_1k_requests" not in quiet
    assert quiet["endpoint.energy_wh"] > 0  # an idle server still draws power


@pytest.mark.parametrize(("value", "expected"), [("", "@daily"), ("off", None), ("OFF ", None), ("on", "@daily")])
def test_reference_schedules_switch_off_by_environment(monkeypatch, value, expected):
    monkeypatch.setenv("LLMOPS_REFERENCE_SCHEDULES", value)
    assert reference_schedule("@daily") == expected
