"""An Azure ML stand-in for tests: the ARM REST operations ``azure-ai-ml``'s ``MLClient`` and ``azure-mgmt-monitor``'s
``MonitorManagementClient`` call, served in process (no sockets for the control plane), with command jobs and online
deployments that really run, as local processes.

There is no Azure account here. :class:`AzureMLStandIn` is a ``requests`` transport adapter mounted on ``https://``
of a ``requests.Session``; the real clients talk to it through ``RequestsTransport(session=...,
session_owner=False)`` (:meth:`AzureMLStandIn.client_kwargs`; :meth:`AzureMLStandIn.install` hands that to the
adapter's test hook ``airflow_llmops.platforms.azureml.adapter.client_factory``). Request bodies are those the SDK
builds; responses carry the service's defaults (ids, ``systemData``, ``provisioningState``, ``scaleSettings``,
``requestSettings``, probes, ``services.Studio``), and long-running operations answer ``201``/``202`` with
``Azure-AsyncOperation`` and ``retry-after-ms: 10`` (so the SDK's pollers stay fast).

* Workspace ``GET``; environments (``PUT``/``GET`` versions; the SDK registers an inline ``Environment`` as an
  anonymous version); computes ``GET`` for the clusters given (``computes``).
* Command jobs (``PUT``, ``GET``, ``POST .../cancel`` as a long-running operation): the clock moves a job
  NotStarted -> Starting -> Running -> Completed / Failed / (CancelRequested ->) Canceled. Running starts one process
  per instance (``resources.instanceCount``; PyTorch distribution with ``processCountPerInstance`` 1) running the
  job's ``command`` under ``bash -c`` (``python`` is this interpreter) with the job's ``environmentVariables`` and
  Azure ML's: ``AZUREML_RUN_ID``, ``AZUREML_NODE_COUNT``, ``NODE_RANK``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` (127.0.0.1) and ``MASTER_PORT`` (a free port), plus ``LLMOPS_WORK_DIR`` (the node's folder). A node
  that exits non-zero fails the job (the others get SIGTERM, SIGKILL after ``stop_grace_seconds``).
  :meth:`AzureMLStandIn.preempt` kills a low-priority (``queueSettings.jobTier`` Spot) job's nodes and starts them
  again on fresh folders, as Azure ML does with preempted low-priority nodes.
* Managed online endpoints (``PUT``/``GET``/``DELETE``, list) and deployments (``PUT``/``GET``/``DELETE``, list).
  A deployment starts the real model server (``python -m airflow_llmops.ml.runtime serve``) with the deployment's
  ``environmentVariables`` on a free port standing for the container's port; its operation succeeds when the
  environment's readiness route answers 200 (fails with the server's last log lines otherwise). Endpoint updates are
  checked as Azure ML checks them: ``traffic`` whole percents over existing deployments summing to 100,
  ``mirrorTraffic`` one deployment at most 50 % and not one with live traffic; a deployment with live or mirrored
  traffic cannot be deleted.
* Scoring (``POST https://<endpoint>.<location>.inference.ml.azure.com/score`` with the endpoint key, or
  :meth:`AzureMLStandIn.score`) picks a deployment by ``traffic`` (seeded; the ``azureml-model-deployment`` header
  picks one directly), forwards the body to its scoring route and copies ``mirrorTraffic`` % of the requests to the
  mirrored deployment (answers discarded). :meth:`AzureMLStandIn.fail_deployment` makes a deployment answer errors.
* Azure Monitor (``GET {endpoint id}/providers/Microsoft.Insights/metrics``): ``RequestsPerMinute`` (dimensions
  ``deployment``, ``statusCode``, ``statusCodeClass``) and ``RequestLatency_P50/P90/P95/P99`` (``deployment``),
  computed from the requests routed, in grains of ``interval`` from the timespan's start; ``$filter`` terms
  ``dim eq 'value'`` (``'*'`` splits by the dimension) joined by ``and``.

* Every job gets Azure ML's MLflow variables over its own (``MLFLOW_TRACKING_URI`` = the workspace's tracking store,
  here a SQLite store under the root, :attr:`AzureMLStandIn.tracking_uri`; ``MLFLOW_RUN_ID`` = the job's run there,
  created before the job starts; ``MLFLOW_EXPERIMENT_ID``; ``MLFLOW_TRACKING_TOKEN``).
* Sweep jobs (``jobType`` Sweep): ``searchSpace`` (choice, uniform, loguniform, quniform, qloguniform, randint) sampled
  at random whatever ``samplingAlgorithm`` says (Bayesian sampling's rule — choice, uniform and quniform only — is
  checked), each trial a command job ``<sweep>_<n>`` of ``trial`` with ``${{search_space.x}}`` substituted, at most
  ``limits.maxConcurrentTrials`` at once up to ``maxTotalTrials``; a trial's score is the last value of
  ``objective.primaryMetric`` in its MLflow run; the sweep ends Completed with ``properties.best_child_run_id`` (Failed
  when no trial scored), cancel cancels its trials. No early termination and no ``limits.timeout``. The trials are
  listed through run history (``GET {discovery api}/history/v1.0/.../runs/<sweep>/children``, the workspace's
  ``discoveryUrl`` answered too).

Not emulated: code and data uploads, registered models, early termination, pipelines, batch endpoints, keys rotation,
identity and RBAC (any token passes). :attr:`AzureMLStandIn.calls` lists the requests (``"VERB /path"``, the
workspace prefix shortened to ``~``), :attr:`AzureMLStandIn.errors` what went wrong inside (a test asserts it
stays empty).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
import urllib3

from airflow_llmops.ml.training.jobdir import CHECKPOINT_PATTERN, STATE_FILE, WEIGHT_FILES
from airflow_llmops.processes import child_env, free_port

from .sagemaker import _remember, _signal_group, _signal_tree, _tail

SUBSCRIPTION = "00000000-0000-4000-8000-000000000001"
RESOURCE_GROUP = "llmops-rg"
WORKSPACE = "llmops-ws"
LOCATION = "eastus"
ARM = "https://management.azure.com"
PROVIDER = "Microsoft.MachineLearningServices"
_TERMINAL = ("Completed", "Failed", "Canceled")
_PERCENTILES = {"RequestLatency_P50": 50, "RequestLatency_P90": 90, "RequestLatency_P95": 95, "RequestLatency_P99": 99}


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _duration(text: str) -> float:
    """``PT1M``, ``PT5M``, ``PT1H``, ``P1D`` -> seconds."""
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", text or "")
    if not match or not any(match.groups()):
        raise ArmError(400, "BadRequest", f"Invalid interval {text!r}")
    d, h, m, s = (int(g or 0) for g in match.groups())
    return float(((d * 24 + h) * 60 + m) * 60 + s)


def _system_data() -> dict[str, Any]:
    stamp = _now()
    return {
        "createdAt": stamp,
        "createdBy": "llmops-standin",
        "createdByType": "Application",
        "lastModifiedAt": stamp,
        "lastModifiedBy": "llmops-standin",
        "lastModifiedByType": "Application",
    }


TENANT = "00000000-0000-4000-8000-0000000000aa"


class _Credential:
    """Any token passes here; it is a JWT, as Entra ID's are (the SDK reads its ``tid`` for studio links)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        import jwt
        from azure.core.credentials import AccessToken

        expires = int(time.time()) + 3600
        claims = {"tid": TENANT, "oid": str(uuid.UUID(int=7)), "aud": "https://management.azure.com", "exp": expires}
        return AccessToken(jwt.encode(claims, "standin-signing-key-of-32-bytes!", algorithm="HS256"), expires)


@dataclass
class _Node:
    rank: int
    folder: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    known: dict[int, Any] = field(default_factory=dict)

    def code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


@dataclass
class _Job:
    name: str
    resource: dict[str, Any]
    nodes: list[_Node] = field(default_factory=list)
    attempt: int = 0
    cancel: bool = False
    stopping: str | None = None
    stop_sent: float | None = None
    preemptions: int = 0
    mlflow_run: str | None = None
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    score: float | None = None

    @property
    def status(self) -> str:
        return str(self.resource["properties"]["status"])


@dataclass
class _Operation:
    id: str
    check: Callable[[], tuple[str, str] | None]  # None: in progress; (status, error message)
    retry_ms: int = 10
    status: str = "InProgress"
    error: str = ""


@dataclass
class _Server:
    endpoint: str
    deployment: str
    folder: Path
    port: int
    liveness: str
    scoring: str
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    known: dict[int, Any] = field(default_factory=dict)
    started: float = 0.0
    ready: bool = False
    failure: str | None = None

    @property
    def log(self) -> Path:
        return self.folder / "server.log"


