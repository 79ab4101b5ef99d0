"""The model server's hardening, as real processes over HTTP: failure injection only on test servers, generic 500s
that name a request id, tokens kept off the command line, fallback weights and boot info across restarts, and the
model cache (reused per model version, deleted with its variants and at shutdown)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import require_module
from test_serving_models import Server, build_tiny_lm, start_server

from airflow_llmops.processes import ManagedProcess, free_port, http_ok
from airflow_llmops.serving.client import ServingClient, ServingClientError

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-hardening"
API_KEY = "sk-hardening-key"
TIMEOUT = 60.0


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[Server]:
    server = start_server(
        tmp_path,
        "--model", "base=echo://:1",
        "--state-file", str(tmp_path / "state.json"),
        "--max-batch-delay-ms", "0",
        env={"LLMOPS_ADMIN_TOKEN": ADMIN},
    )  # fmt: skip
    yield server
    server.process.stop()


# ---- 1. failure injection only where a test asked for it ---------------------------------------------------------


def test_failure_injection_answers_404_unless_the_server_was_started_for_tests(
    echo_server: Server, tmp_path: Path
) -> None:
    client = ServingClient(echo_server.url, ADMIN)
    for call in (
        lambda: client.add_variant("broken", "echo://", weight=1, fault={"error_rate": 1.0}),
        lambda: client.update_variant("base", fault={"error_rate": 1.0}),
    ):
        with pytest.raises(ServingClientError, match="--enable-fault-injection") as err:
            call()
        assert err.value.status_code == 404
    assert [v["name"] for v in client.variants()] == ["base"]
    assert client.update_variant("base", clear_fault=True)["fault"] is None  # clearing is always allowed
    echo_server.process.stop()

    # A state file written by a test server brings no failure into a server started without the flag.
    state = json.loads((echo_server.workdir / "state.json").read_text())
    state["variants"][0]["fault"] = {"error_rate": 1.0}
    (tmp_path / "faulty-state.json").write_text(json.dumps(state))
    (tmp_path / "test-state.json").write_text(json.dumps(state))  # a server rewrites its state file at start
    plain = start_server(tmp_path / "plain", "--state-file", str(tmp_path / "faulty-state.json"),
                         env={"LLMOPS_ADMIN_TOKEN": ADMIN})  # fmt: skip
    try:
        assert ServingClient(plain.url, ADMIN).variant("base")["fault"] is None
        answers = [httpx.post(f"{plain.url}/v1/classify", json={"inputs": "hi"}, timeout=TIMEOUT) for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
    finally:
        plain.process.stop()

    # The flag (or its environment variable, which the local platform passes on) turns it on.
    tests = start_server(tmp_path / "tests", "--state-file", str(tmp_path / "test-state.json"),
                         env={"LLMOPS_ADMIN_TOKEN": ADMIN, "LLMOPS_ENABLE_FAULT_INJECTION": "1"})  # fmt: skip
    try:
        assert ServingClient(tests.url, ADMIN).variant("base")["fault"]["error_rate"] == 1.0
        failed = httpx.post(f"{tests.url}/v1/classify", json={"inputs": "hi"}, timeout=TIMEOUT)
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "injected_fault"
    finally:
        tests.process.stop()


# ---- 2. unexpected errors: a generic answer, the details in the log ------------------------------------------------

BROKEN_MODEL_SERVER = """
import sys

from airflow_llmops.serving.models import Loader, register_loader
from airflow_llmops.serving.server import main


class Broken:
    kind = "broken"
    tasks = frozenset({"classify", "generate"})

    def classify(self, texts):
        raise RuntimeError("secret-detail-classify /srv/models/private")

    def chat_prompt(self, messages):
        raise KeyError("secret-detail-chat")

    def generate(self, prompt, params, *, on_text, cancelled):
        raise ValueError("secret-detail-generate")


