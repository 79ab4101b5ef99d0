"""The model server as a real process: inference (classify, OpenAI completions and chat, streaming), traffic split,
shadow copies, failure injection, the admin API and its client, limits on bad input, the request log."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import require_module
from test_serving_models import LABELS, Server, build_classifier, build_tiny_lm, start_server

from airflow_llmops.serving.client import ServingClient, ServingClientError
from airflow_llmops.serving.request_log import read_request_log

pytestmark = pytest.mark.integration

ADMIN = "admin-secret"
API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
TIMEOUT = 60.0


def wait_for(check: Callable[[], Any], *, timeout: float = 30.0, what: str) -> Any:
    """Poll until ``check()`` is truthy; the timeout is a bound, never the assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


@pytest.fixture(scope="module")
def models_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The MiniLM classifier and the tiny GPT-2 side by side, with an API key, admin token and request log."""
    work = tmp_path_factory.mktemp("serve-models")
    clf, lm = build_classifier(), build_tiny_lm()
    server = start_server(
        work,
        "--model", f"clf={clf}",
        "--model", f"lm=file://{lm}:1",
        "--admin-token", ADMIN,
        "--request-log", str(work / "requests"),
        "--state-file", str(work / "state.json"),
        "--max-batch-delay-ms", "20",
        env={"LLMOPS_API_KEY": API_KEY},
        timeout=180,
    )  # fmt: skip
    yield server
    server.process.stop()


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[Server]:
    """A server of trivial ``echo://`` variants: routing, shadowing and faults without model cost (failure
    injection is a test feature the server refuses unless started with --enable-fault-injection)."""
    server = start_server(
        tmp_path,
        "--model", "base=echo://:1",
        "--admin-token", ADMIN,
        "--request-log", str(tmp_path / "requests"),
        "--state-file", str(tmp_path / "state.json"),
        "--max-batch-delay-ms", "0",
        "--enable-fault-injection",
    )  # fmt: skip
    yield server
    server.process.stop()


HTTP = httpx.Client(timeout=TIMEOUT)  # one pool for the module: a client per call costs ~50 ms


def classify(url: str, inputs: Any, **headers: str) -> httpx.Response:
    return HTTP.post(f"{url}/v1/classify", json={"inputs": inputs}, headers={**AUTH, **headers})


# ---- models server ----------------------------------------------------------------------------------------------


def test_health_readiness_and_model_list(models_server: Server) -> None:
    url = models_server.url
    assert httpx.get(f"{url}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz", timeout=TIMEOUT).json() == {
        "ready": True,
        "variants": {"clf": "ready", "lm": "ready"},
    }
    models = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["llmops", "clf", "lm"]


def test_classify_one_text_or_many(models_server: Server) -> None:
    one = classify(models_server.url, "hello there")
    assert one.status_code == 200, one.text
    assert one.headers["X-LLMOps-Variant"] == "clf"
    body = one.json()
    assert body["variant"] == "clf" and len(body["results"]) == 1
    result = body["results"][0]
    assert result["label"] in LABELS.values() and set(result["scores"]) == set(LABELS.values())
    many = classify(models_server.url, ["hello there", "pizza please", "my bank account"]).json()
    assert len(many["results"]) == 3
    assert many["results"][0]["label"] == result["label"]
    assert many["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]


def test_admin_snapshot_counts_the_servers_cpu_time_for_energy_per_request(models_server: Server) -> None:
    from airflow_llmops.operators.drift import endpoint_metrics

    client = ServingClient(models_server.url, ADMIN)
    since = time.time()
    texts = [f"do you like {food} and a long sentence to make the model work a little" for food in range(40)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda t: classify(models_server.url, t), texts))
    snapshot = client.metrics_snapshot(since)
    process = snapshot["process"]
    # Forty forward passes of MiniLM are real work; the window starts no earlier than the sample before `since`.
    assert process["cpu_seconds"] > 0.05, process
    assert process["cpu_seconds_total"] >= process["cpu_seconds"]
    metrics = endpoint_metrics(snapshot, window_minutes=1.0, watts_per_cpu_core=5.0)
    assert metrics["clf.requests"] == 40 and metrics["endpoint.requests"] == 40
    assert metrics["endpoint.energy_wh"] == pytest.approx(process["cpu_seconds"] * 5.0 / 3600)
    assert metrics["endpoint.energy_wh_per_1k_requests"] == pytest.approx(metrics["endpoint.energy_wh"] * 1000 / 40)
    assert metrics["endpoint.energy_wh_per_1k_tokens"] > 0  # classify counts prompt tokens


def test_concurrent_classify_requests_share_forward_passes(models_server: Server) -> None:
    def batches() -> tuple[float, float]:
        text = httpx.get(f"{models_server.url}/metrics", timeout=TIMEOUT).text
        count = total = 0.0
        for line in text.splitlines():
            if line.startswith('llmops_batch_size_count{variant="clf"}'):
                count = float(line.split()[-1])
            if line.startswith('llmops_batch_size_sum{variant="clf"}'):
                total = float(line.split()[-1])
        return count, total

    before = batches()
    texts = [f"sentence number {i} about food and money" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda t: classify(models_server.url, t), texts))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    after = batches()
    forward_passes, texts_run = after[0] - before[0], after[1] - before[1]
    assert texts_run == 24
    assert forward_passes < 24, "concurrent requests should have been batched"


def test_completions_and_streaming_give_the_same_text(models_server: Server) -> None:
    url = models_server.url
    payload = {"model": "llmops", "prompt": "hello there", "max_tokens": 10, "temperature": 0}
    plain = httpx.post(f"{url}/v1/completions", json=payload, headers=AUTH, timeout=TIMEOUT)
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "text_completion" and body["model"] == "lm"
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 10
    with httpx.stream("POST", f"{url}/v1/completions", json={**payload, "stream": True}, headers=AUTH,
                      timeout=TIMEOUT) as stream:  # fmt: skip
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_openai_client_talks_to_completions_and_chat(models_server: Server) -> None:
    openai = require_module("openai")
    client = openai.OpenAI(base_url=f"{models_server.url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)
    completion = client.completions.create(model="llmops", prompt="hello", max_tokens=6, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(model="lm", prompt="hello", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model="llmops", messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens <= 6
    stream = client.chat.completions.create(
        model="llmops", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    bad = openai.OpenAI(base_url=f"{models_server.url}/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.completions.create(model="llmops", prompt="hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="hello", max_tokens=2)


BAD_REQUESTS = [
    # (name, method, path, kwargs, status, words in the message)
    ("malformed JSON", "POST", "/v1/classify", {"content": b'{"inputs": ["unterminated'}, 400, "not valid JSON"),
    ("inputs of the wrong type", "POST", "/v1/classify", {"json": {"inputs": 42}}, 422, "inputs: Input should be"),
    ("empty input list", "POST", "/v1/classify", {"json": {"inputs": []}}, 422, "at least 1 item"),
    ("unknown field", "POST", "/v1/classify", {"json": {"inputs": "x", "top": 2}}, 422, "top: Extra inputs"),
    ("prompt of the wrong type", "POST", "/v1/completions", {"json": {"prompt": {"a": 1}}}, 422, "prompt"),
    ("10 MB prompt", "POST", "/v1/completions", {"json": {"prompt": "x" * 10_000_000}}, 413, "at most 1048576"),
    ("max_tokens=10**9", "POST", "/v1/completions", {"json": {"prompt": "hi", "max_tokens": 10**9}}, 400,
     "max_tokens=1000000000 is above this server's limit"),
    ("negative max_tokens", "POST", "/v1/completions", {"json": {"prompt": "hi", "max_tokens": -1}}, 422,
     "max_tokens: Input should be greater than or equal to 1"),
    ("prompt longer than the context", "POST", "/v1/completions", {"json": {"prompt": "hello " * 300}}, 400,
     "context is 64 tokens"),
    ("prompt over the character limit", "POST", "/v1/classify", {"json": {"inputs": "x" * 40_000}}, 400,
     "at most 32000 (--max-prompt-chars)"),
    ("lone surrogate", "POST", "/v1/classify", {"content": b'{"inputs": "\\ud800"}'}, 422, "lone surrogate"),
    ("chat without messages", "POST", "/v1/chat/completions", {"json": {"messages": []}}, 422, "messages"),
    ("classify on a generator", "POST", "/v1/classify",
     {"json": {"inputs": "x"}, "headers": {"X-LLMOps-Variant": "lm"}}, 400, "cannot classify"),
    ("unknown pinned variant", "POST", "/v1/classify",
     {"json": {"inputs": "x"}, "headers": {"X-LLMOps-Variant": "nope"}}, 404, "unknown variant 'nope'"),
    ("no API key", "POST", "/v1/classify", {"json": {"inputs": "x"}, "headers": {"Authorization": ""}}, 401,
     "missing API key"),
    ("no admin token", "GET", "/admin/variants", {"headers": {"Authorization": ""}}, 401, "missing admin token"),
    ("wrong admin token", "GET", "/admin/variants", {"headers": {"Authorization": "Bearer nope"}}, 403,
     "wrong admin token"),
    ("unknown variant in weights", "PUT", "/admin/weights", {"json": {"weights": {"nope": 1}}, "admin": True}, 404,
     "unknown variant(s) ['nope']"),
    ("negative weight", "PUT", "/admin/weights", {"json": {"weights": {"clf": -1}}, "admin": True}, 422,
     "greater than or equal to 0"),
    ("weights summing to zero", "PUT", "/admin/weights", {"json": {"weights": {"clf": 0, "lm": 0}}, "admin": True},
     400, "would leave no traffic"),
    ("remove an unknown variant", "DELETE", "/admin/variants/nope", {"admin": True}, 404, "unknown variant 'nope'"),
    ("add a variant whose source is missing", "POST", "/admin/variants",
     {"json": {"name": "ghost", "source": "/does/not/exist"}, "admin": True}, 422, "does not exist"),
    ("add a variant with a bad name", "POST", "/admin/variants",
     {"json": {"name": "../x", "source": "echo://"}, "admin": True}, 422, "name: String should match pattern"),
    ("add a variant twice", "POST", "/admin/variants", {"json": {"name": "clf", "source": "echo://"}, "admin": True},
     409, "variant 'clf' exists"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status", "words"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(
    models_server: Server, name: str, method: str, path: str, kwargs: dict[str, Any], status: int, words: str
) -> None:
    kwargs = dict(kwargs)
    headers = {**(ADMIN_AUTH if kwargs.pop("admin", False) else AUTH), **kwargs.pop("headers", {})}
    if "content" in kwargs:
        headers["Content-Type"] = "application/json"
    headers = {k: v for k, v in headers.items() if v}
    response = httpx.request(method, f"{models_server.url}{path}", headers=headers, timeout=TIMEOUT, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert words in message, message
    assert classify(models_server.url, "still serving?").status_code == 200


def test_prometheus_metrics_and_request_log(models_server: Server) -> None:
    url = models_server.url
    response = classify(url, ["log me", "and me"], **{"X-Request-Id": "req-log-test-1"})
    assert response.headers["X-Request-Id"] == "req-log-test-1"
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    assert 'llmops_requests_total{endpoint="/v1/classify",shadow="false",variant="clf"}' in text
    assert 'llmops_request_latency_seconds_bucket{le="0.5",shadow="false",variant="clf"}' in text
    assert 'llmops_tokens_total{direction="in",variant="clf"}' in text
    assert 'llmops_variant_weight{variant="clf"} 50.0' in text

    def logged() -> list[dict[str, Any]]:
        return [r for r in read_request_log(models_server.workdir / "requests") if r["request_id"] == "req-log-test-1"]

    records = wait_for(lambda: len(logged()) == 2 and logged(), what="two request-log lines")
    assert [r["input"] for r in records] == ["log me", "and me"]
    first = records[0]
    assert first["variant"] == "clf" and first["shadow"] is False and first["status"] == 200
    assert first["endpoint"] == "/v1/classify" and first["output"] in LABELS.values()
    assert first["latency_ms"] > 0 and first["tokens_in"] > 0
    files = list((models_server.workdir / "requests").glob("requests-*.jsonl"))
    assert files, "request log files are named requests-<ts>.jsonl"


# ---- routing, shadows, faults, admin (echo server) ----------------------------------------------------------------


def variants_seen(url: str, n: int, **headers: str) -> Counter[str]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda i: classify(url, f"text {i}", **headers), range(n)))
    assert all(r.status_code == 200 for r in responses), {r.text for r in responses if r.status_code != 200}
    return Counter(r.headers["X-LLMOps-Variant"] for r in responses)


def test_traffic_split_follows_weights_and_a_header_pins_a_variant(echo_server: Server) -> None:
    client = ServingClient(echo_server.url, ADMIN)
    client.add_variant("canary", "echo://", weight=0)
    client.set_weights({"base": 80, "canary": 20})
    shares = {v["name"]: v["traffic_percent"] for v in client.variants()}
    assert shares == {"base": 80.0, "canary": 20.0}
    seen = variants_seen(echo_server.url, 400)
    # 400 draws at p=0.2: mean 80, sd 8; the bounds sit 4 sd out.
    assert 48 <= seen["canary"] <= 112, seen
    assert variants_seen(echo_server.url, 20, **{"X-LLMOps-Variant": "canary"}) == Counter(canary=20)
    client.set_weights({"base": 0, "canary": 1})
    assert variants_seen(echo_server.url, 20) == Counter(canary=20)


def test_shadow_gets_copies_but_never_answers(echo_server: Server) -> None:
    client = ServingClient(echo_server.url, ADMIN)
    # The shadow is broken on purpose: its failures must not reach the caller.
    client.add_variant("shadow", "echo://", shadow=True, fault={"error_rate": 1.0})
    since = time.time()
    assert variants_seen(echo_server.url, 30) == Counter(base=30)
    snap = wait_for(lambda: (m := client.metrics(since))["shadow"]["requests"] == 30 and m, what="30 shadow copies")
    assert snap["shadow"]["errors"] == 30 and snap["shadow"]["shadow"] is True
    assert snap["base"]["requests"] == 30 and snap["base"]["errors"] == 0
    records = wait_for(
        lambda: [r for r in read_request_log(echo_server.workdir / "requests", since=since) if r["shadow"]],
        what="shadow lines in the request log",
    )
    assert {r["variant"] for r in records} == {"shadow"} and records[0]["status"] == 500
    # Promote the shadow (it is healthy again) to a primary with traffic.
    client.update_variant("shadow", shadow=False, weight=1, clear_fault=True)
    assert "shadow" in variants_seen(echo_server.url, 40)


def test_fault_injected_variant_shows_errors_in_admin_metrics(echo_server: Server) -> None:
    client = ServingClient(echo_server.url, ADMIN)
    client.add_variant("broken", "echo://", weight=1, fault={"error_rate": 0.5, "extra_latency_ms": 50})
    since = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda i: classify(echo_server.url, f"t{i}"), range(120)))
    failed = [r for r in responses if r.status_code != 200]
    assert failed and all(r.status_code == 500 for r in failed)
    assert "injected fault" in failed[0].json()["error"]["message"]
    metrics = client.metrics(since)
    broken, base = metrics["broken"], metrics["base"]
    assert broken["errors"] == len(failed) and base["errors"] == 0
    assert 0.2 < broken["error_rate"] < 0.8
    assert broken["p50_latency_ms"] >= 50 > base["p50_latency_ms"]
    assert base["requests"] + broken["requests"] == 120
    assert client.metrics(time.time() + 60)["broken"]["requests"] == 0  # since= bounds the window
    prom = httpx.get(f"{echo_server.url}/metrics", timeout=TIMEOUT).text
    assert (
        f'llmops_request_errors_total{{endpoint="/v1/classify",shadow="false",variant="broken"}} {len(failed)}.0'
        in prom
    )


def test_admin_changes_survive_a_restart_through_the_state_file(echo_server: Server, tmp_path: Path) -> None:
    client = ServingClient(echo_server.url, ADMIN)
    added = client.add_variant("green", "echo://", weight=0, wait=False)
    assert added["status"] in ("loading", "ready")
    wait_for(lambda: client.variant("green")["status"] == "ready", what="green to load")
    client.set_weights({"base": 3, "green": 1})
    with pytest.raises(ServingClientError, match="does not exist") as err:
        client.add_variant("ghost", str(tmp_path / "missing"))
    assert err.value.status_code == 422
    client.add_variant("old", "echo://", weight=0)
    client.remove_variant("old")
    with pytest.raises(ServingClientError, match="unknown variant 'old'"):
        client.remove_variant("old")
    echo_server.process.stop()

    restarted = start_server(tmp_path / "again", "--state-file", str(echo_server.workdir / "state.json"),
                             "--admin-token", ADMIN)  # fmt: skip
    try:
        again = ServingClient(restarted.url, ADMIN)
        state = {v["name"]: (v["weight"], v["status"]) for v in again.variants()}
        assert state == {"base": (3.0, "ready"), "green": (1.0, "ready")}
        # Removing the last variant with traffic is refused unless forced.
        again.set_weights({"base": 0})
        with pytest.raises(ServingClientError, match="would leave no traffic"):
            again.remove_variant("green")
        again.remove_variant("green", force=True)
        assert [v["name"] for v in again.variants()] == ["base"]
    finally:
        restarted.process.stop()
