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
from airflow_llmops.devstack.demo_drift import Step, explain_run, follow
from airflow_llmops.devstack.env import airflow_env, generated_admin_password
from airflow_llmops.devstack.mlflow_server import MLflowServer
from airflow_llmops.processes import ManagedProcess, ProcessRecord, port_open, tail

DAG_ID = "llmops_local"
# ``--pipeline``: which reference DAG the demo triggers.
PIPELINES = {"local": DAG_ID, "chat": "llmops_chat"}


class Demo:
    def __init__(self, root: Path, port: int, *, pipeline: str = "local") -> None:
        self.root = root
        self.pipeline = pipeline
        self.dag_id = PIPELINES[pipeline]
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
        self.step = Step()  # what a failure report names
        self.api: AirflowClient | None = None

    def running(self, pid_file: Path | None = None) -> ProcessRecord | None:
        """The process a pid file records, if it still runs (a plain pid of an older demo is read too)."""
        record = ProcessRecord.read(pid_file or self.pid_file)
        return record if record is not None and record.alive() else None

    def running_pid(self, pid_file: Path | None = None) -> int | None:
        record = self.running(pid_file)
        return record.pid if record else None

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
        assert server.process is not None and server.process.record is not None
        server.process.record.write(pid_file)

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
        assert proc.record is not None
        proc.record.write(self.pid_file)
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
        self.api = AirflowClient(self.url, "admin", password)
        return self.api

    @property
    def log_root(self) -> Path:
        """``[logging] base_log_folder`` of the demo's Airflow: task logs, one file per try."""
        return self.home / "logs"

    def run_pipeline(self, conf: dict[str, Any], *, drift: bool = True) -> int:
        self.step.at("logging in to the Airflow REST API")
        client = self.client()
        self.step.at(f"waiting for the DAG processor to parse {self.dag_id}", self.dag_id)
        client.wait_for_dag(self.dag_id, timeout=240)
        client.unpause(self.dag_id)
        self.step.at(f"triggering {self.dag_id}", self.dag_id)
        run_id = client.trigger(self.dag_id, conf)
        print(f">> triggered {self.dag_id} run {run_id} through the REST API; following it")
        self.step.at(f"following the {self.dag_id} run", self.dag_id, run_id)
        state = follow(client, self.dag_id, run_id, timeout=float(os.environ.get("LLMOPS_DEMO_TIMEOUT", "3600")))
        print(f">> run {run_id}: {state}")
        ok = state == "success"
        if ok:
            self.step.at(f"reading what the {self.dag_id} run produced", self.dag_id, run_id)
            self.print_outputs(client, run_id)
            if self.pipeline == "chat":
                ok = self.chat_exchange(client, run_id)
            elif drift:
                ok = self.run_drift(client, run_id)
        else:
            print("\n".join(explain_run(client, self.dag_id, run_id, state, log_root=self.log_root)))
        self.print_access()
        return 0 if ok else 1

    def run_drift(self, client: AirflowClient, run_id: str | None = None) -> bool:
        """Shifted traffic to the endpoint of ``run_id`` (default: the newest successful run), the drift monitor,
        and the retrain run the scheduler starts from the drift Asset."""
        from airflow_llmops.devstack.demo_drift import closed_loop

        if run_id is None:
            # The drift demo watches the topic classifier: a run of the other task (task=causal_lm) deployed a
            # dialog generator, whose endpoint takes prompts, not texts to classify.
            self.step.at(f"looking for the newest successful {DAG_ID} run of the classifier", DAG_ID)
            done = [
                r
                for r in client.runs(DAG_ID, limit=50)
                if r.get("state") == "success"
                and (r.get("conf") or {}).get("task", "classification") == "classification"
            ]
            if not done:
                print(f"no successful {DAG_ID} run of the classifier yet: run ./scripts/demo first")
                return False
            run_id = str(done[0]["dag_run_id"])
        self.step.at(f"reading the endpoint the {DAG_ID} run deployed", DAG_ID, run_id)
        deployed = client.xcom(DAG_ID, run_id, "deploy", missing_ok=True)
        prepared = client.xcom(DAG_ID, run_id, "prepare", missing_ok=True)
        if not isinstance(deployed, dict) or not isinstance(prepared, dict):
            print(f"run {run_id} of {DAG_ID} deployed no endpoint")
            return False
        return closed_loop(
            client,
            endpoint_url=str(deployed["url"]),
            dataset_uri=str(prepared["dataset_uri"]),
            english=100,
            spanish=50,
            step=self.step,
            log_root=self.log_root,
        )

    def print_outputs(self, client: AirflowClient, run_id: str) -> None:
        print("\nWhat the run produced:")
        plan = client.xcom(self.dag_id, run_id, "plan", missing_ok=True)
        if isinstance(plan, dict):
            print(f"   run plan (validated specs)  {plan.get('plan_uri')}")
        prepared = client.xcom(self.dag_id, run_id, "prepare", missing_ok=True)
        if isinstance(prepared, dict):
            print(f"   prepared dataset            {prepared.get('dataset_uri')}")
            print(f"     rows per split            {json.dumps(prepared.get('rows'))}")
            print(f"     removed (with reasons)    {json.dumps(prepared.get('removed'))}")
        validated = client.xcom(self.dag_id, run_id, "validate", missing_ok=True)
        if isinstance(validated, dict):
            summary = validated.get("summary", {})
            print(f"   validated dataset           {validated.get('dataset_uri')}")
            print(
                f"     quarantined               {summary.get('quarantined_count')} rows "
                f"({json.dumps(summary.get('quarantine_reasons'))}); "
                f"PII redacted {json.dumps(summary.get('pii_redacted'))}"
            )
            print(f"   validation report (GX)      {summary.get('report_url')}")
        trained = client.xcom(self.dag_id, run_id, "train", missing_ok=True)
        if isinstance(trained, dict):
            metrics = trained.get("metrics", {})
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_") or k == "tokens_per_s"}
            print(f"   trained model               {trained.get('model_uri')}")
            print(f"     metrics                   {json.dumps(shown)}")
            print(f"     MLflow run                {trained.get('mlflow_run_id')}")
        quantized = client.xcom(self.dag_id, run_id, "quantize", missing_ok=True)
        if isinstance(quantized, dict):
            print(
                f"   quantized model             {quantized.get('chosen_model_uri')} ({quantized.get('chosen_method')})"
            )
            print(f"     gate                      {quantized.get('message')}")
        evaluated = client.xcom(self.dag_id, run_id, "evaluate", missing_ok=True)
        if isinstance(evaluated, dict):
            print(f"   evaluation report           {evaluated.get('report_uri')}")
            print(f"     gate                      {evaluated.get('message')}")
        registered = client.xcom(self.dag_id, run_id, "register", missing_ok=True)
        if isinstance(registered, dict):
            print(f"   registered model            {registered.get('uri')}  ({self.mlflow_url}/#/models)")
        deployed = client.xcom(self.dag_id, run_id, "deploy", missing_ok=True)
        rolled = client.xcom(self.dag_id, run_id, "rollout", missing_ok=True)
        if isinstance(deployed, dict):
            url = deployed.get("url")
            print(f"   endpoint                    {url}  (variant {deployed.get('variant')}; OpenAPI: {url}/docs)")
            if isinstance(rolled, dict):
                print(f"     rollout                   {rolled.get('message')}")
            if self.pipeline == "chat":
                print(
                    "     try it                    curl -s -X POST "
                    f"{url}/v1/chat/completions -H 'Content-Type: application/json' "
                    '-d \'{"messages": [{"role": "user", "content": "Hello"}]}\''
                )
            else:
                print(
                    "     try it                    curl -s -X POST "
                    f"{url}/v1/classify -H 'Content-Type: application/json' "
                    '-d \'{"inputs": "do you like pizza?"}\''
                )
            print(f"     request log               {deployed.get('platform_kwargs', {}).get('endpoints_root')}/")

    def chat_exchange(self, client: AirflowClient, run_id: str) -> bool:
        """A conversation with the chat endpoint the run deployed, through the ``openai`` client: one reply, then
        one streamed chunk by chunk."""
        import openai

        self.step.at(f"talking to the endpoint the {self.dag_id} run deployed", self.dag_id, run_id)
        deployed = client.xcom(self.dag_id, run_id, "deploy", missing_ok=True)
        if not isinstance(deployed, dict) or not deployed.get("url"):
            print(f"run {run_id} of {self.dag_id} deployed no endpoint")
            return False
        chat = openai.OpenAI(base_url=f"{deployed['url']}/v1", api_key="unused", timeout=60, max_retries=1)
        messages: list[Any] = [{"role": "user", "content": "Hello, how are you?"}]
        print(f"\nA chat with {deployed['url']} (openai client, model {deployed.get('variant')}):")
        print(f"   user       {messages[0]['content']}")
        # Seeded sampling: a briefly trained model's most likely first token is often the end of its turn.
        sampling: dict[str, Any] = {"max_tokens": 32, "temperature": 0.8, "seed": 7}
        reply = chat.chat.completions.create(model="llmops", messages=messages, **sampling)
        answer = reply.choices[0].message.content or ""
        tokens = reply.usage.completion_tokens if reply.usage else "?"
        print(f"   assistant  {answer or '(no answer: it ended its turn at once)'}  ({reply.model}, {tokens} tokens)")
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me a joke."}]
        print(f"   user       {messages[-1]['content']}")
        print("   assistant  ", end="", flush=True)
        pieces = []
        for chunk in chat.chat.completions.create(model="llmops", messages=messages, stream=True, **sampling):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
        print(f"  (streamed in {len(pieces)} chunks)")
        return True

    def print_access(self) -> None:
        password = generated_admin_password(self.home)
        print(
            f"\nAirflow UI       {self.url}  (login admin / {password})\n"
            f"LLMOps page      {self.url}/plugin/llmops  (models, endpoints, drift; in the Airflow UI)\n"
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
            record = self.running(pid_file)
            if record is not None and record.stop():
                print(f"stopped {name} (pid {record.pid})")
                stopped = True
            pid_file.unlink(missing_ok=True)
        from airflow_llmops.platforms import get_platform

        endpoints_root = self.home / "llmops" / "endpoints"
        for server_file in sorted(endpoints_root.glob("*/server.json")):
            server = ProcessRecord.read(server_file)
            if server is not None and server.alive():
                get_platform("local", endpoints_root=str(endpoints_root)).stop_endpoint(server_file.parent.name)
                print(f"stopped endpoint {server_file.parent.name} (pid {server.pid})")
                stopped = True
        if not stopped:
            print("nothing to stop: no airflow standalone or MLflow server started by the demo is running")
        return 0


def _debug() -> bool:
    return os.environ.get("LLMOPS_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def report_failure(demo: Demo, err: BaseException) -> None:
    """What failed, on which DAG run and task, and where the logs are; no Python traceback (``LLMOPS_DEBUG=1``
    shows one)."""
    step = demo.step
    out = sys.stderr
    print(f"\n!! the demo failed while {step.what}: {type(err).__name__}: {err}", file=out)
    if step.dag_id and step.run_id and demo.api is not None:
        try:
            lines = explain_run(demo.api, step.dag_id, step.run_id, "not finished", log_root=demo.log_root)
        except Exception as again:  # the report must not fail in turn
            lines = [f"   ({step.dag_id} run {step.run_id}: its tasks could not be read: {again})"]
        print("\n".join(lines), file=out)
    elif step.dag_id:
        print(f"   DAG                       {step.dag_id}  ({demo.url}/dags/{step.dag_id})", file=out)
    print(f"   Airflow log               {demo.log_path}", file=out)
    print(f"   task logs                 {demo.log_root}/dag_id=<dag>/run_id=<run>/task_id=<task>/", file=out)
    if step.what.startswith("starting"):
        print(f"   last lines of the Airflow log:\n{tail(demo.log_path)}", file=out)
    print("   LLMOPS_DEBUG=1 ./scripts/demo ... shows the Python traceback", file=out)


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
    parser.add_argument(
        "--pipeline",
        choices=sorted(PIPELINES),
        default="local",
        help="local: llmops_local (topic classifier) and the drift loop; chat: llmops_chat (a chat assistant), "
        "then a chat with its endpoint through the openai client",
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project folder holding dags/")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LLMOPS_AIRFLOW_PORT", "8080")))
    parser.add_argument("--conf", default="{}", help="JSON conf (Params) for the triggered run")
    args = parser.parse_args(argv)
    try:
        conf = json.loads(args.conf)
    except ValueError as err:
        parser.error(f"--conf is not JSON: {err}")
    if not isinstance(conf, dict):
        parser.error("--conf must be a JSON object")
    try:
        demo = Demo(args.root.resolve(), args.port, pipeline=args.pipeline)
    except ValueError as err:  # e.g. LLMOPS_MLFLOW_PORT is not a number
        parser.error(str(err))
    try:
        return _run(demo, args.action, conf, drift=not args.no_drift)
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"\ninterrupted while {demo.step.what}; Airflow keeps running (./scripts/demo stop)", file=sys.stderr)
        return 130
    except Exception as err:
        if _debug():
            raise
        report_failure(demo, err)
        return 1


def _run(demo: Demo, action: str, conf: dict[str, Any], *, drift: bool) -> int:
    if action == "stop":
        demo.step.at("stopping the demo's processes")
        return demo.stop()
    demo.step.at("starting MLflow and airflow standalone")
    demo.ensure_airflow()
    if action == "drift":
        demo.step.at("logging in to the Airflow REST API")
        ok = demo.run_drift(demo.client(), None)
        demo.print_access()
        return 0 if ok else 1
    return demo.run_pipeline(conf, drift=drift)
