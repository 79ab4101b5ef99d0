"""The LLMOps page inside the Airflow UI: models, endpoints and drift, and the actions a DAG's editors may take.

Routes (under the plugin's ``/llmops`` prefix), each behind Airflow's own authentication (the UI's session cookie
or a bearer token) and authorisation:

- ``GET /ui/`` the page, ``GET /ui/task`` a task instance's report, ``GET /ui/static/<file>`` their script and
  style (bundled, no CDN);
- ``GET /ui/api/models|endpoints|drift|task|audit`` the data, read from the stores (:mod:`.ui_data`), filtered to
  the DAGs the user may read;
- ``POST /ui/api/endpoints/<platform>/<name>/rollback|pause|resume`` and ``POST /ui/api/models/<name>/promote``:
  allowed to users whom the auth manager lets edit (``PUT``) the DAG that owns the endpoint (the DAG whose run
  started its last rollout) or that produced the version; each is recorded in the audit log (who, when, what,
  outcome).

The page is plain HTML with a script and a style sheet from the package: ``Content-Security-Policy`` allows
scripts, styles, requests and frames from this origin only, and the script writes data with ``textContent``
(never ``innerHTML``). Actions need the ``X-LLMOps-Action`` header, which a cross-site form cannot send.
"""

# No "from __future__ import annotations": FastAPI must see the route annotations (GetUserDep is imported
# inside create_router, to keep plugin loading light) as objects, not strings.

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import APIRouter

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {
    "llmops.js": "text/javascript",
    "llmops.css": "text/css",
    "charts.js": "text/javascript",
    "widget.js": "text/javascript",
}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
ACTION_HEADER = "X-LLMOps-Action"
audit_log = logging.getLogger("airflow_llmops.ui.audit")
_audit_lock = threading.Lock()


def audit_path() -> Path:
    from airflow.sdk import conf

    from airflow_llmops.operators.base import airflow_home

    configured = conf.get("llmops", "ui_audit_log", fallback="")
    return Path(configured or os.path.join(airflow_home(), "llmops", "ui-actions.jsonl"))


def record_action(entry: dict[str, Any]) -> dict[str, Any]:
    """Append one action (who, when, what, outcome) to the audit log, and log it."""
    entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ts": time.time(), **entry}
    path = audit_path()
    with _audit_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
    audit_log.info("LLMOps page action: %s", json.dumps(entry, default=str))
    return entry


def read_actions(limit: int = 200) -> list[dict[str, Any]]:
    try:
        lines = audit_path().read_text(encoding="utf-8").splitlines()[-limit:]
    except OSError:
        return []
    out = []
    for line in reversed(lines):
        try:
            out.append(dict(json.loads(line)))
        except ValueError:
            continue
    return out


def _user_name(user: Any) -> str:
    for attr in ("get_name", "get_id"):
        fn = getattr(user, attr, None)
        if callable(fn):
            value = fn()
            if value:
                return str(value)
    return "?"


class Authz:
    """The auth manager's answers for one request's user, cached per (method, dag_id)."""

    def __init__(self, user: Any) -> None:
        self.user = user
        self._cache: dict[tuple[str, str | None], bool] = {}

    def dag(self, method: str, dag_id: str | None) -> bool:
        key = (method, dag_id)
        if key not in self._cache:
            from airflow.api_fastapi.app import get_auth_manager
            from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

            team = None
            if dag_id:
                try:
                    from airflow.models.dag import DagModel

                    team = DagModel.get_team_name(dag_id)
                except Exception:
                    team = None
            self._cache[key] = bool(
                get_auth_manager().is_authorized_dag(
                    method=method,  # type: ignore[arg-type]
                    details=DagDetails(id=dag_id, team_name=team),
                    user=self.user,
                )
            )
        return self._cache[key]

    def can_read(self, dag_id: str | None) -> bool:
        return self.dag("GET", dag_id)

    def can_edit(self, dag_id: str | None) -> bool:
        # No owning DAG recorded: nobody may act from the page (there is no DAG whose editors it belongs to).
        return bool(dag_id) and self.dag("PUT", dag_id)


def _page(name: str) -> Any:
    from fastapi.responses import HTMLResponse

    return HTMLResponse((STATIC / name).read_text(encoding="utf-8"), headers=PAGE_HEADERS)


