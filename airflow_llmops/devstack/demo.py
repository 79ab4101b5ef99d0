"""The README's main job: the local reference pipeline end to end through a real ``airflow standalone``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from airflow_llmops.devstack.airflow_api import AirflowClient
from airflow_llmops.devstack.demo_drift import follow
from airflow_llmops.devstack.env import airflow_env, generated_admin_password
from airflow_llmops.devstack.mlflow_server import MLflowServer
from airflow_llmops.processes import ManagedProcess, port_open, stop_process_group, tail

DAG_ID = "llmops_local"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Demo:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.home = root / ".airflow"
        self.pid_file = self.home / "standalone.pid"
        self.log_path = self.home / "standalone.log"
        self.mlflow_root = root / ".llmops" / "mlflow"
        self.mlflow_port = int(os.environ.get("LLMOPS_MLFLOW_PORT", str(port + 1)))
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = airflow_env(self.home, root / "dags", port=port)
        self.env["AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI"] = self.mlflow_url
        # Unpausing would also start the daily (hourly) run of the latest interval, and with max_active_runs=1 the
        # demo's own run would wait for it: the time-based schedules of the reference DAGs are off here, while the
        # retrain DAG keeps its schedule on the drift Asset. A deployment keeps them on.
        self.env["LLMOPS_REFERENCE_SCHEDULES"] = "off"
        self.url = f"http://127.0.0.1:{port}"

    def running_pid(self, pid_file: Path | None = None) -> int | None:
        try:
            pid = int((pid_file or self.pid_file).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def ensure_mlflow(self) -> None:
        server = MLflowServer(self.mlflow_root, port=self.mlflow_port)
        pid_file = self.mlflow_root / "server.pid"
        if self.running_pid(pid_file) is not None and server.healthy():
            print(f">> reusing the MLflow server at {self.mlflow_url}")
            return
        if port_open(self.mlflow_port):
            raise SystemExit(f"port {self.mlflow_port} is taken; set LLMOPS_MLFLOW_PORT to a free port")
        print(f">> starting the MLflow tracking server (SQLite, {self.mlflow_root})")
        server.start()
        assert server.process is not None
        pid_file.write_text(str(server.process.pid))

    def ensure_airflow(self) -> None:
        self.ensure_mlflow()
        if self.running_pid() is not None and port_open(self.port):
            print(f">> reusing the Airflow already running at {self.url} (pid {self.running_pid()})")
            return
        if port_open(self.port):
            raise SystemExit(f"port {self.port} is taken by another program; set LLMOPS_AIRFLOW_PORT to a free port")
        self.home.mkdir(parents=True, exist_ok=True)
        print(f">> starting airflow standalone (AIRFLOW_HOME={self.home}, log {self.log_path})")
        airflow = str(Path(sys.executable).with_name("airflow"))
        proc = ManagedProcess("airflow standalone", [airflow, "standalone"], self.log_path, env=self.env, cwd=self.root)
        proc.start()
        self.pid_file.write_text(str(proc.pid))
        client = AirflowClient(self.url, "admin", "")
        proc.wait_until(client.healthy, timeout=300, what="healthy api-server", interval=2)

    def client(self) -> AirflowClient:
        deadline = time.monotonic() + 60
        password = generated_admin_password(self.home)
        while password is None and time.monotonic() < deadline:
            time.sleep(1)
            password = generated_admin_password(self.home)
        if password is None:
            raise SystemExit(f"no admin password generated in {self.home}; see {self.log_path}")
        return AirflowClient(self.url, "admin", password)

    def run_pipeline(self, conf: dict[str, Any], *, drift: bool = True) -> int:
        client = self.client()
        client.wait_for_dag(DAG_ID, timeout=240)
        client.unpause(DAG_ID)
        run_id = client.trigger(DAG_ID, conf)
        print(f">> triggered {DAG_ID} run {run_id} through the REST API; following it")
        state = follow(client, DAG_ID, run_id, timeout=float(os.environ.get("LLMOPS_DEMO_TIMEOUT", "3600")))
        print(f">> run {run_id}: {state}")
        ok = state == "success"
        if ok:
            self.print_outputs(client, run_id)
            if drift:
                ok = self.run_drift(client, run_id)
        else:
            print(f"   see the task logs in the UI: {self.url}/dags/{DAG_ID}/runs")
        self.print_access()
        return 0 if ok else 1

    def run_drift(self, client: AirflowClient, run_id: str | None = None) -> bool:
        """Shifted traffic to the endpoint of ``run_id`` (default: the newest successful run), the drift monitor,
        and the retrain run the scheduler starts from the drift Asset."""
        from airflow_llmops.devstack.demo_drift import closed_loop

        if run_id is None:
            done = [r for r in client.runs(DAG_ID, limit=50) if r.get("state") == "success"]
            if not done:
                print(f"no successful {DAG_ID} run yet: run ./scripts/demo first")
                return False
            run_id = str(done[0]["dag_run_id"])
        deployed = client.xcom(DAG_ID, run_id, "deploy")
        prepared = client.xcom(DAG_ID, run_id, "prepare")
        if not isinstance(deployed, dict) or not isinstance(prepared, dict):
            print(f"run {run_id} of {DAG_ID} deployed no endpoint")
            return False
        return closed_loop(
            client,
            endpoint_url=str(deployed["url"]),
            dataset_uri=str(prepared["dataset_uri"]),
            english=100,
            spanish=50,
        )

    def print_outputs(self, client: AirflowClient, run_id: str) -> None:
        print("\nWhat the run produced:")
        plan = client.xcom(DAG_ID, run_id, "plan")
        if isinstance(plan, dict):
            print(f"   run plan (validated specs)  {plan.get('plan_uri')}")
        prepared = client.xcom(DAG_ID, run_id, "prepare")
        if isinstance(prepared, dict):
            print(f"   prepared dataset            {prepared.get('dataset_uri')}")
            print(f"     rows per split            {json.dumps(prepared.get('rows'))}")
            print(f"     removed (with reasons)    {json.dumps(prepared.get('removed'))}")
        validated = client.xcom(DAG_ID, run_id, "validate")
        if isinstance(validated, dict):
            summary = validated.get("summary", {})
            print(f"   validated dataset           {validated.get('dataset_uri')}")
            print(
                f"     quarantined               {summary.get('quarantined_count')} rows "
                f"({json.dumps(summary.get('quarantine_reasons'))}); "
                f"PII redacted {json.dumps(summary.get('pii_redacted'))}"
            )
            print(f"   validation report (GX)      {summary.get('report_url')}")
        trained = client.xcom(DAG_ID, run_id, "train")
        if isinstance(trained, dict):
            metrics = trained.get("metrics", {})
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_") or k == "tokens_per_s"}
            print(f"   trained model               {trained.get('model_uri')}")
            print(f"     metrics                   {json.dumps(shown)}")
            print(f"     MLflow run                {trained.get('mlflow_run_id')}")
        quantized = client.xcom(DAG_ID, run_id, "quantize")
        if isinstance(quantized, dict):
            print(
                f"   quantized model             {quantized.get('chosen_model_uri')} ({quantized.get('chosen_method')})"
            )
            print(f"     gate                      {quantized.get('message')}")
        evaluated = client.xcom(DAG_ID, run_id, "evaluate")
        if isinstance(evaluated, dict):
            print(f"   evaluation report           {evaluated.get('report_uri')}")
            print(f"     gate                      {evaluated.get('message')}")
        registered = client.xcom(DAG_ID, run_id, "register")
        if isinstance(registered, dict):
            print(f"   registered model            {registered.get('uri')}  ({self.mlflow_url}/#/models)")
        deployed = client.xcom(DAG_ID, run_id, "deploy")
        rolled = client.xcom(DAG_ID, run_id, "rollout")
        if isinstance(deployed, dict):
            url = deployed.get("url")
            print(f"   endpoint                    {url}  (variant {deployed.get('variant')}; OpenAPI: {url}/docs)")
            if isinstance(rolled, dict):
                print(f"     rollout                   {rolled.get('message')}")
            print(
                "     try it                    curl -s -X POST "
                f"{url}/v1/classify -H 'Content-Type: application/json' -d '{{\"inputs\": \"do you like pizza?\"}}'"
            )
            print(f"     request log               {deployed.get('platform_kwargs', {}).get('endpoints_root')}/")

    def print_access(self) -> None:
        password = generated_admin_password(self.home)
        print(
            f"\nAirflow UI       {self.url}  (login admin / {password})\n"
            f"MLflow UI        {self.mlflow_url}\n"
            f"                 password file: {self.home / 'simple_auth_manager_passwords.json.generated'}\n"
            f"Airflow log      {self.log_path}\n"
            f"Stop everything  ./scripts/demo stop"
        )

    def stop(self) -> int:
        stopped = False
        for name, pid_file in (
            ("airflow standalone", self.pid_file),
            ("mlflow server", self.mlflow_root / "server.pid"),
        ):
            pid = self.running_pid(pid_file)
            if pid is not None:
                stop_process_group(pid)
                print(f"stopped {name} (pid {pid})")
                stopped = True
            pid_file.unlink(missing_ok=True)
        from airflow_llmops.platforms.local_serving import LocalEndpoints

        endpoints_root = self.home / "llmops" / "endpoints"
        for folder in sorted(endpoints_root.glob("*/server.json")):
            record = json.loads(folder.read_text())
            if _pid_alive(int(record["pid"])):
                LocalEndpoints(endpoints_root).stop_server(folder.parent.name)
                print(f"stopped endpoint {folder.parent.name} (pid {record['pid']})")
                stopped = True
        if not stopped:
            print("nothing to stop: no airflow standalone or MLflow server started by the demo is running")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airflow-llmops demo", description=__doc__)
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "drift", "stop"],
        help="run: the pipeline, then the drift loop; drift: only the drift loop, against the running endpoint",
    )
    parser.add_argument("--no-drift", action="store_true", help="run the pipeline only")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project folder holding dags/")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LLMOPS_AIRFLOW_PORT", "8080")))
    parser.add_argument("--conf", default="{}", help="JSON conf (Params) for the triggered run")
    args = parser.parse_args(argv)
    demo = Demo(args.root.resolve(), args.port)
    if args.action == "stop":
        return demo.stop()
    try:
        demo.ensure_airflow()
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        print(tail(demo.log_path), file=sys.stderr)
        return 1
    if args.action == "drift":
        ok = demo.run_drift(demo.client(), None)
        demo.print_access()
        return 0 if ok else 1
    return demo.run_pipeline(json.loads(args.conf), drift=not args.no_drift)
