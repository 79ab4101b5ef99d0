"""Airflow's components as separate real processes (api-server, scheduler, dag-processor, triggerer, workers).

Used by system tests to run DAGs the way a deployment does, including production mode: PostgreSQL metadata
database and the CeleryExecutor with a Redis broker.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from airflow_llmops.devstack.airflow_api import AirflowClient
from airflow_llmops.devstack.env import airflow_env
from airflow_llmops.processes import ManagedProcess, free_port

DEFAULT_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


class AirflowCluster:
    """Start with ``with AirflowCluster(home, dags) as cluster: cluster.client.trigger(...)``.

    :param extra_env: overrides such as the database URL and the executor.
    :param components: Airflow sub-commands to run, with options where needed; ``celery worker`` adds a Celery
        worker. :meth:`log` takes the same string.
    :param separate_homes: run each component in a folder of its own (``home/components/<name>``: its
        ``AIRFLOW_HOME``, ``HOME`` and working directory), as containers would. Then the components share only what
        ``extra_env`` points them all at (database, broker, DAGs folder, shared folders such as the local platform's
        jobs and endpoints), the task logs folder (a shared volume in a compose stack) and the keys every component
        of a deployment must agree on (JWT secret, Fernet key, API secret key), which are set here.
    """

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        *,
        extra_env: dict[str, str] | None = None,
        components: Sequence[str] = DEFAULT_COMPONENTS,
        startup_timeout: float = 240.0,
        separate_homes: bool = False,
    ) -> None:
        from cryptography.fernet import Fernet

        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(16)
        self.env = airflow_env(home, dags_folder, port=self.port)
        self.env.update(
            {
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                # Otherwise each AIRFLOW_HOME generates its own into airflow.cfg, and with separate homes the
                # triggerer could not decrypt the trigger arguments the API server stored.
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            }
        )
        # The one metadata database (SQLite in the home's folder unless given), also when each component has a home.
        self.env.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
        self.env.update(extra_env or {})
        self.components = list(components)
        self.startup_timeout = startup_timeout
        self.separate_homes = separate_homes
        self.processes: list[ManagedProcess] = []
        self.client = AirflowClient(self.url, "admin", self.password)

    @property
    def airflow(self) -> str:
        return str(Path(sys.executable).with_name("airflow"))

    def log(self, component: str) -> Path:
        return self.home / "logs" / f"{component.replace(' ', '-')}.log"

    def component_home(self, component: str) -> Path:
        """The component's own folder with ``separate_homes`` (``home/components/celery-worker`` for ``celery worker
        --queues q``; numbered where two components share a name), else the shared ``home``."""
        if not self.separate_homes:
            return self.home

        def name(command: str) -> str:
            words = list(itertools.takewhile(lambda word: not word.startswith("-"), command.split()))
            return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(words))

        same = [c for c in self.components if name(c) == name(component)]
        suffix = f"-{same.index(component) + 1}" if len(same) > 1 and component in same else ""
        return self.home / "components" / f"{name(component)}{suffix}"

    def start(self) -> AirflowCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({"admin": self.password}))
        migrate = subprocess.run(
            [self.airflow, "db", "migrate"], check=False, env=self.env, capture_output=True, text=True, timeout=300
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}\n{migrate.stderr[-3000:]}")
        for component in self.components:
            words = component.split()  # a component may carry options: "celery worker --queues q"
            argv = [self.airflow, *words]
            if words[:1] in (["scheduler"], ["triggerer"]) or words[:2] == ["celery", "worker"]:
                argv.append("--skip-serve-logs")
            folder = self.component_home(component)
            env = self.env
            if self.separate_homes:
                folder.mkdir(parents=True, exist_ok=True)
                env = {
                    **self.env,
                    "AIRFLOW_HOME": str(folder),
                    "AIRFLOW_CONFIG": str(folder / "airflow.cfg"),
                    "HOME": str(folder),
                }
            proc = ManagedProcess(component, argv, self.log(component), env=env, cwd=folder)
            self.processes.append(proc.start())
        api = next(p for p in self.processes if p.name == "api-server")
        api.wait_until(self.client.healthy, timeout=self.startup_timeout, what="healthy api-server", interval=2)
        return self

    def assert_alive(self) -> None:
        dead = [p.name for p in self.processes if not p.alive()]
        if dead:
            raise RuntimeError(f"Airflow components exited: {dead}; logs in {self.home / 'logs'}")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def __enter__(self) -> AirflowCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