def _endpoints(authz: Authz, *, with_series: bool = True) -> list[dict[str, Any]]:
    from airflow.sdk import conf

    from airflow_llmops.plugins import ui_data

    found = ui_data.list_local_endpoints(with_series=with_series)
    spec = conf.get("llmops", "ui_endpoints", fallback="")
    if spec:
        found += ui_data.cloud_endpoints(spec)
    visible = []
    for endpoint in found:
        owner = endpoint.get("owner_dag_id")
        if owner and not authz.can_read(owner):
            continue
        endpoint["can_edit"] = authz.can_edit(owner)
        visible.append(endpoint)
    return visible


def _preload() -> None:
    """Import what the routes use now, once: sync routes run in a thread pool, and several threads importing the
    same package cycle for the first time can see a module half-initialised."""
    import importlib

    for name in (
        "airflow_llmops.operators",
        "airflow_llmops.operators.deploy",
        "airflow_llmops.operators.drift",
        "airflow_llmops.platforms.localhost",
        "airflow_llmops.serving.client",
        "airflow_llmops.serving.request_log",
        "airflow_llmops.plugins.ui_actions",
        "mlflow.tracking",
    ):
        try:
            importlib.import_module(name)
        except ImportError as err:  # MLflow is an extra: the models tab then says why it is empty
            audit_log.debug("LLMOps page: %s not importable: %s", name, err)


def create_router() -> Any:
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import APIRouter, Depends

    _preload()
    read = [Depends(requires_access_dag(method="GET"))]
    router = APIRouter(prefix="/ui", dependencies=read)
    _page_routes(router)
    _data_routes(router)
    _action_routes(router)
    return router


