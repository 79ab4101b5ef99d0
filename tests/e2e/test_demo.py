"""The README's main job: `airflow-llmops demo` runs the local pipeline through a real airflow standalone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_llmops.processes import free_port, port_open

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _demo(root: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("airflow-llmops")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["LLMOPS_MLFLOW_PORT"] = str(port + 1)
    return subprocess.run(
        [str(cli), "demo", *args, "--root", str(root), "--port", str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def _check_report_is_served_behind_auth(root: Path, port: int, stdout: str) -> None:
    """The extra link's URL opens the GX report through the plugin, only for a logged-in user."""
    import urllib.error
    import urllib.request

    from airflow_llmops.devstack.airflow_api import AirflowClient
    from airflow_llmops.devstack.env import generated_admin_password

    url = next(line.split()[-1] for line in stdout.splitlines() if "validation report (GX)" in line)
    assert url.startswith(f"http://127.0.0.1:{port}/llmops/artifacts/llmops_local/"), url
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url, timeout=10)
    assert denied.value.code in (401, 403)
    client = AirflowClient(f"http://127.0.0.1:{port}", "admin", generated_admin_password(root / ".airflow") or "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {client.token()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/html")
        assert b"Expectation" in response.read()
    escape = url.replace("/llmops_local/", "/llmops_local/..%2F..%2F..%2F")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(urllib.request.Request(escape, headers={"Authorization": f"Bearer {client.token()}"}))
    assert bad.value.code in (400, 404)


def _retrain_runs(root: Path, port: int) -> tuple[list[dict], list[dict]]:
    """Through Airflow's REST API: the runs of llmops_retrain and of llmops_local."""
    from airflow_llmops.devstack.airflow_api import AirflowClient
    from airflow_llmops.devstack.env import generated_admin_password

    client = AirflowClient(f"http://127.0.0.1:{port}", "admin", generated_admin_password(root / ".airflow") or "")
    return client.runs("llmops_retrain"), client.runs("llmops_local")


