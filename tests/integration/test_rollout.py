"""Canary rollouts on the local platform, in real Airflow runs against a real model server under steady load:
a broken version is rolled back automatically while the old one answers every request; a good one takes over
with zero failed requests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

LABELS = ["ai", "food", "greetings", "money"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from airflow_llmops.ml.models import resolve_model_path

    source = resolve_model_path("all-MiniLM-L6-v2")
    folder = tmp_path_factory.mktemp("classifier")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(source), num_labels=4, id2label=dict(enumerate(LABELS)), label2id={v: i for i, v in enumerate(LABELS)}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    from airflow_llmops.platforms import get_platform

    root = tmp_path_factory.mktemp("endpoints")
    yield root
    get_platform("local", endpoints_root=str(root)).stop_endpoint("topics")


class Load:
    """Steady traffic from another thread: ~``rate`` classify requests a second, each answer recorded."""

    def __init__(self, url: str, rate: float = 20.0) -> None:
        self.url, self.period = url, 1.0 / rate
        self.results: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/v1/classify", json={"inputs": "what do you like to eat?"})
                    variant = response.json().get("variant") if response.status_code == 200 else None
                    self.results.append((time.time(), response.status_code, variant))
                except httpx.HTTPError:
                    self.results.append((time.time(), 0, None))
                self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _run(conf):
    from dags_under_test import load_dag

    dag = load_dag("llmops_test_rollout", folder="tests/dags", module="llmops_test_rollout", attr="rollout_dag")
    return dag.test(run_conf=conf)


def _variants(endpoints: Path) -> dict[str, float]:
    from airflow_llmops.platforms import EndpointHandle, get_platform

    platform = get_platform("local", endpoints_root=str(endpoints))
    return dict(platform.get_traffic(EndpointHandle("local", "topics")))


def test_a_broken_canary_rolls_back_and_a_good_one_takes_over_under_load(airflow_db, classifier, endpoints, capfd):
    base = {"model_uri": str(classifier), "endpoints_root": str(endpoints)}
    first = _run({**base, "variant": "v1"})
    assert first.state == "success", {t.task_id: t.state for t in first.get_task_instances()}
    url = first.get_task_instance("deploy").xcom_pull(task_ids="deploy")["url"]
    assert _variants(endpoints) == {"v1": 100.0}

    with Load(url) as load:
        time.sleep(1)
        broken = _run({**base, "variant": "v2", "error_rate": 0.5})
        time.sleep(1)
    states = {t.task_id: t.state for t in broken.get_task_instances()}
    assert states["rollout"] == "failed", states
    out, err = capfd.readouterr()
    assert "rolled_back" in out + err and "error rate" in out + err and "> max_error_rate 5.00%" in out + err
    assert _variants(endpoints) == {"v1": 100.0}  # the new variant is gone, the old one serves everything
    old = [r for r in load.results if r[2] == "v1"]
    assert len(old) > 20 and all(status == 200 for _, status, _ in old)
    served = [r for r in load.results if r[1] == 200]
    assert len(served) >= len(load.results) - sum(1 for r in load.results if r[1] == 500)
    assert all(status in (200, 500) for _, status, _ in load.results)  # only the injected faults fail

    with Load(url) as load:
        time.sleep(1)
        good = _run({**base, "variant": "v3"})
        time.sleep(1)
    assert good.state == "success", {t.task_id: t.state for t in good.get_task_instances()}
    failed = [r for r in load.results if r[1] != 200]
    assert len(load.results) > 100 and failed == [], failed[:5]
    assert {r[2] for r in load.results} == {"v1", "v3"}  # traffic moved over during the canary
    assert _variants(endpoints) == {"v3": 100.0}
    steps = good.get_task_instance("rollout").xcom_pull(task_ids="rollout")["steps"]
    assert [s["percent"] for s in steps] == [10, 50, 100] and all(s["ok"] for s in steps)