def _page_routes(router: "APIRouter") -> None:
    from fastapi import HTTPException
    from fastapi.responses import Response

    @router.get("/", include_in_schema=False)
    def page() -> Any:
        return _page("llmops.html")

    @router.get("/task", include_in_schema=False)
    def task_page() -> Any:
        return _page("task.html")

    @router.get("/widget", include_in_schema=False)
    def widget_page() -> Any:
        return _page("widget.html")

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        return Response(
            (STATIC / name).read_bytes(),
            media_type=STATIC_FILES[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )


def _data_routes(router: "APIRouter") -> None:
    from airflow.api_fastapi.core_api.security import GetUserDep

    from airflow_llmops.plugins import ui_data

    @router.get("/api/me")
    def me(user: GetUserDep) -> dict[str, Any]:
        return {"user": _user_name(user)}

    @router.get("/api/models")
    def models(user: GetUserDep) -> dict[str, Any]:
        authz = Authz(user)
        try:
            data = ui_data.list_models()
        except Exception as err:
            return {"models": [], "error": f"cannot read the MLflow registry: {type(err).__name__}: {str(err)[:300]}"}
        for model in data["models"]:
            for version in model["versions"]:
                version["can_promote"] = authz.can_edit(version.get("dag_id"))
        return data

    @router.get("/api/endpoints")
    def endpoints(user: GetUserDep, series: bool = True) -> dict[str, Any]:
        return {"endpoints": _endpoints(Authz(user), with_series=series), "now": time.time()}

    @router.get("/api/drift")
    def drift(user: GetUserDep) -> dict[str, Any]:
        authz = Authz(user)
        data = ui_data.list_drift(allowed=authz.can_read)
        names = [m["name"] for m in data["models"]]
        try:
            retrains = ui_data.retrain_runs(names)
        except Exception as err:
            data["retrain_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            retrains = {}
        for model in data["models"]:
            model["retrains"] = [
                {**event, "runs": [r for r in event["runs"] if authz.can_read(r["dag_id"])]}
                for event in retrains.get(model["name"], [])
            ]
        return data

    @router.get("/api/task")
    def task(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        # requires_access_dag (the router's) reads dag_id from the query: only readers of this DAG get here.
        return ui_data.task_report(dag_id, run_id, task_id, map_index)

    @router.get("/api/audit")
    def audit(user: GetUserDep) -> dict[str, Any]:
        authz = Authz(user)
        return {"actions": [a for a in read_actions() if authz.can_read(a.get("dag_id"))]}


def _guard(request: Any) -> None:
    from fastapi import HTTPException

    if request.headers.get(ACTION_HEADER) != "1":
        raise HTTPException(400, f"actions need the {ACTION_HEADER}: 1 header")


def _endpoint_action(action: str, platform: str, name: str, *, request: Any, user: Any, body: Any) -> dict[str, Any]:
    """Roll back, pause or resume: the same checks (header, owner, edit access) and the same audit record."""
    from fastapi import HTTPException

    from airflow_llmops.plugins import ui_actions

    _guard(request)
    default = {"rollback": "rolled back", "pause": "paused", "resume": "resumed"}[action]
    reason = str((body or {}).get("reason") or f"{default} from the LLMOps page")[:300]
    who = _user_name(user)
    try:
        target = ui_actions.endpoint_target(platform, name)
    except LookupError as err:
        raise HTTPException(404, str(err)) from None
    base = {"user": who, "action": action, "target": f"{platform}:{name}", "dag_id": target.owner}
    if not Authz(user).can_edit(target.owner):
        record_action({**base, "outcome": "refused", "detail": "no edit access to the owning DAG"})
        raise HTTPException(403, f"{who} may not edit DAG {target.owner!r}, which owns endpoint {name}")
    try:
        if action == "rollback":
            outcome = ui_actions.rollback(target, who=who, reason=reason)
        elif action == "pause":
            outcome = ui_actions.pause(target, who=who, reason=reason)
        else:
            outcome = ui_actions.resume(target, who=who)
    except ui_actions.ActionError as err:
        record_action({**base, "outcome": "failed", "detail": str(err)})
        raise HTTPException(409, str(err)) from None
    detail = {"reason": reason} if action != "resume" else {}
    return {"ok": True, **record_action({**base, "outcome": "done", **detail, **outcome})}


def _action_routes(router: "APIRouter") -> None:
    from typing import Annotated

    from airflow.api_fastapi.core_api.security import GetUserDep
    from fastapi import Body, HTTPException, Request

    from airflow_llmops.plugins import ui_actions

    Payload = Annotated[dict[str, Any] | None, Body()]

    @router.post("/api/endpoints/{platform}/{name}/rollback")
    def rollback(platform: str, name: str, request: Request, user: GetUserDep, body: Payload = None) -> dict[str, Any]:
        return _endpoint_action("rollback", platform, name, request=request, user=user, body=body)

    @router.post("/api/endpoints/{platform}/{name}/pause")
    def pause(platform: str, name: str, request: Request, user: GetUserDep, body: Payload = None) -> dict[str, Any]:
        return _endpoint_action("pause", platform, name, request=request, user=user, body=body)

    @router.post("/api/endpoints/{platform}/{name}/resume")
    def resume(platform: str, name: str, request: Request, user: GetUserDep, body: Payload = None) -> dict[str, Any]:
        return _endpoint_action("resume", platform, name, request=request, user=user, body=body)

    @router.post("/api/models/{name}/promote")
    def promote(name: str, request: Request, user: GetUserDep, body: Payload = None) -> dict[str, Any]:
        _guard(request)
        version, alias = str((body or {}).get("version") or ""), str((body or {}).get("alias") or "champion")
        who = _user_name(user)
        try:
            owner = ui_actions.version_owner(name, version)
        except LookupError as err:
            raise HTTPException(404, str(err)) from None
        base = {"user": who, "action": "promote", "target": f"{name}/{version}@{alias}", "dag_id": owner}
        if not Authz(user).can_edit(owner):
            record_action({**base, "outcome": "refused", "detail": "no edit access to the owning DAG"})
            raise HTTPException(403, f"{who} may not edit DAG {owner!r}, which produced {name} version {version}")
        try:
            moved = ui_actions.promote(name, version, alias, who=who)
        except ui_actions.ActionError as err:
            record_action({**base, "outcome": "failed", "detail": str(err)})
            raise HTTPException(409, str(err)) from None
        return {"ok": True, **record_action({**base, "outcome": "done", "record": moved})}


def is_ui_path(request: Any) -> bool:
    path = str(request.url.path)
    root = str(request.scope.get("root_path") or "")
    relative = path[len(root) :] if root and path.startswith(root) else path
    return relative == "/ui" or relative.startswith("/ui/")
