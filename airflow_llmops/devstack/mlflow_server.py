"""A real MLflow tracking server on loopback: SQLite backend and a local artifact folder by default."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from airflow_llmops.processes import ManagedProcess, free_port, http_ok


class MLflowServer:
    """``mlflow server`` as a process group of its own (it forks workers: stop it by group)."""

    def __init__(self, root: Path, *, port: int | None = None, backend_store_uri: str | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.process: ManagedProcess | None = None

    def argv(self) -> list[str]:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        return [
            mlflow,
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")

    def start(self, *, timeout: float = 180.0) -> MLflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        # MLflow 3's job runner (GenAI judges and prompt optimisation, unused here) forks about eight huey consumer
        # processes that each import MLflow and then poll: a CPU core's worth on a small machine. Off unless asked.
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        }
        self.process = ManagedProcess(
            "mlflow server", self.argv(), self.root / "server.log", env=env, cwd=self.root
        ).start()
        self.process.wait_until(self.healthy, timeout=timeout, what="healthy MLflow server", interval=1)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