def _causal_lm_through_the_rest_api(client: Any, log_root: Path) -> None:
    """The ``task`` Param's other value, triggered the way a user does it (the REST API validates the conf against
    the DAG's Params): a dialog generator goes through every stage to its own registered model and endpoint (it is
    not judged against the classifier's champion, nor canaried next to it), and the endpoint generates."""
    import urllib.parse

    import httpx

    conf = {"task": "causal_lm", "max_steps": 10, "rollout_strategy": "all_at_once", "max_quality_drop": 100.0}
    run_id = client.trigger("llmops_local", conf)
    state = client.wait_for_run("llmops_local", run_id, timeout=900)
    if state != "success":
        from airflow_llmops.devstack.demo_drift import explain_run

        lines = explain_run(client, "llmops_local", run_id, state, log_root=log_root)
        logs = [Path(w) for line in lines for w in line.split() if w.endswith(".log") and Path(w).is_file()]
        pytest.fail("\n".join(lines + [p.read_text(errors="replace")[-4000:] for p in logs]))
    # The DAG's default methods: onnx_static_int8 is for classifiers (left out, with the reason); of the two dynamic
    # int8 methods the gate keeps the faster one; evaluation scores that artifact in full.
    quantized = client.xcom("llmops_local", run_id, "quantize")
    assert quantized["chosen_method"] in ("onnx_dynamic_int8", "torch_dynamic_int8"), quantized
    evaluated = client.xcom("llmops_local", run_id, "evaluate")
    assert evaluated["passed"] and evaluated["champion"] is None, evaluated  # the generator's own first version
    assert evaluated["model_uri"] == quantized["chosen_model_uri"] and "rouge_l" in evaluated["challenger"], evaluated
    registered = client.xcom("llmops_local", run_id, "register")
    assert registered["uri"].startswith("models:/chatterbot-dialog-generator/"), registered
    deployed = client.xcom("llmops_local", run_id, "deploy")
    rolled = client.xcom("llmops_local", run_id, "rollout")
    assert deployed["handle"]["endpoint_name"] == "chatterbot-dialog" and rolled["state"] == "succeeded", rolled
    assert rolled["promoted"]["version"] == registered["version"]
    # The promotion is an event on the generator's champion Asset (an alias), not on the classifier's.
    query = urllib.parse.urlencode({"source_dag_id": "llmops_local", "source_run_id": run_id})
    events = client._request("GET", f"/api/v2/assets/events?{query}")["asset_events"]
    champion = "x-llmops://models/chatterbot-dialog-generator/champion"
    assert champion in [e["uri"] for e in events], events
    assert not any("chatterbot-topics-classifier" in e["uri"] for e in events), events
    # Its dialog rows are their own dataset Asset: the drift monitor, which follows the classifier's, never takes them.
    assert "x-llmops://datasets/chatterbot-dialogs" in [e["uri"] for e in events], events
    assert "x-llmops://datasets/chatterbot-topics" not in [e["uri"] for e in events], events
    prompt = "hello, how are you?"
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    answer = httpx.post(f"{deployed['url']}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["model"] == deployed["variant"], answer.text
    # The endpoint generates with the chosen artifact: its greedy text is the artifact's own (the shared stop rule).
    from airflow_llmops.ml.predict import generate
    from airflow_llmops.ml.quantization import load_quantized

    predictor = load_quantized(str(quantized["chosen_model_uri"]).removeprefix("file://"), threads=1)
    expected = generate(predictor.model, predictor.tokenizer, [prompt], max_new_tokens=8, add_special_tokens=False)
    assert answer.json()["choices"][0]["text"] == expected[0], (answer.json(), expected, quantized["chosen_method"])


def test_demo_runs_the_pipeline_then_drift_starts_a_retrain(tmp_path: Path):
    """The main job end to end: pipeline → endpoint → shifted traffic → drift monitor → asset event → retrain run
    (created by the scheduler from the event, read back through the REST API); a rerun reuses Airflow and the
    cooldown holds back a second retrain."""
    from airflow_llmops.devstack.airflow_api import AirflowClient
    from airflow_llmops.devstack.env import generated_admin_password

    (tmp_path / "dags").symlink_to(ROOT / "dags")
    port = free_port()
    while port_open(port + 1):
        port = free_port()
    try:
        quick = {"max_steps": 10, "quantization_methods": ["torch_dynamic_int8"]}
        first = _demo(tmp_path, port, "--conf", json.dumps(quick))
        log = (tmp_path / ".airflow" / "standalone.log").read_text(errors="replace")[-3000:]
        assert first.returncode == 0, first.stdout + first.stderr + log
        assert "starting airflow standalone" in first.stdout
        assert ": success" in first.stdout
        assert f"http://127.0.0.1:{port}" in first.stdout and "login admin /" in first.stdout
        assert "validation report (GX)" in first.stdout and "quarantined" in first.stdout
        _check_report_is_served_behind_auth(tmp_path, port, first.stdout)
        assert "endpoint" in first.stdout and "curl -s -X POST http://127.0.0.1:" in first.stdout

        # The closing act: 150 requests, a third of them Spanish, answered; the monitor sees it and signals.
        assert '{"200": 150}' in first.stdout, first.stdout
        assert "verdict                   drift" in first.stdout, first.stdout
        assert "energy_wh_per_1k_requests" in first.stdout, first.stdout
        report = next(line.split()[-1] for line in first.stdout.splitlines() if "drift report (Evidently)" in line)
        assert Path(report.removeprefix("file://")).is_file()
        retrains, pipelines = _retrain_runs(tmp_path, port)
        assert len(retrains) == 1 and retrains[0]["run_type"] == "asset_triggered", retrains
        client = AirflowClient(
            f"http://127.0.0.1:{port}", "admin", generated_admin_password(tmp_path / ".airflow") or ""
        )
        events = client.upstream_asset_events("llmops_retrain", retrains[0]["dag_run_id"])
        assert [e["uri"] for e in events] == ["x-llmops://chatterbot-topics-classifier/drift"], events
        assert events[0]["extra"]["drifted_checks"] and events[0]["extra"]["rows"] == 150
        retraining = [r for r in pipelines if (r.get("conf") or {}).get("drift")]
        assert len(retraining) == 1 and retraining[0]["conf"]["drift"]["window"] == events[0]["extra"]["window"]
        assert retraining[0]["dag_run_id"] in first.stdout
        # Only the demo's own pipeline run and the retrain: no scheduled run was queued by unpausing.
        assert len(pipelines) == 2, pipelines
        client.set_run_state("llmops_local", retraining[0]["dag_run_id"], "failed")  # not needed further here
        _causal_lm_through_the_rest_api(client, tmp_path / ".airflow" / "logs")

        again = _demo(tmp_path, port, "drift")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "reusing the Airflow already running" in again.stdout
        assert "within the cooldown" in again.stdout, again.stdout
        assert len(_retrain_runs(tmp_path, port)[0]) == 1
    finally:
        stopped = _demo(tmp_path, port, "stop")
    assert "stopped airflow standalone" in stopped.stdout and "stopped mlflow server" in stopped.stdout
    assert "stopped endpoint chatterbot-topics" in stopped.stdout
    assert "stopped endpoint chatterbot-dialog" in stopped.stdout
    assert not (tmp_path / ".airflow" / "standalone.pid").exists()
