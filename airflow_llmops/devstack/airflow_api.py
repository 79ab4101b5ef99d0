"""A small client of Airflow 3's public REST API (``/api/v2``): log in, unpause, trigger and follow DAG runs."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

TERMINAL_RUN_STATES = ("success", "failed")


class AirflowAPIError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:500]}")


class AirflowClient:
    """Talks to an Airflow api-server with the simple auth manager's (or any JWT) login."""

    def __init__(self, base_url: str, username: str, password: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.timeout = timeout
        self._token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token()}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise AirflowAPIError(method, url, err.code, err.read().decode(errors="replace")) from None
        return json.loads(raw) if raw else None

    def token(self) -> str:
        if self._token is None:
            out = self._request(
                "POST", "/auth/token", {"username": self.username, "password": self._password}, auth=False
            )
            self._token = str(out["access_token"])
        return self._token

    def healthy(self) -> bool:
        try:
            health = self._request("GET", "/api/v2/monitor/health", auth=False)
        except (AirflowAPIError, urllib.error.URLError, OSError):
            return False
        return bool(health) and health.get("metadatabase", {}).get("status") == "healthy"

    def get_dag(self, dag_id: str) -> dict[str, Any] | None:
        try:
            return dict(self._request("GET", f"/api/v2/dags/{urllib.parse.quote(dag_id)}"))
        except AirflowAPIError as err:
            if err.status == 404:
                return None
            raise

    def wait_for_dag(self, dag_id: str, *, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until the DAG processor has parsed ``dag_id``; fail with its import error if it has one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dag = self.get_dag(dag_id)
            if dag is not None:
                return dag
            errors = self._request("GET", "/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise RuntimeError(f"DAG files failed to import: {json.dumps(errors, indent=1)[:2000]}")
            time.sleep(2)
        raise TimeoutError(f"DAG {dag_id!r} not parsed after {timeout:.0f}s")

    def unpause(self, dag_id: str) -> None:
        self._request("PATCH", f"/api/v2/dags/{urllib.parse.quote(dag_id)}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, *, run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        out = self._request("POST", f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns", body)
        return str(out["dag_run_id"])

    def runs(self, dag_id: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """The DAG's newest runs first."""
        path = f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns?order_by=-run_after&limit={limit}"
        return list(self._request("GET", path)["dag_runs"])

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> None:
        """Mark a run ``success``, ``failed`` or ``queued`` (marking it failed stops its running tasks)."""
        path = f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
        self._request("PATCH", path, {"state": state})

    def upstream_asset_events(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The asset events that created an asset-triggered run. Airflow 3.3.2 answers HTTP 500 while a run those
        events created is still queued (apache/airflow#71360): ask once the run has started."""
        path = (
            f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
            "/upstreamAssetEvents"
        )
        return list(self._request("GET", path)["asset_events"])

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        path = f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
        return dict(self._request("GET", path))

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        *,
        timeout: float = 600.0,
        poll: float = 2.0,
        check: Callable[[], None] | None = None,
    ) -> str:
        """Poll until the run ends; ``check`` runs each round and may raise (e.g. a component died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check is not None:
                check()
            state = str(self.get_run(dag_id, run_id)["state"])
            if state in TERMINAL_RUN_STATES:
                return state
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} of {dag_id} not finished after {timeout:.0f}s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
        return list(self._request("GET", path)["task_instances"])

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", *, missing_ok: bool = False
    ) -> Any:
        """An XCom value; with ``missing_ok``, None where the task pushed none (skipped, failed, not run)."""
        path = (
            f"/api/v2/dags/{urllib.parse.quote(dag_id)}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
            f"/taskInstances/{urllib.parse.quote(task_id)}/xcomEntries/{urllib.parse.quote(key)}?deserialize=true"
        )
        try:
            return self._request("GET", path).get("value")
        except AirflowAPIError as err:
            if missing_ok and err.status == 404:
                return None
            raise
