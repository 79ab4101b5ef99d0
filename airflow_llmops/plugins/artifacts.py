"""Serve the local artifact store (reports, manifests) inside the Airflow UI, behind Airflow's own auth.

Artifacts live under ``<artifact_root>/<dag_id>/...``; reading one requires read access to that DAG, so a user
sees the reports of exactly the DAGs the auth manager lets them see. Remote stores link to their cloud console.

Reports are HTML written from data a pipeline saw (dataset texts, model outputs): every answer carries
``Content-Security-Policy: sandbox``, so a script in a report runs, if at all, in an opaque origin without the
Airflow UI's cookies or API, and ``X-Content-Type-Options: nosniff``, so no file is taken for HTML by sniffing.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)
SECURITY_HEADERS = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}


def _local_root() -> Path | None:
    from airflow_llmops.operators.base import default_artifact_root

    root = default_artifact_root()
    if root.startswith("file://"):
        return Path(root.removeprefix("file://")).resolve()
    if "://" not in root:
        return Path(root).resolve()
    return None


def create_app() -> Any:
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import FileResponse

    from airflow_llmops.plugins.ui import PAGE_HEADERS, create_router, is_ui_path

    app = FastAPI(title="airflow-llmops artifacts", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/artifacts/{dag_id}/{path:path}", dependencies=[Depends(requires_access_dag(method="GET"))])
    def artifact(dag_id: str, path: str) -> FileResponse:
        root = _local_root()
        if root is None:
            raise HTTPException(404, "the artifact store is not a local folder; open the link to its console")
        target = (root / dag_id / path).resolve()
        if not target.is_relative_to(root / dag_id):
            raise HTTPException(400, "path leaves the DAG's artifact folder")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            raise HTTPException(404, f"no artifact {dag_id}/{path}")
        media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return FileResponse(target, media_type=media_type, headers=SECURITY_HEADERS)

    app.include_router(create_router())

    @app.middleware("http")
    async def security_headers(request: Any, call_next: Any) -> Any:
        # Error answers too: a 404 page echoes the requested path. The LLMOps page's own routes get a policy that
        # lets its bundled script run (same origin only); everything else, reports above all, is sandboxed.
        response = await call_next(request)
        headers = PAGE_HEADERS if is_ui_path(request) else SECURITY_HEADERS
        for name, value in headers.items():
            if name != "Cache-Control":
                response.headers.setdefault(name, value)
        return response

    return app


class LazyApp:
    """An ASGI app built on its first request, so that loading plugins (done by every Airflow component)
    does not import FastAPI and the API server's security modules where they are never served.

    In the API server it is built ahead, in a background thread started when the server starts (:class:`WarmUp`),
    so the page's first request does not pay for the imports; a request that comes first waits for that build."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()
        self.warmed = threading.Event()

    def build(self) -> Any:
        with self._lock:
            if self._app is None:
                self._app = create_app()
            return self._app

    def warm(self) -> None:
        """Build the app, open the stores' clients (MLflow's lazy imports and connection) and parse the drift
        windows into their cache: read-only."""
        try:
            self.build()
            from airflow_llmops.plugins import ui_data

            ui_data.list_drift()
            if ui_data.tracking_uri():
                ui_data.list_models()
        except Exception as err:  # the first request will say what is wrong
            log.info("LLMOps page warm-up: %s: %s", type(err).__name__, err)
        finally:
            self.warmed.set()

    def warm_in_background(self) -> None:
        threading.Thread(target=self.warm, name="llmops-ui-warm-up", daemon=True).start()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self._app
        if app is None:
            import asyncio

            app = await asyncio.to_thread(self.build)  # not on the event loop: the API server keeps serving
        await app(scope, receive, send)


APP = LazyApp()


class WarmUp:
    """A pass-through root middleware of the API server, instantiated once when the server starts (and only there):
    it starts building the LLMOps page's app in the background, see :class:`LazyApp`."""

    def __init__(self, app: Any) -> None:
        from airflow.configuration import conf

        self.app = app
        if conf.getboolean("llmops", "ui_warm_up", fallback=True):
            APP.warm_in_background()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class LLMOpsPlugin(AirflowPlugin):
    name = "llmops"
    fastapi_apps = [{"app": APP, "url_prefix": "/llmops", "name": "LLMOps artifacts"}]
    fastapi_root_middlewares = [{"middleware": WarmUp, "name": "LLMOps page warm-up"}]
    # The LLMOps page in the navigation, and a task instance's report on every task's page (Airflow 3.1+ renders
    # both in an iframe; the routes ask Airflow's auth for the UI's session).
    external_views = [
        {"name": "LLMOps", "href": "/llmops/ui/", "destination": "nav", "url_route": "llmops"},
        {
            "name": "LLMOps report",
            "href": "/llmops/ui/task?dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}&map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": "llmops-report",
        },
    ]
    # Endpoints' health and the last drift verdicts on Airflow's home page (Airflow 3.3: react apps may go there).
    react_apps = [
        {"name": "LLMOps widget", "bundle_url": "/llmops/ui/static/widget.js", "destination": "dashboard"},
    ]