register_loader(Loader("broken", lambda f: (f.path / "broken.json").is_file(), lambda f: Broken()))
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_error_answers_a_generic_500_with_the_request_id_and_logs_the_details(tmp_path: Path) -> None:
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "broken.json").write_text("{}")
    script = tmp_path / "broken_server.py"
    script.write_text(textwrap.dedent(BROKEN_MODEL_SERVER))
    port = free_port()
    argv = [sys.executable, str(script), "--port", str(port), "--model", f"broken={model}"]
    process = ManagedProcess("broken-server", argv, tmp_path / "server.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(lambda: http_ok(f"{url}/readyz"), timeout=90, what="readiness", interval=0.3)
        calls = {
            "classify (in the variant's worker)": ("/v1/classify", {"inputs": "hi"}),
            "chat (on the event loop)": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            "stream (before the first byte)": ("/v1/completions", {"prompt": "hi", "stream": True}),
        }
        ids = []
        for what, (path, body) in calls.items():
            given = f"req-{len(ids)}-{what.split()[0]}"
            response = httpx.post(url + path, json=body, headers={"X-Request-ID": given}, timeout=TIMEOUT)
            assert response.status_code == 500, (what, response.text)
            error = response.json()["error"]
            assert error["message"] == f"internal error; request id {given}", what
            assert error["type"] == "server_error" and response.headers["X-Request-ID"] == given, what
            assert "secret-detail" not in response.text and "Error" not in response.text, what
            ids.append(given)
        anonymous = httpx.post(f"{url}/v1/classify", json={"inputs": "hi"}, timeout=TIMEOUT)
        rid = anonymous.headers["X-Request-ID"]
        assert len(rid) == 32 and anonymous.json()["error"]["message"] == f"internal error; request id {rid}"
        log = (tmp_path / "server.log").read_text()
        for logged in [*ids, rid]:
            assert f"request {logged}" in log
        assert "secret-detail-classify" in log and "secret-detail-chat" in log and "secret-detail-generate" in log
    finally:
        process.stop()


# ---- 3. tokens from a file or the environment, never argv ----------------------------------------------------------


def test_tokens_from_files_stay_off_the_command_line_and_argv_tokens_are_warned_about(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text(ADMIN + "\n")
    (tmp_path / "api-key").write_text(API_KEY)
    os.chmod(tmp_path / "admin-token", 0o600)
    server = start_server(tmp_path, "--model", "base=echo://:1", "--admin-token-file", str(tmp_path / "admin-token"),
                          "--api-key-file", str(tmp_path / "api-key"))  # fmt: skip
    try:
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode()
        assert ADMIN not in cmdline and API_KEY not in cmdline
        assert ServingClient(server.url, ADMIN).variants()[0]["name"] == "base"
        assert httpx.get(f"{server.url}/admin/variants", headers={"Authorization": "Bearer x"}).status_code == 403
        classify = f"{server.url}/v1/classify"
        assert httpx.post(classify, json={"inputs": "hi"}, timeout=TIMEOUT).status_code == 401
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.post(classify, json={"inputs": "hi"}, headers=auth, timeout=TIMEOUT).status_code == 200
        assert "visible to every user" not in server.log_text
    finally:
        server.process.stop()

    argv = start_server(tmp_path / "argv", "--model", "base=echo://:1", "--admin-token", ADMIN)
    try:
        assert "--admin-token on the command line is visible to every user of this machine" in argv.log_text
    finally:
        argv.process.stop()
    (tmp_path / "empty").write_text("\n")
    port = free_port()
    done = ManagedProcess(
        "empty-token",
        [sys.executable, "-m", "airflow_llmops.cli", "serve", "--port", str(port), "--admin-token-file",
         str(tmp_path / "empty")],
        tmp_path / "empty.log",
    ).start()  # fmt: skip
    assert done.popen is not None and done.popen.wait(timeout=60) == 2
    assert "admin token file" in (tmp_path / "empty.log").read_text()


# ---- 5. fallback weights and boot info -----------------------------------------------------------------------------


def test_a_restart_mid_rollout_comes_back_on_the_fallback_weights_and_says_so(echo_server: Server) -> None:
    client = ServingClient(echo_server.url, ADMIN)
    first = client.server_info()
    assert first["boot_count"] == 1 and first["fallback"] is None and first["fallback_applied_at"] is None
    client.add_variant("canary", "echo://", weight=0)
    # A canary step: 50/50 now; if the server restarts before the next step, it starts on 100/0.
    variants = client.set_weights({"base": 50, "canary": 50}, fallback={"base": 100, "canary": 0})
    assert {v["name"]: v["weight"] for v in variants} == {"base": 50.0, "canary": 50.0}
    assert client.server_info()["fallback"]["weights"] == {"base": 100.0, "canary": 0.0}
    with pytest.raises(ServingClientError, match="would leave no traffic") as err:
        client.set_weights({"base": 1}, fallback={"base": 0, "canary": 0})
    assert err.value.status_code == 400
    with pytest.raises(ServingClientError, match="unknown variant") as err:
        client.set_fallback({"ghost": 1})
    assert err.value.status_code == 404
    assert client.server_info()["weights"] == {"base": 50.0, "canary": 50.0}  # all or nothing
    saved = json.loads((echo_server.workdir / "state.json").read_text())
    assert saved["fallback"]["weights"] == {"base": 100.0, "canary": 0.0} and saved["boot"]["count"] == 1
    echo_server.process.stop()

    again = start_server(echo_server.workdir / "again", "--state-file", str(echo_server.workdir / "state.json"),
                         env={"LLMOPS_ADMIN_TOKEN": ADMIN})  # fmt: skip
    try:
        client = ServingClient(again.url, ADMIN)
        info = client.server_info()
        assert info["boot_count"] == 2 and info["started_at"] > first["started_at"]
        assert info["weights"] == {"base": 100.0, "canary": 0.0}, "old weights first"
        assert info["fallback"]["weights"] == {"base": 100.0, "canary": 0.0}, "kept for the rollout controller"
        assert info["fallback_applied_at"] == info["started_at"]
        assert client.variants()[0]["traffic_percent"] == 100.0
        assert httpx.get(f"{again.url}/admin/variants", headers={"Authorization": f"Bearer {ADMIN}"}).json()[
            "fallback"
        ] == {"base": 100.0, "canary": 0.0}
        cleared = client.clear_fallback()
        assert cleared["fallback"] is None and cleared["fallback_applied_at"] == info["fallback_applied_at"]
        assert "fallback" not in json.loads((echo_server.workdir / "state.json").read_text())
    finally:
        again.process.stop()


# ---- 7. the model cache ---------------------------------------------------------------------------------------------


def _register_tiny_lm(tmp_path: Path, versions: int) -> str:
    mlflow = require_module("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.create_experiment("cache-test", artifact_location=str(tmp_path / "mlartifacts"))
    mlflow.set_experiment("cache-test")
    client = mlflow.MlflowClient()
    client.create_registered_model("lm")
    for _ in range(versions):
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(build_tiny_lm()), artifact_path="model")
        client.create_model_version("lm", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("lm", "champion", "1")
    return uri


def _entries(cache: Path) -> dict[str, float]:
    """Cache entries (name -> when downloaded); partial downloads are hidden folders."""
    return {
        p.name: json.loads((p / ".llmops-download.json").read_text())["downloaded_at"]
        for p in sorted(cache.iterdir())
        if not p.name.startswith(".")
    }


def test_models_uris_share_a_cached_copy_per_version_deleted_with_their_variants(tmp_path: Path) -> None:
    uri = _register_tiny_lm(tmp_path, versions=2)
    cache, state = tmp_path / "cache", tmp_path / "state.json"
    env = {"LLMOPS_ADMIN_TOKEN": ADMIN, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    args = ("--state-file", str(state), "--model-cache", str(cache))
    server = start_server(tmp_path / "one", *args, "--model", "seed=echo://:1", env=env)
    try:
        client = ServingClient(server.url, ADMIN)
        client.add_variant("a", "models:/lm@champion", weight=1)
        first = _entries(cache)
        assert len(first) == 1
        client.add_variant("b", "models:/lm/1")  # the alias points at version 1: the same copy
        assert _entries(cache) == first
        client.remove_variant("b")
        assert _entries(cache) == first, "still used by a"
    finally:
        server.process.stop()

    server = start_server(tmp_path / "two", *args, env=env)
    try:
        client = ServingClient(server.url, ADMIN)
        assert client.variant("a")["status"] == "ready"
        assert _entries(cache) == first, "a restart loads the cached copy, no new download"
        import mlflow

        mlflow.MlflowClient().set_registered_model_alias("lm", "champion", "2")
        client.add_variant("c", "models:/lm@champion")  # the alias moved: version 2, another copy
        second = _entries(cache)
        assert len(second) == 2 and set(first) < set(second)
        client.set_weights({"a": 0, "c": 1})
        client.remove_variant("a")
        assert set(_entries(cache)) == set(second) - set(first), "a's copy went with it"
    finally:
        server.process.stop()
    assert len(_entries(cache)) == 1, "--model-cache keeps copies across restarts"

    # Without --model-cache, downloads go to a private temporary folder, deleted at shutdown.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    private = start_server(tmp_path / "three", "--model", "a=models:/lm/2:1", env={**env, "TMPDIR": str(tmpdir)})
    try:
        folders = list(tmpdir.glob("llmops-models-*"))
        assert len(folders) == 1 and len(_entries(folders[0])) == 1
    finally:
        private.process.stop()
    deadline = time.monotonic() + 10
    while list(tmpdir.glob("llmops-models-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(tmpdir.glob("llmops-models-*")) == []
