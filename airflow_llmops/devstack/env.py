"""Environment for an Airflow whose home, DAGs and artifacts live inside the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def airflow_env(
    home: Path,
    dags_folder: Path,
    *,
    port: int,
    parallelism: int = 4,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """Settings shared by the demo and the system tests (SQLite unless the caller overrides the database)."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # 2-core machines: the defaults (32 task slots, 4 API workers) cost gigabytes for nothing.
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__LLMOPS__ARTIFACT_ROOT": str(home.parent / ".llmops" / "artifacts"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "NO_PROXY": "*",
            # standalone starts its components as `airflow ...` from PATH: use this environment's.
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)]),
        }
    )
    return env


def generated_admin_password(home: Path) -> str | None:
    """The simple auth manager writes the admin password it generated into ``$AIRFLOW_HOME``."""
    import json

    path = home / "simple_auth_manager_passwords.json.generated"
    try:
        return str(json.loads(path.read_text())["admin"])
    except (OSError, KeyError, ValueError):
        return None
