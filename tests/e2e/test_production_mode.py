"""Production mode: the local reference DAG under PostgreSQL + CeleryExecutor + Redis, all real processes.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379: skipped where absent, failed under
CI=true. The run is triggered and read back only through the REST API.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import DAGS, require_service

pytestmark = pytest.mark.e2e


@pytest.fixture
def postgres_db():
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg2

    name = f"llmops_prod_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def redis_url():
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    db = 7
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    yield f"redis://127.0.0.1:6379/{db}"
    client.flushdb()


def _celery_workers(broker_url: str, node: str, queue: str) -> tuple[list[str], dict[str, Any], list[str]]:
    """What Celery itself reports (remote control over the broker): the queues worker ``node`` consumes, its
    stats (``total``: tasks executed, by name), and every worker on the broker that consumes ``queue``."""
    from celery import Celery

    app = Celery("llmops-e2e-inspect", broker=broker_url)
    try:
        ours = app.control.inspect(destination=[node], timeout=15)  # returns once the one node has answered
        queues = [q["name"] for q in (ours.active_queues() or {}).get(node) or []]
        stats = (ours.stats() or {}).get(node) or {}
        everyone = app.control.inspect(timeout=3).active_queues() or {}  # all workers: waits the 3 s
    finally:
        app.close()
    consumers = sorted(n for n, qs in everyone.items() if any(q["name"] == queue for q in qs))
    return queues, stats, consumers


def test_local_dag_runs_on_celery_with_postgres(tmp_path: Path, postgres_db: str, redis_url: str):
    from airflow.sdk.api.client import get_hostname

    from airflow_llmops.devstack.cluster import AirflowCluster
    from airflow_llmops.devstack.mlflow_server import MLflowServer
    from airflow_llmops.platforms import get_platform

    mlflow_server = MLflowServer(tmp_path / "mlflow").start()

    # A queue of this test's own, served by one worker with a name of its own: a task instance whose queue is that
    # queue and whose hostname is the worker's host went through that worker (and Celery counts what it ran).
    tag = uuid.uuid4().hex[:8]
    queue = f"llmops-e2e-{tag}"
    host = get_hostname()  # what the task runner records as a task instance's hostname ([core] hostname_callable)
    node = f"llmops-e2e-{tag}@{host}"
    worker = f"celery worker --queues {queue} --celery-hostname {node}"
    result_backend = "db+" + postgres_db.replace("+psycopg2", "")
    # Each component runs in a folder of its own (AIRFLOW_HOME, HOME, working directory), as in containers. They
    # share what a compose stack shares: the database, the broker, the DAGs folder, MLflow, the task logs, the
    # artifact root (an object store there) and one volume for the local platform's training jobs and endpoints.
    shared = tmp_path / "shared"
    env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_db,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,  # every task of the DAG goes to it
        "AIRFLOW__LLMOPS__ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the run the test triggers
        "AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI": mlflow_server.url,
        "AIRFLOW__LLMOPS__LOCAL_JOBS_ROOT": str(shared / "jobs"),
        "AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT": str(shared / "endpoints"),
        # Training waits in the triggerer (the first model's rollout has nothing to wait for, so it does not defer).
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
    }
    components = ("api-server", "scheduler", "dag-processor", "triggerer", worker)
    with (
        AirflowCluster(tmp_path / "home", DAGS, extra_env=env, components=components, separate_homes=True) as cluster,
        _stopped(mlflow_server, get_platform("local", endpoints_root=str(shared / "endpoints"))),
    ):
        client = cluster.client
        client.wait_for_dag("llmops_local", timeout=240)
        client.unpause("llmops_local")
        conf = {"rollout_strategy": "blue_green", "max_steps": 20, "quantization_methods": ["torch_dynamic_int8"]}
        run_id = client.trigger("llmops_local", conf)
        seen: dict[str, set[str]] = {}

        def watch() -> None:  # every state each task instance is seen in while the run goes on
            cluster.assert_alive()
            for ti in client.task_instances("llmops_local", run_id):
                seen.setdefault(ti["task_id"], set()).add(str(ti["state"]))

        state = client.wait_for_run("llmops_local", run_id, timeout=900, poll=1.0, check=watch)
        cluster.assert_alive()
        tis = {ti["task_id"]: ti for ti in client.task_instances("llmops_local", run_id)}
        worker_log = cluster.log(worker).read_text(errors="replace")
        assert state == "success", (tis, worker_log[-3000:])
        assert tis["plan"]["state"] == "success"
        assert tis["plan"]["executor"] in (None, "CeleryExecutor")

        # The Celery worker, not some other executor, ran every task: Celery says the worker serves exactly our
        # queue (and no other worker on this broker does) and has executed at least one workload per task
        # instance; each task instance, read through the REST API, was queued on that queue and ran on that host.
        queues, stats, consumers = _celery_workers(redis_url, node, queue)
        assert queues == [queue], (node, queues)
        assert consumers == [node], consumers
        ran = [ti for ti in tis.values() if ti["state"] == "success"]
        assert {ti["task_id"] for ti in ran} == set(tis), {t: ti["state"] for t, ti in tis.items()}
        executed = (stats.get("total") or {}).get("execute_workload", 0)
        assert executed >= len(ran), (executed, stats.get("total"), len(ran))
        wrong = {
            ti["task_id"]: (ti.get("queue"), ti.get("hostname"))
            for ti in ran
            if ti.get("queue") != queue or ti.get("hostname") != node.split("@", 1)[1]
        }
        assert not wrong, f"task instances not run by the Celery worker {node} on queue {queue}: {wrong}"

        plan = client.xcom("llmops_local", run_id, "plan")
        assert plan["specs"]["rollout"]["strategy"] == "blue_green"
        assert plan["specs"]["training"]["max_steps"] == 20
        assert "deferred" in seen["train"], seen  # the training job was waited for by the triggerer
        trained = client.xcom("llmops_local", run_id, "train")
        assert trained["metrics"]["train_tokens"] > 0 and Path(trained["model_uri"]).is_dir()
        # The job and the endpoint are in the shared folder; no component kept local platform state in its own home.
        assert Path(trained["model_uri"]).is_relative_to(shared / "jobs"), trained["model_uri"]
        assert (shared / "endpoints" / "chatterbot-topics" / "admin-token").is_file()
        homes = {cluster.component_home(component) for component in components}
        assert len(homes) == len(components) and all(home.is_dir() for home in homes), homes
        private = sorted(str(p) for home in homes for p in home.glob("llmops/*/*"))
        assert not private, private
        assert Path(plan["plan_uri"].removeprefix("file://")).is_file()
        assert tis["train"]["state"] == "success" and tis["validate"]["state"] == "success"
        assert os.path.commonpath([plan["plan_uri"].removeprefix("file://"), str(tmp_path)]) == str(tmp_path)
        rolled = client.xcom("llmops_local", run_id, "rollout")
        assert rolled["state"] == "succeeded" and tis["rollout"]["state"] == "success"
        deployed = client.xcom("llmops_local", run_id, "deploy")
        assert deployed["url"].startswith("http://127.0.0.1:")


class _stopped:
    """Stops the MLflow server and the endpoint the run started, whatever the test's outcome."""

    def __init__(self, server, endpoints) -> None:
        self.server, self.endpoints = server, endpoints

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.endpoints.stop_endpoint("chatterbot-topics")
        self.server.stop()