@dataclass(frozen=True)
class _Request:
    endpoint: str
    deployment: str
    status: int
    start: float
    end: float
    mirrored: bool

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0


class AzureMLStandIn:
    """Azure ML's ARM surface and Azure Monitor metrics in process (see the module).

    ``computes``: compute cluster names that exist. ``container_env``: extra environment for every job node and
    model server. ``tick``: seconds between two steps of the clock. ``seed``: the traffic split's choices.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        computes: tuple[str, ...] = ("cpu-cluster",),
        environments: Mapping[str, Mapping[str, Any]] | None = None,
        container_env: Mapping[str, str] | None = None,
        tick: float = 0.1,
        stop_grace_seconds: float = 15.0,
        server_start_timeout: float = 240.0,
        seed: int | None = 0,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="llmops-azureml-"))
        self.subscription_id = SUBSCRIPTION
        self.resource_group = RESOURCE_GROUP
        self.workspace_name = WORKSPACE
        self.location = LOCATION
        self.computes = tuple(computes)
        self.container_env = dict(container_env or {})
        self.tick = tick
        self.stop_grace_seconds = stop_grace_seconds
        self.server_start_timeout = server_start_timeout
        self.errors: list[str] = []
        self.calls: list[str] = []
        self._random = random.Random(seed)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._advance_lock = threading.Lock()
        self._resources: dict[str, dict[str, Any]] = {}  # lower-case ARM id -> resource JSON
        self._jobs: dict[str, _Job] = {}
        self._operations: dict[str, _Operation] = {}
        self._servers: dict[tuple[str, str], _Server] = {}  # (endpoint, deployment) lower-case
        self._requests: list[_Request] = []
        self._faults: dict[tuple[str, str], tuple[int, str]] = {}
        self._keys: dict[str, str] = {}
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self.tracking_uri = f"sqlite:///{self.root / 'workspace-mlflow.db'}"
        self._mlflow: Any = None
        self._experiment = ""
        for name, env in (environments or {"llmops-runtime:1": {"image": "llmops.azurecr.io/runtime:test"}}).items():
            env_name, _, version = name.partition(":")
            self._put(self._env_id(env_name, version), self._environment(env_name, version, dict(env)))

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def __enter__(self) -> AzureMLStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> AzureMLStandIn:
        self.root.mkdir(parents=True, exist_ok=True)
        self._ticker = threading.Thread(target=self._tick_loop, name="azureml-standin-clock", daemon=True)
        self._ticker.start()
        return self

    def stop(self) -> None:
        self.uninstall()
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        with self._lock:
            nodes = [n for job in self._jobs.values() for n in job.nodes]
            servers = list(self._servers.values())
        for node in nodes:
            _signal_tree(node.popen, node.known, signal.SIGKILL)
        for server in servers:
            _signal_tree(server.popen, server.known, signal.SIGTERM)
        for server in servers:
            if server.popen is not None:
                try:
                    server.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _signal_tree(server.popen, server.known, signal.SIGKILL)
        for node in nodes:
            if node.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.popen.wait(timeout=10)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- clients ---------------------------------------------------------------------------------------------------
    @property
    def workspace_id(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/{PROVIDER}"
            f"/workspaces/{self.workspace_name}"
        )

    def session(self) -> Any:
        import requests

        session = requests.Session()
        session.trust_env = False
        session.mount("https://", _Adapter(self))
        return session

    def client_kwargs(self, settings: Any = None) -> dict[str, Any]:
        """What the adapter's ``client_factory`` returns: a credential and an in-process transport."""
        from azure.core.pipeline.transport import RequestsTransport

        return {
            "credential": _Credential(),
            "transport": RequestsTransport(session=self.session(), session_owner=False),
            "subscription_id": self.subscription_id,
            "resource_group": self.resource_group,
            "workspace_name": self.workspace_name,
        }

    def install(self) -> None:
        from airflow_llmops.platforms.azureml import adapter

        adapter.client_factory = self.client_kwargs

    def uninstall(self) -> None:
        from airflow_llmops.platforms.azureml import adapter

        if adapter.client_factory == self.client_kwargs:
            adapter.client_factory = None

    def ml_client(self) -> Any:
        from azure.ai.ml import MLClient

        kwargs = self.client_kwargs()
        return MLClient(
            kwargs["credential"],
            self.subscription_id,
            self.resource_group,
            self.workspace_name,
            transport=kwargs["transport"],
            enable_telemetry=False,
            show_progress=False,
        )

    # -- test helpers ----------------------------------------------------------------------------------------------
    def score(
        self, endpoint: str, payload: Any, *, deployment: str | None = None, key: str | None = None
    ) -> tuple[int, Any, str | None]:
        """POST ``payload`` to the endpoint's scoring URI with its key: (HTTP status, the answer, the deployment that
        answered, from the ``azureml-model-deployment`` header)."""
        with self._lock:
            resource = self._resources.get(self._endpoint_id(endpoint).lower())
            if resource is None:
                raise KeyError(f"no endpoint {endpoint}")
            uri = resource["properties"]["scoringUri"]
            key = key or self._keys.get(endpoint.lower(), "")
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if deployment:
            headers["azureml-model-deployment"] = deployment
        answer = self.session().post(uri, data=json.dumps(payload), headers=headers, timeout=60)
        try:
            body = answer.json()
        except ValueError:
            body = answer.text
        return answer.status_code, body, answer.headers.get("azureml-model-deployment")

    def fail_deployment(self, endpoint: str, deployment: str, status: int = 500, body: str | None = None) -> None:
        """From now on the deployment's container answers ``status`` (without reaching its server)."""
        with self._lock:
            self._faults[(endpoint.lower(), deployment.lower())] = (status, body or '{"error": "fault injected"}')

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests_routed(self) -> list[_Request]:
        with self._lock:
            return list(self._requests)

    def job_mlflow_run(self, name: str) -> str | None:
        """The run Azure ML's MLflow (:attr:`tracking_uri`) holds for a job (a sweep trial reports its metric there)."""
        with self._lock:
            job = self._jobs.get(name.lower())
        return None if job is None else job.mlflow_run

    def job_logs(self, name: str) -> list[str]:
        with self._lock:
            job = self._jobs[name.lower()]
            logs = sorted((job.nodes[0].folder.parent / "logs").glob("*.log")) if job.nodes else []
        return [path.read_text(errors="replace") for path in logs]

    def server_log(self, endpoint: str, deployment: str) -> str:
        with self._lock:
            server = self._servers[(endpoint.lower(), deployment.lower())]
        return _tail(server.log, 200)

    def preempt(self, name: str, *, after_checkpoint: bool = False, timeout: float = 120.0) -> None:
        """Preempt a low-priority (Spot) job's nodes: killed at once (whole process trees), then started again on
        fresh folders (a new log file each); they resume from ``LLMOPS_CHECKPOINT_DIR``. Waits for the job to run
        (and, ``after_checkpoint``, for a complete checkpoint there: a ``file://`` folder). ValueError for a job that
        is not low priority; RuntimeError if the job ended first."""
        deadline = time.monotonic() + timeout
        while True:
            with self._advance_lock:
                job = self._jobs[name.lower()]
                props = job.resource["properties"]
                tier = (props.get("queueSettings") or {}).get("jobTier")
                if tier != "Spot":
                    raise ValueError(f"job {name} is not low priority (jobTier {tier!r}); Azure ML does not preempt it")
                if job.status in _TERMINAL or job.cancel:
                    raise RuntimeError(f"job {name} ended before the preemption ({job.status})")
                alive = job.nodes and all(n.code() is None for n in job.nodes)
                if alive and job.stopping is None and (not after_checkpoint or self._has_checkpoint(props)):
                    for node in job.nodes:  # the VM stops at once: nothing gets to finish writing
                        _signal_tree(node.popen, node.known, signal.SIGSTOP)
                    for node in job.nodes:
                        _signal_tree(node.popen, node.known, signal.SIGKILL)
                        if node.popen is not None:
                            with contextlib.suppress(subprocess.TimeoutExpired):
                                node.popen.wait(timeout=10)
                        with contextlib.suppress(OSError), node.log.open("a") as log:
                            log.write("[azureml-standin] the low-priority node was preempted; it restarts\n")
                    job.preemptions += 1
                    self._launch(job)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name} was not preempted within {timeout:.0f}s")
            time.sleep(0.1)

    @staticmethod
    def _has_checkpoint(props: Mapping[str, Any]) -> bool:
        uri = str((props.get("environmentVariables") or {}).get("LLMOPS_CHECKPOINT_DIR") or "")
        if not uri.startswith(("file://", "/")):
            raise ValueError("after_checkpoint needs a file:// LLMOPS_CHECKPOINT_DIR (it is read)")
        folder = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
        for state in folder.glob(f"*/{STATE_FILE}") if folder.is_dir() else ():
            checkpoint = state.parent
            if CHECKPOINT_PATTERN.match(checkpoint.name) and any((checkpoint / w).is_file() for w in WEIGHT_FILES):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
                    return True
        return False

    # -- the clock -------------------------------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stopping.wait(self.tick):
            self._guard("tick", self.advance)

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            self.errors.append(f"{what}: {traceback.format_exc()}")

    def advance(self) -> None:
        with self._advance_lock:
            self._advance()

    def _advance(self) -> None:
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.status not in _TERMINAL]
            operations = [op for op in self._operations.values() if op.status == "InProgress"]
        for job in jobs:
            self._advance_job(job)
        for op in operations:
            outcome = op.check()
            if outcome is not None:
                with self._lock:
                    op.status, op.error = outcome

    def _set_status(self, job: _Job, status: str) -> None:
        with self._lock:
            job.resource["properties"]["status"] = status
            job.resource["systemData"]["lastModifiedAt"] = _now()

    def _advance_job(self, job: _Job) -> None:
        if job.resource["properties"].get("jobType") == "Sweep":
            self._advance_sweep(job)
            return
        status = job.status
        if status == "NotStarted":
            self._set_status(job, "Canceled" if job.cancel else "Starting")
            return
        if status == "Starting":
            if job.cancel:
                self._set_status(job, "Canceled")
                return
            try:
                self._launch(job)
            except (OSError, ValueError) as err:
                self._set_status(job, "Failed")
                self.errors.append(f"job {job.name} could not start: {err}")
                return
            self._set_status(job, "Running")
            return
        now = time.monotonic()
        for node in job.nodes:
            _remember(node.popen, node.known)
        codes = [n.code() for n in job.nodes]
        if job.stopping is None:
            if job.cancel:
                job.stopping = "cancel"
            elif any(c not in (None, 0) for c in codes):
                job.stopping = "failure"
            if job.stopping is not None:
                for node, code in zip(job.nodes, codes, strict=True):
                    if code is None:
                        _signal_group(node.popen, signal.SIGTERM)
                job.stop_sent = now
        elif job.stop_sent is not None and now - job.stop_sent > self.stop_grace_seconds:
            for node in job.nodes:
                _signal_tree(node.popen, node.known, signal.SIGKILL)
        if any(c is None for c in codes):
            return
        for node in job.nodes:
            _signal_tree(node.popen, node.known, signal.SIGKILL)
        if job.stopping == "cancel":
            self._set_status(job, "Canceled")
        elif all(c == 0 for c in codes):
            if job.parent is not None:
                job.score = self._score_of(job)
            self._set_status(job, "Completed")
        else:
            self._set_status(job, "Failed")

    # -- MLflow and sweeps -----------------------------------------------------------------------------------------
    def _workspace_mlflow(self) -> Any:
        with self._lock:
            if self._mlflow is None:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri)
                self._experiment = client.create_experiment("azureml-standin")
                self._mlflow = client
            return self._mlflow

    def _azure_mlflow_env(self, job: _Job) -> dict[str, str]:
        """What Azure ML sets in every job for its own MLflow server (over the job's own variables)."""
        client = self._workspace_mlflow()
        if job.mlflow_run is None:
            job.mlflow_run = client.create_run(self._experiment, run_name=job.name).info.run_id
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_RUN_ID": str(job.mlflow_run),
            "MLFLOW_EXPERIMENT_ID": str(self._experiment),
            "MLFLOW_TRACKING_TOKEN": "standin-workspace-token",
        }

    def _score_of(self, trial: _Job) -> float | None:
        assert trial.parent is not None
        with self._lock:
            sweep = self._jobs[trial.parent.lower()]
        metric = sweep.resource["properties"]["objective"]["primaryMetric"]
        history = self._workspace_mlflow().get_metric_history(trial.mlflow_run, metric)
        return float(history[-1].value) if history else None

    def _sample(self, space: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, (kind, args) in space.items():
            if kind == "choice":
                values[name] = self._random.choice(args[0])
            elif kind == "randint":
                values[name] = self._random.randrange(int(args[0]))
            elif kind in ("uniform", "quniform"):
                drawn = self._random.uniform(args[0], args[1])
                values[name] = round(drawn / args[2]) * args[2] if kind == "quniform" else drawn
            elif kind in ("loguniform", "qloguniform"):
                drawn = math.exp(self._random.uniform(args[0], args[1]))
                values[name] = round(drawn / args[2]) * args[2] if kind == "qloguniform" else drawn
            else:
                raise ValueError(f"the stand-in does not sample {kind!r} ({name})")
        return values

    def _advance_sweep(self, job: _Job) -> None:
        props = job.resource["properties"]
        with self._lock:
            trials = [self._jobs[c.lower()] for c in job.children]
        running = [t for t in trials if t.status not in _TERMINAL]
        if job.cancel:
            for trial in running:
                trial.cancel = True
            if not running:
                self._set_status(job, "Canceled")
            elif job.status != "CancelRequested":
                self._set_status(job, "CancelRequested")
            return
        if job.status == "NotStarted":
            self._set_status(job, "Running")
        limits = props.get("limits") or {}
        total = int(limits.get("maxTotalTrials") or 1)
        parallel = int(limits.get("maxConcurrentTrials") or total)
        while len(job.children) < total and len(running) < parallel:
            running.append(self._start_trial(job, len(job.children)))
        if running:
            return
        scored = [t for t in trials if t.status == "Completed" and t.score is not None]
        if not scored:
            self._set_status(job, "Failed")
            return
        maximize = str(props["objective"]["goal"]).lower() == "maximize"
        best = (max if maximize else min)(scored, key=lambda t: float(t.score or 0.0))
        with self._lock:
            props["properties"] = {**(props.get("properties") or {}), "best_child_run_id": best.name}
        self._set_status(job, "Completed")

    def _start_trial(self, sweep: _Job, index: int) -> _Job:
        props = sweep.resource["properties"]
        trial = dict(props["trial"])
        values = self._sample(props["searchSpace"])

        def value(match: re.Match[str]) -> str:
            return str(values[match.group(1)])

        command = re.sub(r"\$\{\{\s*search_space\.([A-Za-z0-9_]+)\s*\}\}", value, str(trial["command"]))
        name = f"{sweep.name}_{index}"
        body = {
            "properties": {
                "jobType": "Command",
                "command": command,
                "environmentId": trial["environmentId"],
                "computeId": props["computeId"],
                "environmentVariables": dict(trial.get("environmentVariables") or {}),
                "distribution": trial.get("distribution"),
                "resources": trial.get("resources") or {"instanceCount": 1},
                "experimentName": props.get("experimentName", "Default"),
                "displayName": name,
                "tags": {"hyperparameters": json.dumps(values)},
            }
        }
        resource = self._new_job(name, body)
        child = _Job(name, resource, parent=sweep.name)
        with self._lock:
            self._jobs[name.lower()] = child
            sweep.children.append(name)
        return child

    def _check_sweep(self, props: Mapping[str, Any]) -> None:
        trial = props.get("trial") or {}
        for required in ("command", "environmentId"):
            if not trial.get(required):
                raise ArmError(400, "UserError", f"trial.{required} is required for a sweep job")
        objective = props.get("objective") or {}
        if not objective.get("primaryMetric") or str(objective.get("goal", "")).lower() not in (
            "maximize",
            "minimize",
        ):
            raise ArmError(400, "UserError", "objective needs primaryMetric and goal (maximize or minimize)")
        space = props.get("searchSpace") or {}
        if not space:
            raise ArmError(400, "UserError", "searchSpace is required for a sweep job")
        named = set(re.findall(r"\$\{\{\s*search_space\.([A-Za-z0-9_]+)\s*\}\}", str(trial["command"])))
        if named - set(space):
            unknown = sorted(named - set(space))
            raise ArmError(400, "UserError", f"the trial's command names {unknown}, which searchSpace does not")
        algorithm = str((props.get("samplingAlgorithm") or {}).get("samplingAlgorithmType", ""))
        if algorithm not in ("Random", "Grid", "Bayesian"):
            raise ArmError(400, "UserError", f"samplingAlgorithmType {algorithm!r} is not Random, Grid or Bayesian")
        kinds = {name: entry[0] for name, entry in space.items()}
        allowed = {"Bayesian": ("choice", "uniform", "quniform"), "Grid": ("choice",)}.get(algorithm)
        if allowed and any(k not in allowed for k in kinds.values()):
            raise ArmError(400, "UserError", f"{algorithm} sampling supports {', '.join(allowed)} only, got {kinds}")
        if not (props.get("limits") or {}).get("maxTotalTrials"):
            raise ArmError(400, "UserError", "limits.maxTotalTrials is required for a sweep job")

    def _history_route(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        """Run history's child runs of a job (what ``jobs.list(parent_job_name=...)`` reads) and the discovery
        document that names run history's host."""
        if path == "/discovery":
            host = f"https://{self.location}.api.azureml.ms"
            names = ("api", "catalog", "experimentation", "gallery", "history", "hyperdrive", "labeling", "pipelines")
            return 200, {**{n: host for n in names}, "modelmanagement": host, "studio": "https://ml.azure.com"}, {}
        match = re.fullmatch(r"/history/v1\.0(/subscriptions/.+/workspaces/[^/]+)/runs/([^/]+)/children", path)
        if method != "GET" or match is None or match.group(1).lower() != self.workspace_id.lower():
            raise ArmError(404, "NotFound", f"the stand-in does not serve {method} {path}")
        with self._lock:
            parent = self._jobs.get(match.group(2).lower())
            if parent is None:
                raise ArmError(404, "UserError", f"Run {match.group(2)} is not found.")
            children = [self._jobs[c.lower()] for c in parent.children]
            runs = [
                {
                    "runId": c.name,
                    "parentRunId": parent.name,
                    "rootRunId": parent.name,
                    "displayName": c.resource["properties"].get("displayName", c.name),
                    "status": c.status,
                    "experimentId": str(uuid.UUID(int=5)),
                    "tags": dict(c.resource["properties"].get("tags") or {}),
                    "properties": {},
                    "runType": "azureml.scriptrun",
                    "createdUtc": c.resource["systemData"]["createdAt"],
                    "compute": {"target": str(c.resource["properties"]["computeId"]).rsplit("/", 1)[-1]},
                }
                for c in children
            ]
        return 200, {"value": runs}, {}

    def _launch(self, job: _Job) -> None:
        """Start one process per instance (a new attempt: fresh folders, new log files)."""
        props = job.resource["properties"]
        nodes = int((props.get("resources") or {}).get("instanceCount") or 1)
        per_instance = int((props.get("distribution") or {}).get("processCountPerInstance") or 1)
        command = self._substitute(str(props["command"]), props)
        port = free_port()
        attempt = job.attempt + 1
        folder = self.root / "jobs" / job.name
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        bindir = str(Path(sys.executable).parent)
        job.nodes = []
        for rank in range(nodes):
            node = _Node(rank, folder / f"node-{rank}", folder / "logs" / f"node-{rank}.attempt{attempt}.log")
            shutil.rmtree(node.folder, ignore_errors=True)  # a new VM's disk
            node.folder.mkdir(parents=True)
            azure = {
                "AZUREML_RUN_ID": job.name,
                "AZUREML_JOB_ID": job.name,
                "AZUREML_NODE_COUNT": str(nodes),
                "AZUREML_ARM_SUBSCRIPTION": self.subscription_id,
                "AZUREML_ARM_RESOURCEGROUP": self.resource_group,
                "AZUREML_ARM_WORKSPACE_NAME": self.workspace_name,
                "NODE_RANK": str(rank),
                "RANK": str(rank * per_instance),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(nodes * per_instance),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "LLMOPS_WORK_DIR": str(node.folder),
                "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            }
            own = {**self.container_env, **(props.get("environmentVariables") or {})}
            env = child_env({**own, **azure, **self._azure_mlflow_env(job)})  # Azure ML's variables win
            with node.log.open("ab") as log:
                node.popen = subprocess.Popen(
                    ["bash", "-c", command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=node.folder,
                    env=env,
                    start_new_session=True,
                )
            job.nodes.append(node)
        job.attempt = attempt
        job.stopping = None
        job.stop_sent = None

    @staticmethod
    def _substitute(command: str, props: Mapping[str, Any]) -> str:
        def value(match: re.Match[str]) -> str:
            kind, name = match.group(1), match.group(2)
            entry = (props.get(kind) or {}).get(name)
            if entry is None:
                raise ValueError(f"the command names ${{{{{kind}.{name}}}}}, which the job does not define")
            return str(entry.get("uri") or entry.get("value") or "")

        return re.sub(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z0-9_]+)\s*\}\}", value, command)

    # -- servers ---------------------------------------------------------------------------------------------------
    def _start_server(self, server: _Server) -> None:
        server.started = time.monotonic()
        server.folder.mkdir(parents=True, exist_ok=True)
        with server.log.open("ab") as log:
            server.popen = subprocess.Popen(
                [sys.executable, "-m", "airflow_llmops.ml.runtime", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=server.folder,
                env=child_env(server.env),
                start_new_session=True,
            )

    def _check_server(self, server: _Server) -> tuple[str, str] | None:
        if server.failure:
            return "Failed", server.failure
        if server.ready:
            return "Succeeded", ""
        if server.popen is None:
            try:
                self._start_server(server)
            except (OSError, ValueError) as err:
                server.failure = f"The container could not be started: {err}"
            return None
        _remember(server.popen, server.known)
        code = server.popen.poll()
        if code is not None:
            server.failure = (
                f"ResourceNotReady: User container has crashed or terminated (exit code {code}). Container logs:\n"
                + _tail(server.log, 15)
            )
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{server.liveness}", timeout=2) as answer:
                server.ready = answer.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if not server.ready and time.monotonic() - server.started > self.server_start_timeout:
            server.failure = (
                f"ResourceNotReady: the readiness probe {server.liveness} did not answer 200 within "
                f"{self.server_start_timeout:.0f}s. Container logs:\n{_tail(server.log, 15)}"
            )
        return None

    def _stop_server(self, server: _Server) -> None:
        if server.popen is not None and server.popen.poll() is None:
            _signal_tree(server.popen, server.known, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.popen.wait(timeout=10)
            _signal_tree(server.popen, server.known, signal.SIGKILL)

    # -- ARM plumbing ----------------------------------------------------------------------------------------------
    def _env_id(self, name: str, version: str) -> str:
        return f"{self.workspace_id}/environments/{name}/versions/{version}"

    def _endpoint_id(self, endpoint: str) -> str:
        return f"{self.workspace_id}/onlineEndpoints/{endpoint}"

    def _put(self, rid: str, resource: dict[str, Any]) -> None:
        with self._lock:
            self._resources[rid.lower()] = resource

    def _get(self, rid: str) -> dict[str, Any]:
        with self._lock:
            found = self._resources.get(rid.lower())
        if found is None:
            kind = rid.rstrip("/").split("/")[-2]
            raise ArmError(404, "UserError", f"{kind} {rid.rsplit('/', 1)[-1]} is not found in this workspace.")
        return found

    def _environment(self, name: str, version: str, body: Mapping[str, Any]) -> dict[str, Any]:
        props = dict(body.get("properties", body))
        props.setdefault("osType", "Linux")
        props.setdefault("isAnonymous", False)
        props.setdefault("environmentType", "UserCreated")
        props.setdefault("autoRebuild", "Disabled")
        props.setdefault("provisioningState", "Succeeded")
        props.setdefault("tags", {})
        props.setdefault("properties", {})
        return {
            "id": self._env_id(name, version),
            "name": version,
            "type": f"{PROVIDER}/workspaces/environments/versions",
            "properties": props,
            "systemData": _system_data(),
        }

    def _operation(self, check: Callable[[], tuple[str, str] | None], retry_ms: int = 10) -> tuple[str, dict[str, str]]:
        """A long-running operation; its polls are told to come back after ``retry_ms`` (10: the quick ones;
        a deployment that starts a server asks for fewer, longer waits)."""
        op_id = str(uuid.UUID(int=self._random.getrandbits(128), version=4))
        op = _Operation(op_id, check, retry_ms=retry_ms)
        with self._lock:
            self._operations[op_id] = op
        url = (
            f"{ARM}/subscriptions/{self.subscription_id}/providers/{PROVIDER}/locations/{self.location}"
            f"/mfeOperationsStatus/{op_id}?api-version=2024-04-01"
        )
        return url, {"Azure-AsyncOperation": url, "retry-after-ms": str(retry_ms), "Retry-After": "0"}

    def handle(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        parsed = urllib.parse.urlsplit(url)
        path = urllib.parse.unquote(parsed.path).rstrip("/")
        query = urllib.parse.parse_qs(parsed.query)
        short = path.replace(self.workspace_id, "~") if path.lower().startswith(self.workspace_id.lower()) else path
        with self._lock:
            self.calls.append(f"{method} {short}" if parsed.netloc == "management.azure.com" else f"{method} {url}")
        try:
            if parsed.netloc.endswith(".inference.ml.azure.com"):
                return self._score(parsed.netloc.split(".", 1)[0], headers, body)
            if parsed.netloc == f"{self.location}.api.azureml.ms":
                return self._history_route(method, path)
            if parsed.netloc != "management.azure.com":
                raise ArmError(404, "NotFound", f"no such host {parsed.netloc}")
            if "api-version" not in query:
                raise ArmError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
            data = json.loads(body) if body else None
            return self._route(method, path, query, data)
        except ArmError as err:
            return err.status, {"error": {"code": err.code, "message": err.message}}, {}
        except Exception:
            self.errors.append(f"{method} {url}: {traceback.format_exc()}")
            return 500, {"error": {"code": "InternalServerError", "message": "stand-in failure"}}, {}

    def _route(
        self, method: str, path: str, query: Mapping[str, list[str]], data: Any
    ) -> tuple[int, Any, dict[str, str]]:
        low = path.lower()
        ops = (
            f"/subscriptions/{self.subscription_id}/providers/{PROVIDER}/locations/{self.location}/mfeoperationsstatus/"
        )
        if low.startswith(ops.lower()):
            op = self._operations.get(path.rsplit("/", 1)[-1])
            if op is None:
                raise ArmError(404, "NotFound", "operation not found")
            payload: dict[str, Any] = {"id": path, "name": op.id, "status": op.status}
            if op.status == "Failed":
                payload["error"] = {"code": "DeploymentFailed", "message": op.error}
            return 200, payload, {"retry-after-ms": str(op.retry_ms)}
        if "/providers/microsoft.insights/autoscalesettings/" in low:
            return self._autoscale_route(method, path, data)
        if "/providers/microsoft.insights/metrics" in low:
            return 200, self._metrics(path[: low.index("/providers/microsoft.insights/metrics")], query), {}
        if not low.startswith(self.workspace_id.lower()):
            raise ArmError(404, "ResourceGroupNotFound", f"Resource {path} not found.")
        rest = path[len(self.workspace_id) :].strip("/")
        parts = rest.split("/") if rest else []
        if not parts:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", method)
            return 200, self._workspace(), {}
        kind = parts[0].lower()
        if kind == "environments" and len(parts) == 4 and parts[2].lower() == "versions":
            rid = self._env_id(parts[1], parts[3])
            if method == "PUT":
                resource = self._environment(parts[1], parts[3], data or {})
                self._put(rid, resource)
                return 201, resource, {}
            return 200, self._get(rid), {}
        if kind == "data" and len(parts) == 4 and parts[2].lower() == "versions":
            return self._data_route(method, f"{self.workspace_id}/data/{parts[1]}/versions/{parts[3]}", data)
        if kind == "computes" and len(parts) == 2:
            if parts[1] not in self.computes:
                raise ArmError(404, "UserError", f"Compute {parts[1]} is not found in this workspace.")
            return 200, self._compute(parts[1]), {}
        if kind == "jobs":
            return self._jobs_route(method, parts, data)
        if kind == "onlineendpoints":
            return self._endpoints_route(method, parts, data)
        raise ArmError(404, "NoRegisteredProviderFound", f"the stand-in does not serve {method} {path}")

    def _data_route(self, method: str, rid: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        """Data asset versions (data collection registers one per collection): immutable, as in Azure ML."""
        if method == "GET":
            return 200, self._get(rid), {}
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", method)
        with self._lock:
            if rid.lower() in self._resources:
                raise ArmError(
                    409,
                    "UserError",
                    f"Data asset version {rid.rsplit('/', 3)[-3]}:{rid.rsplit('/', 1)[-1]} already exists.",
                )
            props = dict((body or {}).get("properties") or {})
            if not props.get("dataUri") or props.get("dataType") not in ("uri_folder", "uri_file", "mltable"):
                raise ArmError(
                    400, "UserError", "a data asset needs dataUri and dataType (uri_folder, uri_file, mltable)"
                )
            props.setdefault("isAnonymous", False)
            props.setdefault("isArchived", False)
            props.setdefault("tags", {})
            props.setdefault("properties", {})
            resource = {
                "id": rid,
                "name": rid.rsplit("/", 1)[-1],
                "type": f"{PROVIDER}/workspaces/data/versions",
                "properties": props,
                "systemData": _system_data(),
            }
            self._resources[rid.lower()] = resource
        return 201, resource, {}

    def _autoscale_route(self, method: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        """Azure Monitor autoscale settings (how managed deployments autoscale): stored and checked, not acted on."""
        prefix = f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
        if not path.lower().startswith(prefix.lower()):
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group of {path} not found.")
        rid = path
        if method == "DELETE":
            with self._lock:
                found = self._resources.pop(rid.lower(), None)
            return (200 if found else 204), None, {}
        if method == "GET":
            return 200, self._get(rid), {}
        if method != "PUT":
            raise ArmError(405, "MethodNotAllowed", method)
        props = dict((body or {}).get("properties") or {})
        target = str(props.get("targetResourceUri") or "")
        with self._lock:
            if target.lower() not in self._resources:
                raise ArmError(400, "TargetResourceNotFound", f"The target resource {target} was not found.")
        for profile in props.get("profiles") or []:
            capacity = profile.get("capacity") or {}
            low, high, default = (int(capacity.get(k, -1)) for k in ("minimum", "maximum", "default"))
            if not 0 <= low <= default <= high:
                raise ArmError(400, "BadRequest", f"capacity {capacity} must have minimum <= default <= maximum")
            for rule in profile.get("rules") or []:
                if (rule.get("metricTrigger") or {}).get("metricResourceUri", "").lower() != target.lower():
                    raise ArmError(400, "BadRequest", "a rule's metricResourceUri must be the target resource here")
        resource = {
            "id": rid,
            "name": rid.rsplit("/", 1)[-1],
            "type": "Microsoft.Insights/autoscaleSettings",
            "location": (body or {}).get("location") or self.location,
            "tags": (body or {}).get("tags") or {},
            "properties": {**props, "targetResourceLocation": self.location},
        }
        with self._lock:
            self._resources[rid.lower()] = resource
        return 200, resource, {}

    def autoscale_settings(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._resources.values() if r["type"] == "Microsoft.Insights/autoscaleSettings"]

    def _workspace(self) -> dict[str, Any]:
        return {
            "id": self.workspace_id,
            "name": self.workspace_name,
            "type": f"{PROVIDER}/workspaces",
            "location": self.location,
            "kind": "Default",
            "identity": {
                "type": "SystemAssigned",
                "principalId": str(uuid.UUID(int=1)),
                "tenantId": TENANT,
            },
            "sku": {"name": "Basic", "tier": "Basic"},
            "properties": {
                "friendlyName": self.workspace_name,
                "discoveryUrl": f"https://{self.location}.api.azureml.ms/discovery",
                "mlFlowTrackingUri": f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0{self.workspace_id}",
                "workspaceId": str(uuid.UUID(int=3)),
                "provisioningState": "Succeeded",
                "publicNetworkAccess": "Enabled",
                "storageAccount": f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                "/providers/Microsoft.Storage/storageAccounts/llmopsstandin",
            },
            "systemData": _system_data(),
        }

    def _compute(self, name: str) -> dict[str, Any]:
        return {
            "id": f"{self.workspace_id}/computes/{name}",
            "name": name,
            "type": f"{PROVIDER}/workspaces/computes",
            "location": self.location,
            "properties": {
                "computeType": "AmlCompute",
                "provisioningState": "Succeeded",
                "computeLocation": self.location,
                "properties": {
                    "vmSize": "STANDARD_DS3_V2",
                    "vmPriority": "Dedicated",
                    "scaleSettings": {"maxNodeCount": 4, "minNodeCount": 0, "nodeIdleTimeBeforeScaleDown": "PT2M"},
                },
            },
            "systemData": _system_data(),
        }

    # -- jobs ------------------------------------------------------------------------------------------------------
    def _jobs_route(self, method: str, parts: list[str], data: Any) -> tuple[int, Any, dict[str, str]]:
        if len(parts) == 1 and method == "GET":
            with self._lock:
                return 200, {"value": [j.resource for j in self._jobs.values()]}, {}
        name = parts[1]
        with self._lock:
            job = self._jobs.get(name.lower())
        if len(parts) == 3 and parts[2].lower() == "cancel" and method == "POST":
            if job is None:
                raise ArmError(404, "UserError", f"Job {name} is not found.")
            with self._lock:
                if job.status not in _TERMINAL:
                    job.cancel = True
                    if job.status == "Running":
                        self._set_status(job, "CancelRequested")
            url, headers = self._operation(lambda: ("Succeeded", "") if job.status in _TERMINAL else None, retry_ms=100)
            return 202, None, {**headers, "Location": url}
        if len(parts) != 2:
            raise ArmError(404, "NotFound", "/".join(parts))
        if method == "GET":
            if job is None:
                raise ArmError(404, "UserError", f"Job {name} is not found.")
            return 200, job.resource, {}
        if method == "PUT":
            if job is not None:
                raise ArmError(400, "UserError", f"A job with this name already exists: {name}. Job names are unique.")
            resource = self._new_job(name, data or {})
            with self._lock:
                self._jobs[name.lower()] = _Job(name, resource)
            return 201, resource, {}
        raise ArmError(405, "MethodNotAllowed", method)

    def _new_job(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        props = dict(body.get("properties") or {})
        if props.get("jobType") not in ("Command", "Sweep"):
            raise ArmError(400, "UserError", f"the stand-in runs Command and Sweep jobs, got {props.get('jobType')!r}")
        if props["jobType"] == "Sweep":
            self._check_sweep(props)
        runs = props["trial"] if props["jobType"] == "Sweep" else props  # what runs: the job, or each trial
        for required in ("command", "environmentId"):
            if not runs.get(required):
                raise ArmError(400, "UserError", f"{required} is required for a command job")
        if not props.get("computeId"):
            raise ArmError(400, "UserError", "computeId is required for a command job")
        compute = str(props["computeId"]).rsplit("/", 1)[-1]
        if compute not in self.computes:
            raise ArmError(400, "UserError", f"Compute {compute} is not found in workspace {self.workspace_name}.")
        env_id = str(runs["environmentId"])
        if env_id.startswith("/"):
            self._get(env_id)  # a 404 when the environment is not registered
        tier = (props.get("queueSettings") or {}).get("jobTier")
        if tier not in (None, "Null", "Spot", "Basic", "Standard", "Premium"):
            raise ArmError(400, "UserError", f"jobTier {tier!r} is not one of Spot, Basic, Standard, Premium")
        props.setdefault("experimentName", "Default")
        props.setdefault("displayName", name)
        props.setdefault("isArchived", False)
        props.setdefault("inputs", {})
        props.setdefault("outputs", {})
        props["outputs"].setdefault(
            "default",
            {
                "jobOutputType": "uri_folder",
                "mode": "ReadWriteMount",
                "uri": f"azureml://datastores/workspaceartifactstore/ExperimentRun/dcid.{name}",
            },
        )
        props.setdefault("resources", {"instanceCount": 1})
        props["status"] = "NotStarted"
        props["services"] = {
            "Studio": {
                "jobServiceType": "Studio",
                "endpoint": f"https://ml.azure.com/runs/{name}?wsid={self.workspace_id}",  # the SDK adds &tid=
            },
            "Tracking": {
                "jobServiceType": "Tracking",
                "endpoint": f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0{self.workspace_id}",
            },
        }
        return {
            "id": f"{self.workspace_id}/jobs/{name}",
            "name": name,
            "type": f"{PROVIDER}/workspaces/jobs",
            "properties": props,
            "systemData": _system_data(),
        }

    # -- endpoints and deployments ---------------------------------------------------------------------------------
    def _endpoints_route(self, method: str, parts: list[str], data: Any) -> tuple[int, Any, dict[str, str]]:
        if len(parts) == 1:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", method)
            with self._lock:
                found = [r for k, r in self._resources.items() if r["type"].endswith("/onlineEndpoints")]
            return 200, {"value": found}, {}
        endpoint = parts[1]
        rid = self._endpoint_id(endpoint)
        if len(parts) == 2:
            if method == "GET":
                return 200, self._get(rid), {}
            if method == "PUT":
                return self._put_endpoint(endpoint, data or {})
            if method == "DELETE":
                return self._delete_endpoint(endpoint)
            raise ArmError(405, "MethodNotAllowed", method)
        if len(parts) == 3 and parts[2].lower() == "listkeys" and method == "POST":
            self._get(rid)
            key = self._keys[endpoint.lower()]
            return 200, {"primaryKey": key, "secondaryKey": key[::-1]}, {}
        if parts[2].lower() != "deployments":
            raise ArmError(404, "NotFound", "/".join(parts))
        if len(parts) == 3:
            if method != "GET":
                raise ArmError(405, "MethodNotAllowed", method)
            self._get(rid)
            prefix = f"{rid}/deployments/".lower()
            with self._lock:
                found = [
                    r for k, r in self._resources.items() if k.startswith(prefix) and k.count("/") == prefix.count("/")
                ]
            return 200, {"value": found}, {}
        deployment = parts[3]
        if len(parts) == 4:
            if method == "GET":
                return 200, self._get(f"{rid}/deployments/{deployment}"), {}
            if method == "PUT":
                return self._put_deployment(endpoint, deployment, data or {})
            if method == "DELETE":
                return self._delete_deployment(endpoint, deployment)
        raise ArmError(404, "NotFound", "/".join(parts))

    def _deployments_of(self, endpoint: str) -> dict[str, dict[str, Any]]:
        prefix = f"{self._endpoint_id(endpoint)}/deployments/".lower()
        with self._lock:
            return {r["name"].lower(): r for k, r in self._resources.items() if k.startswith(prefix)}

    def _check_traffic(self, endpoint: str, traffic: Mapping[str, Any], mirror: Mapping[str, Any]) -> None:
        deployments = self._deployments_of(endpoint)
        for what, split in (("traffic", traffic), ("mirrorTraffic", mirror)):
            for name, value in split.items():
                if name.lower() not in deployments:
                    raise ArmError(
                        400, "BadArgument", f"{what}: deployment {name} does not exist in endpoint {endpoint}."
                    )
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
                    raise ArmError(400, "BadArgument", f"{what}: {name}={value!r} is not a whole percent.")
        total = sum(traffic.values())
        if traffic and total != 100 and not (total == 0 and not any(traffic.values())):
            raise ArmError(400, "BadArgument", f"Traffic values must sum to 100, got {total} ({dict(traffic)}).")
        mirrored = {k: v for k, v in mirror.items() if v}
        if len(mirrored) > 1:
            raise ArmError(400, "BadArgument", "Mirror traffic can be set to one deployment only.")
        for name, value in mirrored.items():
            if value > 50:
                raise ArmError(400, "BadArgument", f"Mirror traffic cannot exceed 50 percent, got {name}={value}.")
            if traffic.get(name):
                raise ArmError(400, "BadArgument", f"Deployment {name} takes live traffic; it cannot be mirrored to.")

    def _put_endpoint(self, endpoint: str, body: Mapping[str, Any]) -> tuple[int, Any, dict[str, str]]:
        rid = self._endpoint_id(endpoint)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", endpoint):
            raise ArmError(400, "BadArgument", f"Endpoint name {endpoint} is not valid.")
        props = dict(body.get("properties") or {})
        if props.get("authMode") not in ("Key", "AMLToken", "AADToken"):
            raise ArmError(400, "BadArgument", f"authMode {props.get('authMode')!r} is not valid.")
        traffic = dict(props.get("traffic") or {})
        mirror = dict(props.get("mirrorTraffic") or {})
        with self._lock:
            existing = self._resources.get(rid.lower())
            self._check_traffic(endpoint, traffic, mirror)
            if existing is None:
                self._keys[endpoint.lower()] = uuid.UUID(int=self._random.getrandbits(128)).hex
                host = f"{endpoint}.{self.location}.inference.ml.azure.com"
                resource: dict[str, Any] = {
                    "id": rid,
                    "name": endpoint,
                    "type": f"{PROVIDER}/workspaces/onlineEndpoints",
                    "location": body.get("location") or self.location,
                    "kind": "Managed",
                    "tags": dict(body.get("tags") or {}),
                    "identity": {
                        "type": "SystemAssigned",
                        "principalId": str(uuid.UUID(int=self._random.getrandbits(128))),
                        "tenantId": TENANT,
                    },
                    "properties": {
                        "authMode": props["authMode"],
                        "description": props.get("description"),
                        "properties": {"azureml.onlineendpointid": rid, **(props.get("properties") or {})},
                        "scoringUri": f"https://{host}/score",
                        "swaggerUri": f"https://{host}/swagger.json",
                        "openapiUri": f"https://{host}/swagger.json",
                        "publicNetworkAccess": props.get("publicNetworkAccess") or "Enabled",
                        "provisioningState": "Creating",
                        "traffic": traffic,
                        "mirrorTraffic": mirror,
                    },
                    "systemData": _system_data(),
                }
                self._resources[rid.lower()] = resource
                status = 201
            else:
                resource = existing
                resource["tags"] = dict(body.get("tags") or resource["tags"])
                resource["properties"].update(traffic=traffic, mirrorTraffic=mirror, provisioningState="Updating")
                resource["systemData"]["lastModifiedAt"] = _now()
                status = 200

        def done() -> tuple[str, str]:
            with self._lock:
                resource["properties"]["provisioningState"] = "Succeeded"
            return "Succeeded", ""

        _, headers = self._operation(done)
        return status, resource, headers

    def _delete_endpoint(self, endpoint: str) -> tuple[int, Any, dict[str, str]]:
        rid = self._endpoint_id(endpoint)
        resource = self._get(rid)
        with self._lock:
            resource["properties"]["provisioningState"] = "Deleting"
            servers = [s for k, s in self._servers.items() if k[0] == endpoint.lower()]

        def delete() -> tuple[str, str]:
            for server in servers:
                self._stop_server(server)
            with self._lock:
                for gone in [k for k in self._resources if k == rid.lower() or k.startswith(f"{rid.lower()}/")]:
                    del self._resources[gone]
                for pair in [k for k in self._servers if k[0] == endpoint.lower()]:
                    del self._servers[pair]
            return "Succeeded", ""

        url, headers = self._operation(delete)
        return 202, None, {**headers, "Location": url}

    def _put_deployment(self, endpoint: str, name: str, body: Mapping[str, Any]) -> tuple[int, Any, dict[str, str]]:
        rid = f"{self._endpoint_id(endpoint)}/deployments/{name}"
        self._get(self._endpoint_id(endpoint))
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", name):
            raise ArmError(400, "BadArgument", f"Deployment name {name} is not valid.")
        props = dict(body.get("properties") or {})
        if props.get("endpointComputeType") != "Managed":
            raise ArmError(400, "BadArgument", "endpointComputeType must be Managed")
        env_id = str(props.get("environmentId") or "")
        if not env_id:
            raise ArmError(400, "BadArgument", "environmentId is required for a deployment without a model")
        environment = self._get(env_id)
        config = environment["properties"].get("inferenceConfig") or {}
        scoring = (config.get("scoringRoute") or {}).get("path")
        readiness = (config.get("readinessRoute") or config.get("livenessRoute") or {}).get("path")
        if not scoring or not readiness:
            raise ArmError(
                400,
                "BadArgument",
                f"environment {env_id} has no inferenceConfig with scoring and readiness routes: a custom container "
                "needs them",
            )
        ports = {
            (config.get(k) or {}).get("port")
            for k in ("livenessRoute", "readinessRoute", "scoringRoute")
            if config.get(k)
        }
        if len(ports) != 1:
            raise ArmError(
                400, "BadArgument", f"the inference routes must share one port, got {sorted(map(str, ports))}"
            )
        for collection, entry in ((props.get("dataCollector") or {}).get("collections") or {}).items():
            data = str((entry or {}).get("dataId") or (entry or {}).get("data") or "")
            if data.startswith("/"):
                self._get(data)  # the SDK registers each collection's data asset first
            elif data:
                raise ArmError(400, "BadArgument", f"data collection {collection}: {data!r} is not a data asset id")
        scale = props.get("scaleSettings") or {"scaleType": "Default"}
        if scale.get("scaleType") not in ("Default", "TargetUtilization"):
            raise ArmError(400, "BadArgument", f"scaleType {scale.get('scaleType')!r} is not valid.")
        if scale.get("scaleType") == "TargetUtilization":
            scale = {
                "pollingInterval": "PT1S",
                "targetUtilizationPercentage": 70,
                "minInstances": 1,
                "maxInstances": 1,
                **scale,
            }
        with self._lock:
            if rid.lower() in self._resources:
                raise ArmError(409, "Conflict", f"deployment {name} exists; the stand-in does not update deployments")
            sku = body.get("sku") or {"name": "Default", "capacity": 1}
            props.update(
                scaleSettings=scale,
                provisioningState="Creating",
                requestSettings=props.get("requestSettings")
                or {"requestTimeout": "PT5S", "maxConcurrentRequestsPerInstance": 1},
                livenessProbe=props.get("livenessProbe")
                or {
                    "failureThreshold": 30,
                    "successThreshold": 1,
                    "timeout": "PT2S",
                    "period": "PT10S",
                    "initialDelay": "PT10S",
                },
                readinessProbe=props.get("readinessProbe")
                or {
                    "failureThreshold": 30,
                    "successThreshold": 1,
                    "timeout": "PT2S",
                    "period": "PT10S",
                    "initialDelay": "PT10S",
                },
                appInsightsEnabled=props.get("appInsightsEnabled", False),
                egressPublicNetworkAccess=props.get("egressPublicNetworkAccess") or "Enabled",
                properties=props.get("properties") or {},
            )
            resource: dict[str, Any] = {
                "id": rid,
                "name": name,
                "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments",
                "location": self.location,
                "kind": "Managed",
                "tags": dict(body.get("tags") or {}),
                "sku": sku,
                "properties": props,
                "systemData": _system_data(),
            }
            self._resources[rid.lower()] = resource
            env = {
                **self.container_env,
                **(props.get("environmentVariables") or {}),
                "LLMOPS_SERVE_HOST": "127.0.0.1",
                "AZUREML_MODEL_DIR": "",
                "AML_APP_ROOT": "/var/azureml-app",
            }
            port = free_port()
            env["LLMOPS_SERVE_PORT"] = str(port)  # the container's port, mapped to a free one here
            server = _Server(
                endpoint,
                name,
                self.root / "servers" / endpoint / name,
                port,
                readiness,
                scoring,
                {k: str(v) for k, v in env.items() if v != ""},
            )
            self._servers[(endpoint.lower(), name.lower())] = server

        def ready() -> tuple[str, str] | None:
            outcome = self._check_server(server)
            if outcome is not None:
                with self._lock:
                    resource["properties"]["provisioningState"] = outcome[0]
            return outcome

        _, headers = self._operation(ready, retry_ms=250)
        return 201, resource, headers

    def _delete_deployment(self, endpoint: str, name: str) -> tuple[int, Any, dict[str, str]]:
        rid = f"{self._endpoint_id(endpoint)}/deployments/{name}"
        resource = self._get(rid)
        endpoint_props = self._get(self._endpoint_id(endpoint))["properties"]
        for what in ("traffic", "mirrorTraffic"):
            share = {k.lower(): v for k, v in (endpoint_props.get(what) or {}).items()}.get(name.lower())
            if share:
                raise ArmError(
                    400,
                    "BadArgument",
                    f"Deployment {name} has {share} percent {what}; set it to 0 before deleting the deployment.",
                )
        with self._lock:
            resource["properties"]["provisioningState"] = "Deleting"
            server = self._servers.get((endpoint.lower(), name.lower()))

        def delete() -> tuple[str, str]:
            if server is not None:
                self._stop_server(server)
            with self._lock:
                self._resources.pop(rid.lower(), None)
                self._servers.pop((endpoint.lower(), name.lower()), None)
                for what in ("traffic", "mirrorTraffic"):
                    split = endpoint_props.get(what) or {}
                    for key in [k for k in split if k.lower() == name.lower()]:
                        del split[key]
            return "Succeeded", ""

        url, headers = self._operation(delete)
        return 202, None, {**headers, "Location": url}

    # -- scoring ---------------------------------------------------------------------------------------------------
    def _score(self, endpoint: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            resource = self._resources.get(self._endpoint_id(endpoint).lower())
            key = self._keys.get(endpoint.lower())
        if resource is None:
            return 404, {"message": f"Endpoint {endpoint} not found."}, {}
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        if auth != f"Bearer {key}":
            return 401, {"message": "Invalid authentication: the endpoint key is wrong or missing."}, {}
        props = resource["properties"]
        target = {k.lower(): v for k, v in headers.items()}.get("azureml-model-deployment")
        traffic = {k.lower(): v for k, v in (props.get("traffic") or {}).items() if v}
        if target is None:
            if not traffic:
                return 424, {"message": "No deployment takes traffic on this endpoint (traffic is empty)."}, {}
            with self._lock:
                pick = self._random.uniform(0, sum(traffic.values()))
            for name, share in sorted(traffic.items()):
                pick -= share
                target = name
                if pick <= 0:
                    break
        assert target is not None
        status, answer = self._forward(endpoint, target.lower(), body, mirrored=False)
        for name, share in (props.get("mirrorTraffic") or {}).items():
            with self._lock:
                copy = share and self._random.uniform(0, 100) < share
            if copy:
                self._forward(endpoint, name.lower(), body, mirrored=True)
        return status, answer, {"azureml-model-deployment": target}

    def _forward(self, endpoint: str, deployment: str, body: bytes, *, mirrored: bool) -> tuple[int, Any]:
        with self._lock:
            server = self._servers.get((endpoint.lower(), deployment))
            fault = self._faults.get((endpoint.lower(), deployment))
        start = time.time()
        if server is None or not server.ready:
            status, answer = 404, {"message": f"Deployment {deployment} is not ready or does not exist."}
        elif fault is not None:
            status, answer = fault[0], _json_or_text(fault[1].encode())
        else:
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.port}{server.scoring}",
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as reply:
                    status, answer = reply.status, _json_or_text(reply.read())
            except urllib.error.HTTPError as err:
                status, answer = err.code, _json_or_text(err.read())
            except (urllib.error.URLError, OSError) as err:
                status, answer = 502, {"message": f"upstream error: {err}"}
        with self._lock:
            self._requests.append(_Request(endpoint.lower(), deployment, status, start, time.time(), mirrored))
        self._collect(endpoint, deployment, body, status, answer, start)
        return status, answer

    def collected_folder(self, endpoint: str) -> Path:
        """Where data collection's payload logging writes an endpoint's requests and responses (the workspace's
        default datastore's ``modelDataCollector/<endpoint>``)."""
        return self.root / "datastore" / "modelDataCollector" / endpoint.lower()

    def _collect(self, endpoint: str, deployment: str, body: bytes, status: int, answer: Any, start: float) -> None:
        """Payload logging: one ``azureml.inference.request`` and, for an answered request, one ``...response``
        CloudEvent line in the collections the deployment enabled, under the hour folder of when it was written."""
        rid = f"{self._endpoint_id(endpoint)}/deployments/{deployment}"
        with self._lock:
            resource = self._resources.get(rid.lower())
        collections = ((resource or {}).get("properties", {}).get("dataCollector") or {}).get("collections") or {}

        def enabled(name: str) -> bool:
            mode = str((collections.get(name) or {}).get("dataCollectionMode") or "").lower()
            return mode == "enabled"

        correlation = str(uuid.uuid4())
        events = [("request", start, _json_or_text(body))]
        if 200 <= status < 300:
            events.append(("response", time.time(), answer))
        for kind, at, data in events:
            if not enabled(kind):
                continue
            stamp = datetime.fromtimestamp(at, tz=timezone.utc)
            folder = self.collected_folder(endpoint) / deployment / kind / stamp.strftime("%Y/%m/%d/%H")
            folder.mkdir(parents=True, exist_ok=True)
            line = {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": f"{rid}",
                "type": f"azureml.inference.{kind}",
                "datacontenttype": "application/json",
                "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "data": data,
                "path": "/invocations",
                "method": "POST",
                "correlationid": correlation,
                "xrequestid": correlation,
            }
            with self._lock, (folder / "stand-in.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")

    # -- Azure Monitor ---------------------------------------------------------------------------------------------
    def _metrics(self, resource_id: str, query: Mapping[str, list[str]]) -> dict[str, Any]:
        low = resource_id.lower()
        prefix = f"{self.workspace_id}/onlineEndpoints/".lower()
        if not low.startswith(prefix) or "/" in low[len(prefix) :]:
            raise ArmError(400, "BadRequest", f"the stand-in has metrics for online endpoints only, not {resource_id}")
        resource = self._get(resource_id)
        endpoint = resource["name"].lower()
        timespan = (query.get("timespan") or [""])[0]
        try:
            start_text, end_text = timespan.split("/")
            start, end = _parse_time(start_text), _parse_time(end_text)
        except ValueError:
            raise ArmError(400, "BadRequest", f"Invalid timespan {timespan!r}") from None
        if end <= start:
            raise ArmError(400, "BadRequest", f"timespan {timespan} ends before it starts")
        interval = (query.get("interval") or ["PT1M"])[0]
        grain = _duration(interval)
        names = [n for n in (query.get("metricnames") or [""])[0].split(",") if n]
        aggregations = [a.strip().lower() for a in (query.get("aggregation") or ["average"])[0].split(",")]
        terms = _parse_metric_filter((query.get("$filter") or [""])[0])
        rows = [r for r in self.requests_routed() if r.endpoint == endpoint and start <= r.end < end]
        value = []
        for name in names:
            dims: tuple[str, ...]
            if name == "RequestsPerMinute":
                dims = ("deployment", "statusCode", "statusCodeClass")
            elif name in _PERCENTILES:
                dims = ("deployment",)
            else:
                raise ArmError(400, "BadRequest", f"Failed to find metric configuration for {name}.")
            for dim in terms:
                if dim.lower() not in {d.lower() for d in dims}:
                    raise ArmError(400, "BadRequest", f"Metric {name} has no dimension {dim}.")
            groups: dict[tuple[tuple[str, str], ...], list[_Request]] = {}
            for row in rows:
                labels = {
                    "deployment": row.deployment,
                    "statuscode": str(row.status),
                    "statuscodeclass": f"{row.status // 100}xx",
                }
                if any(
                    want != "*" and labels.get(dim.lower(), "").lower() != want.lower() for dim, want in terms.items()
                ):
                    continue
                key = tuple((dim, labels[dim.lower()]) for dim, want in terms.items() if want == "*")
                groups.setdefault(key, []).append(row)
            series = []
            for key, members in sorted(groups.items()):
                data = []
                bins = max(1, math.ceil((end - start) / grain))
                for i in range(bins):
                    lo, hi = start + i * grain, start + (i + 1) * grain
                    inside = [r for r in members if lo <= r.end < hi]
                    point: dict[str, Any] = {"timeStamp": datetime.fromtimestamp(lo, timezone.utc).isoformat()}
                    if inside:
                        if name == "RequestsPerMinute":
                            number = float(len(inside))
                        else:
                            number = _percentile([r.ms for r in inside], _PERCENTILES[name])
                        for aggregation in aggregations:
                            point[aggregation] = number if aggregation != "count" else 1.0
                    data.append(point)
                series.append(
                    {
                        "metadatavalues": [
                            {"name": {"value": dim, "localizedValue": dim}, "value": value} for dim, value in key
                        ],
                        "data": data,
                    }
                )
            value.append(
                {
                    "id": f"{resource_id}/providers/Microsoft.Insights/metrics/{name}",
                    "type": "Microsoft.Insights/metrics",
                    "name": {"value": name, "localizedValue": name},
                    "displayDescription": "",
                    "unit": "Count" if name == "RequestsPerMinute" else "MilliSeconds",
                    "timeseries": series,
                    "errorCode": "Success",
                }
            )
        return {
            "cost": 0,
            "timespan": timespan,
            "interval": interval,
            "value": value,
            "namespace": f"{PROVIDER}/workspaces/onlineEndpoints",
            "resourceregion": self.location,
        }


def _parse_metric_filter(text: str) -> dict[str, str]:
    terms: dict[str, str] = {}
    if not text.strip():
        return terms
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        match = re.fullmatch(r"\s*([A-Za-z][A-Za-z0-9_]*)\s+eq\s+'([^']*)'\s*", part)
        if not match:
            raise ArmError(400, "BadRequest", f"Invalid $filter term {part!r} (use: dimension eq 'value')")
        terms[match.group(1)] = match.group(2)
    return terms


def _percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", errors="replace")


class _Adapter(requests.adapters.BaseAdapter):
    """A ``requests`` transport adapter answering from the stand-in (no sockets)."""

    def __init__(self, standin: AzureMLStandIn) -> None:
        super().__init__()
        self.standin = standin

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = b"".join(body)
        status, payload, headers = self.standin.handle(request.method, request.url, dict(request.headers), body)
        data = b"" if payload is None else json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "x-ms-request-id": str(uuid.uuid4()),
            **headers,
            "Content-Length": str(len(data)),
        }
        response = requests.Response()
        response.status_code = status
        response.headers = requests.structures.CaseInsensitiveDict(headers)
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(data), status=status, headers=headers, preload_content=False, decode_content=False
        )
        response.url = request.url
        response.request = request
        response.reason = "OK" if status < 400 else "Error"
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        pass
