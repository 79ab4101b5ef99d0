"""The LLMOps page's data API under load: how long ``/llmops/ui/api/models|endpoints|drift`` take to answer with
100 model versions (each with a run and metrics, plus alias moves) in a real MLflow server, 1,000 drift windows in
the artifact store and a local endpoint (a real ``airflow-llmops serve`` process) with a canary rollout and a
request log. Requests go through the plugin's real FastAPI app and Airflow's auth (a JWT of the simple auth
manager) on a migrated SQLite metadata database. Target: each answers within 1 s. Prints a table, writes JSON.

    .venv/bin/python bench/ui.py [--versions 100] [--windows 1000] [--repeat 5] [--compare] [--out ...]

It also times the page's first requests in a fresh process running Airflow's real API server app (the plugin's
app is built lazily; the warm-up at server start builds it ahead). ``--compare`` adds, in the same run, the numbers
without the speed-ups: no warm-up, and the drift route without its cache of parsed windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # ui_stores: the stores filled by the real code paths


def fill_registry(tracking_uri: str, versions: int) -> None:
    """``versions`` versions of one model, each from a run with four metrics and the registry stage's tags; the
    alias ``champion`` moved every tenth version (recorded moves)."""
    from mlflow.tracking import MlflowClient

    from airflow_llmops.ml import registry

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = "bench-model"
    client.create_registered_model(name)
    experiment = client.create_experiment("bench-ui")
    for i in range(1, versions + 1):
        info = client.create_run(experiment).info
        run = info.run_id
        for metric, value in (("eval_accuracy", 0.7 + i / 1000), ("eval_f1", 0.6 + i / 1000), ("loss", 1 / i)):
            client.log_metric(run, metric, value)
        client.log_metric(run, "latency_ms", 10 + i % 7)
        mv = client.create_model_version(name, source=f"{info.artifact_uri}/model", run_id=run)
        for key, tag in {
            "llmops.dag_run": f"llmops_bench/manual__{i}",
            "llmops.quantization": ("none", "int8_dynamic", "gptq")[i % 3],
            "llmops.data_manifest_hash": f"{i:032x}",
        }.items():
            client.set_model_version_tag(name, mv.version, key, tag)
        if i % 10 == 0:
            registry.move_alias(name, "champion", mv.version, tracking_uri=tracking_uri, reason=f"bench move {i}")


FIRST_ROUTES = ("models", "endpoints", "drift")


def first_requests(warm: bool) -> None:
    """In this fresh process: Airflow's real API server app (plugins mounted, root middlewares added) started as
    uvicorn would (lifespan), then the page's first requests, timed; prints one JSON line. ``warm``: the plugin's
    warm-up runs at start, as in the API server, and the requests come once it is done (a visit after the server
    has started); otherwise the warm-up is switched off (the behaviour before it existed)."""
    from airflow.api_fastapi.app import create_app, init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    from airflow_llmops.plugins import artifacts

    if not warm:
        artifacts.APP.warm_in_background = lambda: None  # type: ignore[method-assign]
    app = create_app()
    token = init_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {}
    with TestClient(app) as client:  # sends the lifespan startup: the root middlewares are built now
        t0 = time.perf_counter()
        if warm:
            assert artifacts.APP.warmed.wait(120), "the warm-up did not finish"
        out["warm_up_s"] = round(time.perf_counter() - t0, 3) if warm else None
        for route in FIRST_ROUTES:
            t0 = time.perf_counter()
            response = client.get(f"/llmops/ui/api/{route}", headers=headers)
            out[route] = round(time.perf_counter() - t0, 3)
            assert response.status_code == 200, response.text
    print("FIRST " + json.dumps(out))


def fresh_process(warm: bool) -> dict[str, Any]:
    args = [sys.executable, __file__, "--first-requests"] + (["--warm"] if warm else [])
    done = subprocess.run(args, capture_output=True, text=True, env=os.environ.copy(), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FIRST ")]
    if done.returncode or not lines:
        raise RuntimeError(f"first-request run failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(lines[-1].removeprefix("FIRST ")))


def main() -> None:
    if "--first-requests" in sys.argv:
        first_requests("--warm" in sys.argv)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ui.json"))
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also measure without the page's speed-ups (no warm-up at server start, no drift-window cache) in the "
        "same run, side by side",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llmops-bench-ui-"))
    home = work / "airflow"
    home.mkdir()
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__LLMOPS__ARTIFACT_ROOT": str(work / "artifacts"),
            "AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT": str(work / "endpoints"),
            "AIRFLOW__LLMOPS__UI_AUDIT_LOG": str(work / "audit.jsonl"),
            "NO_PROXY": "*",
        }
    )
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())

    import ui_stores

    from airflow_llmops.devstack.mlflow_server import MLflowServer
    from airflow_llmops.platforms import get_platform

    server = MLflowServer(work / "mlflow").start()
    os.environ["AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI"] = server.url
    platform_ = get_platform("local", endpoints_root=str(work / "endpoints"))
    try:
        started = time.perf_counter()
        fill_registry(server.url, args.versions)
        ui_stores.write_drift_windows(work / "artifacts", windows=args.windows)
        ui_stores.start_rollout(work / "endpoints", requests=args.requests)
        fill_s = time.perf_counter() - started

        from airflow.api_fastapi.app import init_auth_manager
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from fastapi.testclient import TestClient

        from airflow_llmops.plugins.artifacts import create_app

        token = init_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
        client = TestClient(create_app())
        headers = {"Authorization": f"Bearer {token}"}
        rows: list[dict[str, Any]] = []
        from airflow_llmops.plugins import ui_data

        # --compare: the drift route again, its cache of parsed windows emptied before every request.
        runs = [(r, False) for r in FIRST_ROUTES] + ([("drift", True)] if args.compare else [])
        for route, uncached in runs:
            times, size = [], 0
            for _ in range(args.repeat + 1):  # the first is the cold one (imports, connections)
                if uncached:
                    ui_data._DRIFT_CACHE.clear()
                t0 = time.perf_counter()
                response = client.get(f"/ui/api/{route}", headers=headers)
                times.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text
                size = len(response.content)
            body = response.json()
            if route == "endpoints":
                count = len(body["endpoints"])
            else:
                key = "versions" if route == "models" else "windows"
                count = sum(len(m[key]) for m in body["models"])
            warm = times[1:]
            rows.append(
                {
                    "route": f"/llmops/ui/api/{route}" + (" (no cache)" if uncached else ""),
                    "items": count,
                    "bytes": size,
                    "cold_s": round(times[0], 3),
                    "median_s": round(statistics.median(warm), 3),
                    "max_s": round(max(warm), 3),
                    "within_1s": max(warm) < 1.0,
                }
            )
        # The first requests in a fresh API server process (app build and imports included), with and without the
        # warm-up at server start.
        first = {"warm_up": fresh_process(warm=True)}
        if args.compare:
            first["no_warm_up"] = fresh_process(warm=False)
    finally:
        platform_.stop_endpoint(ui_stores.ENDPOINT)
        server.stop()

    print(
        f"stores filled in {fill_s:.1f} s: {args.versions} versions, {args.windows} drift windows, "
        f"{args.requests} logged requests"
    )
    print(f"{'route':<28} {'items':>6} {'bytes':>9} {'cold s':>7} {'median s':>9} {'max s':>7}  < 1 s")
    for r in rows:
        print(
            f"{r['route']:<28} {r['items']:>6} {r['bytes']:>9} {r['cold_s']:>7.3f} {r['median_s']:>9.3f} "
            f"{r['max_s']:>7.3f}  {'yes' if r['within_1s'] else 'NO'}"
        )
    print("first requests in a fresh API server process (s):")
    print(f"{'':<28} {'warm-up s':>9} " + " ".join(f"{r:>9}" for r in FIRST_ROUTES))
    for name, row in first.items():
        warm_up = "-" if row.get("warm_up_s") is None else f"{row['warm_up_s']:.3f}"
        print(f"{name:<28} {warm_up:>9} " + " ".join(f"{row[r]:>9.3f}" for r in FIRST_ROUTES))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "versions": args.versions,
                "windows": args.windows,
                "requests": args.requests,
                "repeat": args.repeat,
                "fill_s": round(fill_s, 1),
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "system": platform.platform()},
                "rows": rows,
                "first_requests": first,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
