"""Production mode: the local reference DAG under PostgreSQL + CeleryExecutor + Redis, all real processes.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth) and Redis on 127.0.0.1:6379: skipped where absent, failed under
CI=true. The run is triggered and read back only through the REST API.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

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


def test_local_dag_runs_on_celery_with_postgres(tmp_path: Path, postgres_db: str, redis_url: str):
    from airflow_llmops.devstack.cluster import AirflowCluster
    from airflow_llmops.devstack.mlflow_server import MLflowServer
    from airflow_llmops.platforms.local_serving import LocalEndpoints

    mlflow_server = MLflowServer(tmp_path / "mlflow").start()

    result_backend = "db+" + postgres_db.replace("+psycopg2", "")
    env = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_db,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__LLMOPS__ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the run the test triggers
        "AIRFLOW__LLMOPS__MLFLOW_TRACKING_URI": mlflow_server.url,
        "AIRFLOW__LLMOPS__LOCAL_ENDPOINTS_ROOT": str(tmp_path / "endpoints"),
    }
    # The triggerer walks the deferred rollout.
    components = ("api-server", "scheduler", "dag-processor", "triggerer", "celery worker")
    with (
        AirflowCluster(tmp_path / "home", DAGS, extra_env=env, components=components) as cluster,
        _stopped(mlflow_server, LocalEndpoints(tmp_path / "endpoints")),
    ):
        client = cluster.client
        client.wait_for_dag("llmops_local", timeout=240)
        client.unpause("llmops_local")
        conf = {"rollout_strategy": "blue_green", "max_steps": 20, "quantization_methods": ["torch_dynamic_int8"]}
        run_id = client.trigger("llmops_local", conf)
        state = client.wait_for_run("llmops_local", run_id, timeout=900, check=cluster.assert_alive)
        cluster.assert_alive()
        tis = {ti["task_id"]: ti for ti in client.task_instances("llmops_local", run_id)}
        worker_log = cluster.log("celery worker").read_text(errors="replace")
        assert state == "success", (tis, worker_log[-3000:])
        assert tis["plan"]["state"] == "success"
        assert tis["plan"]["executor"] in (None, "CeleryExecutor")
        # The Celery worker, not some other executor, ran the task.
        assert "execute_workload" in worker_log or "airflow.providers.celery" in worker_log, worker_log[-2000:]
        plan = client.xcom("llmops_local", run_id, "plan")
        assert plan["specs"]["rollout"]["strategy"] == "blue_green"
        assert plan["specs"]["training"]["max_steps"] == 20
        trained = client.xcom("llmops_local", run_id, "train")
        assert trained["metrics"]["train_tokens"] > 0 and Path(trained["model_uri"]).is_dir()
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
        self.endpoints.stop_server("chatterbot-topics")
        self.server.stop()
