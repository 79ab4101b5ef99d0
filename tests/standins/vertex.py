"""A Vertex AI stand-in for tests: the v1 REST control plane and Cloud Monitoring's MetricService on loopback, with
custom jobs and deployed models that really run, as local processes.

There is no Google account here, and no emulator for Vertex AI. :class:`VertexStandIn` serves the part of the v1
REST surface our adapter uses (``/v1/projects/{project}/locations/{location}/...``, the REST transport's JSON, with
``$alt=json;enum-encoding=int``) from an ``http.server`` thread, and ``google.monitoring.v3.MetricService/
ListTimeSeries`` from a gRPC server, so the real client library (``aiplatform_v1``'s GAPIC clients over REST,
``monitoring_v3.MetricServiceClient`` over an insecure gRPC channel) drives it. Every request body is parsed into
the API's own proto message with unknown fields refused, so a misspelled field is a 400, as on Vertex; query
parameters are checked against the request message the same way.

* Custom jobs (``customJobs``: create, get, list with a filter, cancel, delete): the clock moves a job
  JOB_STATE_PENDING -> RUNNING -> SUCCEEDED / FAILED / (CANCELLING ->) CANCELLED. Running it starts, for each
  replica of each worker pool (``workerpool<i>``), the training command (by default the real runtime,
  ``python -m airflow_llmops.ml.runtime train`` + ``container_spec.args``) in a folder of its own with the pool's
  ``container_spec.env`` and Vertex's variables: ``CLUSTER_SPEC``, ``AIP_MODEL_DIR`` / ``AIP_CHECKPOINT_DIR`` /
  ``AIP_TENSORBOARD_LOG_DIR`` (``<base_output_directory>/model/``, ``checkpoints/``, ``logs/``),
  ``CLOUD_ML_JOB_ID``, plus the runtime's overrides for running on one machine: ``LLMOPS_MASTER_ADDR=127.0.0.1``
  and a free ``LLMOPS_MASTER_PORT`` (the rendezvous), ``LLMOPS_WORK_DIR`` (the replica's folder). A replica that
  exits non-zero fails the job: the others get SIGTERM (SIGKILL after ``stop_grace_seconds``) and
  ``error.message`` leads with the reason from the replica's last ``[llmops-failure] <reason>`` line, then Vertex's
  "The replica workerpool0-0 exited with a non-zero status of N" and the last log lines; ``error.code`` is 3. The
  primary replica (workerpool0) decides success: the others get ``stop_grace_seconds`` to finish after it. Cancel:
  SIGTERM, SIGKILL after the grace, JOB_STATE_CANCELLED with ``error`` {1, "CANCELED"}.
  ``job_spec.scheduling.timeout`` is enforced (FAILED, code 4). Spot preemption: :meth:`VertexStandIn.preempt` kills
  the replicas of a SPOT job and starts them again on "new VMs" (fresh working folders): they resume from
  ``AIP_CHECKPOINT_DIR``, which lives under the base output directory. Each replica's stdout and stderr go to one file
  per attempt (:meth:`VertexStandIn.job_log_files`, :meth:`VertexStandIn.job_logs`).
* Models (``models:upload`` as an LRO, get, list, delete as an LRO, refused while deployed) and endpoints (create
  and delete as LROs, delete refused while models are deployed; get, list, PATCH with ``updateMask``;
  ``:deployModel`` / ``:undeployModel`` as LROs). A deployment starts the serving command (by default
  ``python -m airflow_llmops.ml.runtime serve`` + the model's ``container_spec.args``) with the model's
  ``container_spec.env`` and Vertex's ``AIP_*`` variables (``AIP_HTTP_PORT`` is a free port, not the container
  port; ``AIP_STORAGE_URI`` is the model's ``artifact_uri`` as given, not a copy); its operation completes when the
  server answers its health route, or fails with the server's last log lines. Traffic splits are checked as Vertex
  checks them (integer percents over the deployed models summing to 100, ``"0"`` for the model being deployed;
  a model with traffic cannot be undeployed unless the request's ``traffic_split`` moves it, or it is the last).
  One mutating operation (deploy, undeploy, delete) at a time per endpoint: another is FAILED_PRECONDITION.
* ``:predict`` picks a deployed model by the traffic split (seeded), forwards ``{"instances", "parameters"}`` to its
  server's predict route and answers ``PredictResponse`` (``deployedModelId``, ``model``, ``modelDisplayName``,
  ``modelVersionId``); a container error comes back with its HTTP status as Google's error JSON. Every answer
  carries the headers ``X-Vertex-AI-Endpoint-Id`` and ``X-Vertex-AI-Deployed-Model-Id``. Every prediction routed to
  a deployed model becomes Cloud Monitoring points (resource ``aiplatform.googleapis.com/Endpoint``, labels
  ``resource_container`` = project, ``location``, ``endpoint_id``): ``prediction/online/prediction_count`` and
  ``response_count`` (INT64 DELTA, 1 per prediction, metric labels ``deployed_model_id``, ``response_code``),
  ``error_count`` (non-2xx only, label ``deployed_model_id``) and ``prediction_latencies`` (DISTRIBUTION DELTA in
  ms, labels ``deployed_model_id``, ``latency_type`` = ``model`` / ``overhead`` / ``total``). An endpoint created
  with ``predict_request_response_logging_config`` enabled logs each answered prediction (sampled at its rate) as
  a row of the BigQuery table's schema; :meth:`VertexStandIn.export_request_response_log` writes the rows as
  BigQuery's JSON export of the table to Cloud Storage would.
* ListTimeSeries honours ``name`` (``projects/<project>``), ``filter`` (``=`` / ``!=`` terms joined by AND on
  ``metric.type`` (exactly one ``=``, required), ``resource.type``, ``metric.label(s).X``,
  ``resource.label(s).X``), ``interval`` (a point counts when its end time is in (start, end]), ``view`` and paging.
  Without aggregation (or ALIGN_NONE) it answers one raw point per prediction (its interval: the prediction's
  start and end), newest first. Aggregation: ``alignment_period`` (at least 60 s, as the API requires; windows end
  at ``interval.end_time``), aligners ALIGN_SUM / ALIGN_DELTA (sum; distributions merged), ALIGN_COUNT,
  ALIGN_RATE, ALIGN_MEAN, ALIGN_MIN, ALIGN_MAX, ALIGN_PERCENTILE_05/50/95/99; reducers REDUCE_SUM (distributions
  merged), REDUCE_MEAN, REDUCE_MIN, REDUCE_MAX, REDUCE_COUNT with ``group_by_fields``. Anything else is
  INVALID_ARGUMENT.

* Hyperparameter tuning jobs (``hyperparameterTuningJobs``: create, get, list with a filter, cancel): each trial
  is a custom job of ``trial_job_spec`` (run as above) with the trial's values appended to the containers' args as
  ``--<parameter_id>=<value>``, ``CLOUD_ML_TRIAL_ID`` set and its outputs under ``<base_output_directory>/<trial
  id>/``; ``parallel_trial_count`` run at once up to ``max_trial_count``. Values are drawn at random within each
  range (log ranges on a log scale; no Bayesian optimizer, whatever the algorithm). A trial's measurement is the
  last line of the study's metric in its primary replica's hypertune file (``CLOUD_ML_HP_METRIC_FILE``, as
  ``cloudml-hypertune`` writes it): SUCCEEDED with ``final_measurement``; a failed job or no reported value is
  INFEASIBLE with ``infeasible_reason``. The job SUCCEEDS when every trial ended and one succeeded, FAILS when all
  failed or ``max_failed_trial_count`` is reached; cancel cancels the running trials' jobs. No automated stopping.

Not emulated: other services and methods (rawPredict, streaming, batch prediction, pipelines, model
versions/``parent_model``, MutateDeployedModel, ``:update`` long-running endpoint updates,
operation cancel/list), ``python_package_spec``, ``container_spec.command`` (the stand-in's commands stand for the
image), replica counts of deployed models (one server per deployed model; autoscaling specs are checked and stored),
GCS (``gs://`` URIs are passed to the containers as given; tests use ``file://``), IAM and authentication (any
credentials pass), and one project and location only.

Statuses move on a background clock (every ``tick`` seconds) in real time; :attr:`VertexStandIn.errors` collects
what went wrong inside it or in a request handler (a test asserts it stays empty); :attr:`VertexStandIn.calls`
lists the REST requests received (``"VERB /path?query"``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from airflow_llmops.ml.training.jobdir import CHECKPOINT_PATTERN, STATE_FILE, WEIGHT_FILES
from airflow_llmops.processes import child_env, free_port

from .sagemaker import _remember, _signal_group, _signal_tree, _tail

PROJECT = "llmops-standin"
LOCATION = "us-central1"
DEFAULT_TRAINING_COMMAND = (sys.executable, "-m", "airflow_llmops.ml.runtime", "train")
DEFAULT_SERVING_COMMAND = (sys.executable, "-m", "airflow_llmops.ml.runtime", "serve")
FAILURE_MARK = "[llmops-failure]"
CLUSTER_PORT = 2222  # the port Vertex's CLUSTER_SPEC names on every host
ERROR_MESSAGE_MAX = 4000
METRIC_PREFIX = "aiplatform.googleapis.com/prediction/online/"
PREDICTION_COUNT = METRIC_PREFIX + "prediction_count"
RESPONSE_COUNT = METRIC_PREFIX + "response_count"
ERROR_COUNT = METRIC_PREFIX + "error_count"
PREDICTION_LATENCIES = METRIC_PREFIX + "prediction_latencies"
ENDPOINT_RESOURCE = "aiplatform.googleapis.com/Endpoint"
METRIC_TYPES = (PREDICTION_COUNT, RESPONSE_COUNT, ERROR_COUNT, PREDICTION_LATENCIES)
MIN_ALIGNMENT_SECONDS = 60
AUTOSCALING_METRICS = frozenset(
    {
        "aiplatform.googleapis.com/prediction/online/cpu/utilization",
        "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle",
        "aiplatform.googleapis.com/prediction/online/accelerator/memory/bytes_used",
        "aiplatform.googleapis.com/prediction/online/request_count",
        "pubsub.googleapis.com/subscription/num_undelivered_messages",
    }
)
LATENCY_BUCKETS = (1.0, 2.0, 24)  # exponential buckets: scale (ms), growth factor, number of finite buckets
TERMINAL_JOB_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_FILTER_TERM = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(!=|=)\s*(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s\"']+)\s*")

# google.rpc.Code: the gRPC code, and the HTTP status of its REST mapping
_CODES = {
    "CANCELLED": (1, 499),
    "UNKNOWN": (2, 500),
    "INVALID_ARGUMENT": (3, 400),
    "DEADLINE_EXCEEDED": (4, 504),
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "PERMISSION_DENIED": (7, 403),
    "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400),
    "ABORTED": (10, 409),
    "OUT_OF_RANGE": (11, 400),
    "UNIMPLEMENTED": (12, 501),
    "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503),
    "UNAUTHENTICATED": (16, 401),
}
_STATUS_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """An error the API answers: a google.rpc status name (``INVALID_ARGUMENT``...) and a message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

    @property
    def http(self) -> int:
        return _CODES[self.status][1]

    def payload(self) -> dict[str, Any]:
        return {"error": {"code": self.http, "message": self.message, "status": self.status}}


def _invalid(errors: list[tuple[str, str]]) -> None:
    """Raise Vertex's INVALID_ARGUMENT for a request's field errors (path, message), if there are any."""
    if errors:
        found = "".join(f"\t{i}.Field: {path}; Message: {message}\n" for i, (path, message) in enumerate(errors, 1))
        raise ApiError("INVALID_ARGUMENT", f"List of found errors:\n{found}")


def _container_argv(command: Sequence[str], args: Sequence[str]) -> list[str]:
    """The container's process: ``command`` + the container spec's ``args``. The runtime image's entrypoint
    dispatches its first argument (``train`` / ``serve``), so args that name the mode replace the command's own."""
    args = list(args)
    if args and args[0] in ("train", "serve") and command and command[-1] in ("train", "serve"):
        return [*command[:-1], *args]
    return [*command, *args]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _local_path(uri: str) -> Path | None:
    """The local folder a ``file://`` URI (or an absolute path) names; None for ``gs://`` and the like."""
    if uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
    if uri.startswith("/"):
        return Path(uri)
    return None


def _join_uri(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}/"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _parse_message(cls: Any, body: bytes, what: str) -> Any:
    """A request body as the proto-plus message ``cls``; an unknown field (a typo) is INVALID_ARGUMENT."""
    from google.protobuf import json_format

    pb = cls.pb()()
    try:
        json_format.Parse(body.decode("utf-8") if body.strip() else "{}", pb, ignore_unknown_fields=False)
    except (json_format.ParseError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received for {what}. {first}") from None
    return cls.wrap(pb)


def _copy(msg: Any) -> Any:
    pb = type(msg).pb(msg)
    clone = type(pb)()
    clone.CopyFrom(pb)
    return type(msg).wrap(clone)


def _to_json(msg: Any, ints: bool) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(type(msg).pb(msg), use_integers_for_enums=ints)


def _check_labels(labels: Mapping[str, str], path: str) -> list[tuple[str, str]]:
    errors = []
    if len(labels) > 64:
        errors.append((path, "at most 64 labels"))
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            errors.append(
                (
                    f"{path}[{key!r}]",
                    "label keys start with a lowercase letter and hold at most 63 "
                    "lowercase letters, digits, underscores and dashes",
                )
            )
        if not _LABEL_VALUE.fullmatch(value):
            errors.append(
                (f"{path}[{key!r}]", "label values hold at most 63 lowercase letters, digits, underscores and dashes")
            )
    return errors


def _parse_filter(text: str, keys: Callable[[str], bool], what: str) -> list[tuple[str, str, str]]:
    """``key = "value"`` terms joined by AND (``=`` or ``!=``, quoted or bare values); keys ``keys`` accepts."""
    terms: list[tuple[str, str, str]] = []
    if not text.strip():
        return terms
    for part in re.split(r"\s+AND\s+", text.strip()):
        match = _FILTER_TERM.fullmatch(part)
        if match is None:
            raise ApiError(
                "INVALID_ARGUMENT",
                f'Unsupported {what} filter term {part!r}: the stand-in understands `key = "value"` and '
                '`key != "value"` terms joined by AND',
            )
        key, op, raw = match.groups()
        if raw.startswith('"'):
            value = json.loads(raw)
        elif raw.startswith("'"):
            value = raw[1:-1]
        else:
            value = raw
        if not keys(key):
            raise ApiError("INVALID_ARGUMENT", f"Unsupported {what} filter key {key!r} in {text!r}")
        terms.append((key, op, value))
    return terms


def _matches(terms: list[tuple[str, str, str]], value_of: Callable[[str], str | None]) -> bool:
    for key, op, value in terms:
        actual = value_of(key)
        if (actual == value) != (op == "="):
            return False
    return True


# -- the things the clock runs -----------------------------------------------------------------------------------


@dataclass
class _Replica:
    pool: int
    index: int
    folder: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    known: dict[int, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"workerpool{self.pool}-{self.index}"

    def code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


@dataclass
class _Run:
    """A custom job: the resource GET shows, and its replicas."""

    id: str
    job: Any  # aiplatform_v1.CustomJob
    replicas: list[_Replica] = field(default_factory=list)
    attempt: int = 0
    running_since: float | None = None
    cancel: bool = False
    stopping: str | None = None  # cancel, failure, timeout, primary-done
    stop_sent: float | None = None
    primary_done: float | None = None
    failed: tuple[_Replica, int] | None = None
    preemptions: int = 0
    logs: list[Path] = field(default_factory=list)
    done: bool = False


@dataclass
class _Study:
    """A hyperparameter tuning job: the resource GET shows, and the custom job of each trial."""

    id: str
    job: Any  # aiplatform_v1.HyperparameterTuningJob
    random: random.Random
    runs: dict[str, str] = field(default_factory=dict)  # trial id -> custom job id
    cancel: bool = False
    done: bool = False


@dataclass
class _Operation:
    name: str
    metadata: Any  # a proto-plus message
    done: bool = False
    response: Any = None  # a proto-plus message, or None for google.protobuf.Empty
    error: tuple[str, str] | None = None  # (status name, message)
    due: float = 0.0
    finish: Callable[[], Any] | None = None  # simple operations: does the work, returns the response


@dataclass
class _Server:
    endpoint_id: str
    deployed_model_id: str
    model: str
    folder: Path
    port: int
    health_route: str
    predict_route: str
    env: dict[str, str]
    args: list[str]
    popen: subprocess.Popen[bytes] | None = None
    known: dict[int, Any] = field(default_factory=dict)
    started: float | None = None
    ready: bool = False
    failure: str | None = None
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"


@dataclass
class _Change:
    """A deployment or undeployment in flight on an endpoint."""

    kind: str  # deploy, undeploy
    op: _Operation
    endpoint_id: str
    deployed: Any  # deploy: aiplatform_v1.DeployedModel (id filled in)
    deployed_model_id: str
    traffic_split: dict[str, int]
    server: _Server | None = None


@dataclass
class _EndpointState:
    endpoint: Any  # aiplatform_v1.Endpoint
    servers: dict[str, _Server] = field(default_factory=dict)  # by deployed model id
    busy: _Operation | None = None


@dataclass(frozen=True)
class _Prediction:
    endpoint_id: str
    deployed_model_id: str
    code: int
    start: float
    end: float
    model_ms: float

    @property
    def total_ms(self) -> float:
        return (self.end - self.start) * 1000.0


@dataclass
class _Fault:
    status: int
    body: str


# -- the stand-in -------------------------------------------------------------------------------------------------


class VertexStandIn:
    """Vertex AI's v1 REST surface and Cloud Monitoring's ListTimeSeries on loopback (see the module).

    ``root``: where replicas' folders, logs and servers' folders go (a temporary folder, removed by :meth:`stop`,
    when not given). ``training_command`` / ``serving_command``: what a training replica / a deployed model runs
    (the container's args are appended). ``container_env``: extra environment for every container. ``tick``:
    seconds between two steps of the clock. ``stop_grace_seconds``: SIGTERM to SIGKILL (cancel, a failed peer).
    ``server_start_timeout``: how long a deployed model's server may take to answer its health route.
    ``operation_seconds``: how long uploads, endpoint creation and deletions take (0: their operation is done in
    the reply). ``seed``: the traffic split's choices.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        project: str = PROJECT,
        location: str = LOCATION,
        training_command: Sequence[str] = DEFAULT_TRAINING_COMMAND,
        serving_command: Sequence[str] = DEFAULT_SERVING_COMMAND,
        container_env: Mapping[str, str] | None = None,
        tick: float = 0.25,
        stop_grace_seconds: float = 20.0,
        server_start_timeout: float = 240.0,
        operation_seconds: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="llmops-vertex-"))
        self.project = project
        self.location = location
        self.training_command = list(training_command)
        self.serving_command = list(serving_command)
        self.container_env = dict(container_env or {})
        self.tick = tick
        self.stop_grace_seconds = stop_grace_seconds
        self.server_start_timeout = server_start_timeout
        self.operation_seconds = operation_seconds
        self.errors: list[str] = []
        self.calls: list[str] = []  # every REST request: "VERB /path?query", in order
        self.api_endpoint = ""
        self.monitoring_endpoint = ""
        self._random = random.Random(seed)
        self._ids = itertools.count(1001)
        self._lock = threading.RLock()
        self._advance_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._studies: dict[str, _Study] = {}
        self._models: dict[str, Any] = {}
        self._endpoints: dict[str, _EndpointState] = {}
        self._operations: dict[str, _Operation] = {}
        self._changes: list[_Change] = []
        self._reaping: list[tuple[subprocess.Popen[bytes], dict[int, Any], float]] = []
        self._predictions: list[_Prediction] = []
        self._logged: list[dict[str, Any]] = []  # request-response logging rows (the BigQuery table's schema)
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._clients: dict[str, Any] = {}
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc: Any = None
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def __enter__(self) -> VertexStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def parent(self) -> str:
        """``projects/<project>/locations/<location>``."""
        return f"projects/{self.project}/locations/{self.location}"

    def start(self) -> VertexStandIn:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handler = type("_BoundHandler", (_Handler,), {"standin": self})
            self._http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            self._http.daemon_threads = True
            self.api_endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"
            self._http_thread = threading.Thread(
                target=self._http.serve_forever, kwargs={"poll_interval": 0.2}, name="vertex-standin-http", daemon=True
            )
            self._http_thread.start()
            self._start_grpc()
            self._stopping.clear()
            self._ticker = threading.Thread(target=self._tick_loop, name="vertex-standin-clock", daemon=True)
            self._ticker.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_grpc(self) -> None:
        import grpc
        from google.cloud import monitoring_v3

        request_type = monitoring_v3.ListTimeSeriesRequest.pb()
        handler = grpc.unary_unary_rpc_method_handler(
            self._on_list_time_series,
            request_deserializer=request_type.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )
        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="vertex-standin-grpc"))
        self._grpc.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("google.monitoring.v3.MetricService", {"ListTimeSeries": handler}),)
        )
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self.monitoring_endpoint = f"127.0.0.1:{port}"

    def stop(self) -> None:
        """Stop the clock, every replica and server (their process trees), the HTTP and gRPC servers."""
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(timeout=60)
            self._ticker = None
        procs: list[tuple[subprocess.Popen[bytes], dict[int, Any]]] = []
        with self._lock:
            for run in self._runs.values():
                procs += [(r.popen, r.known) for r in run.replicas if r.popen is not None]
            for state in self._endpoints.values():
                procs += [(s.popen, s.known) for s in state.servers.values() if s.popen is not None]
            procs += [(c.server.popen, c.server.known) for c in self._changes if c.server and c.server.popen]
            procs += [(p, known) for p, known, _ in self._reaping]
        for popen, known in procs:
            _signal_tree(popen, known, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for popen, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for popen, known in procs:
            _signal_tree(popen, known, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.transport.close()
        self._clients.clear()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
            self._http_thread = None
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait(5)
            self._grpc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- what tests and adapters use ------------------------------------------------------------------------------
    def client(self, kind: str) -> Any:
        """A ready GAPIC client against the stand-in: ``job``, ``model``, ``endpoint``, ``prediction`` (v1, REST
        transport) or ``metric`` (monitoring_v3 over an insecure gRPC channel)."""
        with self._lock:
            if kind not in self._clients:
                self._clients[kind] = self._new_client(kind)
            return self._clients[kind]

    def _new_client(self, kind: str) -> Any:
        if kind == "metric":
            import grpc
            from google.cloud import monitoring_v3
            from google.cloud.monitoring_v3.services.metric_service.transports import MetricServiceGrpcTransport

            channel = grpc.insecure_channel(self.monitoring_endpoint)
            return monitoring_v3.MetricServiceClient(transport=MetricServiceGrpcTransport(channel=channel))
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import aiplatform_v1

        classes = {
            "job": aiplatform_v1.JobServiceClient,
            "model": aiplatform_v1.ModelServiceClient,
            "endpoint": aiplatform_v1.EndpointServiceClient,
            "prediction": aiplatform_v1.PredictionServiceClient,
        }
        if kind not in classes:
            raise ValueError(f"no client {kind!r}: one of {sorted([*classes, 'metric'])}")
        return classes[kind](
            client_options=ClientOptions(api_endpoint=self.api_endpoint),
            transport="rest",
            credentials=AnonymousCredentials(),
        )

    def endpoint_id(self, endpoint: str) -> str:
        """An endpoint's id from its id, resource name or display name."""
        key = endpoint.rsplit("/", 1)[-1]
        with self._lock:
            if key in self._endpoints:
                return key
            found = [eid for eid, s in self._endpoints.items() if s.endpoint.display_name == endpoint]
        if len(found) != 1:
            raise KeyError(f"no single endpoint {endpoint!r} (found {found})")
        return found[0]

    def predict(self, endpoint: str, instances: Sequence[Any], parameters: Any = None) -> tuple[int, Any, str | None]:
        """Predict through the real PredictionServiceClient: (HTTP status, the answer as JSON, the deployed model
        id that answered). A failed prediction's body is Google's error JSON; its deployed model id comes from the
        ``X-Vertex-AI-Deployed-Model-Id`` header (None when no model was chosen)."""
        from google.api_core import exceptions
        from google.cloud import aiplatform_v1
        from google.protobuf import json_format

        name = f"{self.parent}/endpoints/{self.endpoint_id(endpoint)}"
        kwargs: dict[str, Any] = {"endpoint": name, "instances": list(instances)}
        if parameters is not None:
            kwargs["parameters"] = parameters
        try:
            answer = self.client("prediction").predict(**kwargs)
        except exceptions.GoogleAPICallError as err:
            response = getattr(err, "response", None)
            if response is None:
                raise
            try:
                body = response.json()
            except ValueError:
                body = response.text
            return int(response.status_code), body, response.headers.get("X-Vertex-AI-Deployed-Model-Id")
        body = json_format.MessageToDict(aiplatform_v1.PredictResponse.pb(answer))
        return 200, body, answer.deployed_model_id or None

    def fail_deployed_model(
        self, endpoint_id: str, deployed_model_id: str, status: int = 500, body: str | None = None
    ) -> None:
        """From now on the deployed model's container answers ``status`` (without reaching its server)."""
        with self._lock:
            self._faults[(endpoint_id, deployed_model_id)] = _Fault(
                status, body or json.dumps({"error": "fault injected"})
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def job_id(self, custom_job: str) -> str:
        """A custom job's id from its id, resource name or display name."""
        key = custom_job.rsplit("/", 1)[-1]
        with self._lock:
            if key in self._runs:
                return key
            found = [jid for jid, run in self._runs.items() if run.job.display_name == custom_job]
        if len(found) != 1:
            raise KeyError(f"no single custom job {custom_job!r} (found {found})")
        return found[0]

    def job_log_files(self, custom_job: str) -> list[Path]:
        """The replicas' log files (stdout and stderr), attempt by attempt, workerpool0-0 first."""
        with self._lock:
            return list(self._runs[self.job_id(custom_job)].logs)

    def job_logs(self, custom_job: str) -> list[str]:
        """The lines of :meth:`job_log_files`, in that order."""
        lines: list[str] = []
        for path in self.job_log_files(custom_job):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()
        return lines

    def replica_folder(self, custom_job: str, pool: int = 0, index: int = 0) -> Path:
        """The working folder of a replica (its "VM's disk"; a fresh one after a preemption)."""
        return self.root / "jobs" / self.job_id(custom_job) / f"workerpool{pool}-{index}"

    def server_log(self, endpoint_id: str, deployed_model_id: str) -> str:
        return _tail(self.root / "serving" / endpoint_id / deployed_model_id / "server.log", 10_000)

    def wait_job(self, custom_job: str, states: Sequence[Any] = TERMINAL_JOB_STATES, timeout: float = 300) -> Any:
        """Poll GetCustomJob (the real client) until its state is one of ``states`` (names or JobState values);
        returns the CustomJob."""
        from google.cloud import aiplatform_v1

        wanted = {
            aiplatform_v1.JobState[s].name if isinstance(s, str) else aiplatform_v1.JobState(s).name for s in states
        }
        name = f"{self.parent}/customJobs/{self.job_id(custom_job)}"
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            job = self.client("job").get_custom_job(name=name)
            state = aiplatform_v1.JobState(job.state).name
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in wanted:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: still {state} after {timeout:.0f}s (seen {seen}); errors: {self.errors}")
            time.sleep(0.25)

    def preempt(self, custom_job: str, *, after_checkpoint: bool = False, timeout: float = 120.0) -> None:
        """A Spot VM preemption of a running SPOT job: its replicas are killed (SIGKILL, whole process trees) and
        started again on "new VMs" (fresh working folders, a new log file each); they resume from
        AIP_CHECKPOINT_DIR. Waits for the job to run (and, ``after_checkpoint``, for a complete checkpoint under its
        AIP_CHECKPOINT_DIR, which must then be a local ``file://`` folder). ValueError for a job that is not SPOT;
        RuntimeError if the job ended first."""
        from google.cloud import aiplatform_v1

        jid = self.job_id(custom_job)
        deadline = time.monotonic() + timeout
        while True:
            with self._advance_lock:
                run = self._runs[jid]
                with self._lock:
                    spec = run.job.job_spec
                    strategy = aiplatform_v1.Scheduling.Strategy(spec.scheduling.strategy).name
                    state = aiplatform_v1.JobState(run.job.state).name
                if strategy != "SPOT":
                    raise ValueError(f"custom job {jid} runs on {strategy} VMs: only SPOT VMs are preempted")
                if run.done or state not in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING") or run.cancel:
                    raise RuntimeError(f"custom job {jid} ended before the preemption ({state})")
                alive = run.replicas and all(r.code() is None for r in run.replicas)
                if alive and run.stopping is None and (not after_checkpoint or self._has_checkpoint(run)):
                    self._preempt(run)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"custom job {jid} was not preempted within {timeout:.0f}s")
            time.sleep(0.1)

    def predictions(self) -> list[_Prediction]:
        """Every prediction routed to a deployed model so far (what the Monitoring points are made of)."""
        with self._lock:
            return list(self._predictions)

    # -- the clock ------------------------------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stopping.wait(self.tick):
            self.advance()

    def advance(self) -> None:
        """One step of the clock (the background thread calls it every ``tick`` seconds)."""
        with self._advance_lock:
            with self._lock:
                runs = [run for run in self._runs.values() if not run.done]
                studies = [study for study in self._studies.values() if not study.done]
                ops = [op for op in self._operations.values() if not op.done and op.finish is not None]
                changes = list(self._changes)
            for run in runs:
                self._guard(f"custom job {run.id}", self._advance_job, run)
            for study in studies:
                self._guard(f"tuning job {study.id}", self._advance_study, study)
            for op in ops:
                if time.monotonic() >= op.due:
                    self._guard(f"operation {op.name}", self._complete, op)
            for change in changes:
                self._guard(f"{change.kind} on endpoint {change.endpoint_id}", self._advance_change, change)
            self._guard("reaper", self._reap)

    def _guard(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.errors.append(f"{what}: {traceback.format_exc()}")

    def _new_id(self) -> str:
        return str(next(self._ids))

    # -- custom jobs ----------------------------------------------------------------------------------------------
    def _set_state(self, run: _Run, state: str, error: tuple[int, str] | None = None) -> None:
        """(Caller holds the lock.)"""
        from google.cloud import aiplatform_v1
        from google.rpc import status_pb2

        now = _now()
        run.job.state = aiplatform_v1.JobState[state]
        run.job.update_time = now
        if state == "JOB_STATE_RUNNING" and "start_time" not in run.job:
            run.job.start_time = now
        if state in TERMINAL_JOB_STATES:
            run.job.end_time = now
        if error is not None:
            run.job.error = status_pb2.Status(code=error[0], message=error[1][:ERROR_MESSAGE_MAX])

    def _advance_job(self, run: _Run) -> None:
        from google.cloud import aiplatform_v1

        with self._lock:
            state = aiplatform_v1.JobState(run.job.state).name
        if state == "JOB_STATE_PENDING" or (state == "JOB_STATE_CANCELLING" and not run.replicas):
            if run.cancel:
                self._end_job(run, "JOB_STATE_CANCELLED", (1, "CANCELED"))
                return
            try:
                self._launch(run)
            except (OSError, ValueError) as err:
                self._end_job(run, "JOB_STATE_FAILED", (3, f"The replicas could not be started: {err}"))
                return
            with self._lock:
                self._set_state(run, "JOB_STATE_RUNNING")
            return
        self._advance_replicas(run)

    def _advance_replicas(self, run: _Run) -> None:
        now = time.monotonic()
        for replica in run.replicas:
            _remember(replica.popen, replica.known)
        codes = [r.code() for r in run.replicas]
        if run.stopping is None:
            timeout = self._timeout_seconds(run)
            failed = [(r, c) for r, c in zip(run.replicas, codes, strict=True) if c not in (None, 0)]
            if run.cancel:
                run.stopping = "cancel"
            elif failed:
                run.failed = failed[0]  # type: ignore[assignment]
                run.stopping = "failure"
            elif timeout and run.running_since is not None and now - run.running_since > timeout:
                run.stopping = "timeout"
            elif codes and codes[0] == 0 and any(c is None for c in codes):
                # The primary replica (workerpool0) decides the job's success; the others get a grace to finish.
                run.primary_done = run.primary_done or now
                if now - run.primary_done > self.stop_grace_seconds:
                    run.stopping = "primary-done"
            if run.stopping is not None:
                for replica, code in zip(run.replicas, codes, strict=True):
                    if code is None:
                        _signal_group(replica.popen, signal.SIGTERM)
                run.stop_sent = now
        elif run.stop_sent is not None and now - run.stop_sent > self.stop_grace_seconds:
            for replica in run.replicas:
                _signal_tree(replica.popen, replica.known, signal.SIGKILL)
        if any(c is None for c in codes):
            return
        for replica in run.replicas:  # the VMs are gone: whatever a container started goes with it
            _signal_tree(replica.popen, replica.known, signal.SIGKILL)
        if run.stopping == "cancel":
            self._end_job(run, "JOB_STATE_CANCELLED", (1, "CANCELED"))
        elif run.stopping == "timeout":
            self._end_job(
                run, "JOB_STATE_FAILED", (4, "The job exceeded its job_spec.scheduling.timeout and was stopped.")
            )
        elif run.stopping == "primary-done" or all(c == 0 for c in codes):
            self._end_job(run, "JOB_STATE_SUCCEEDED")
        else:
            failed = run.failed or next((r, c) for r, c in zip(run.replicas, codes, strict=True) if c)
            self._end_job(run, "JOB_STATE_FAILED", (3, self._failure_message(*failed)))  # type: ignore[arg-type]

    def _timeout_seconds(self, run: _Run) -> float:
        with self._lock:
            timeout = run.job.job_spec.scheduling.timeout
        return timeout.total_seconds() if timeout else 0.0

    def _end_job(self, run: _Run, state: str, error: tuple[int, str] | None = None) -> None:
        for replica in run.replicas:
            _signal_tree(replica.popen, replica.known, signal.SIGKILL)
        with self._lock:
            self._set_state(run, state, error)
            run.done = True

    def _failure_message(self, replica: _Replica, code: int) -> str:
        lines = _tail(replica.log, 400).splitlines()
        reason = next((line.split(FAILURE_MARK, 1)[1].strip() for line in reversed(lines) if FAILURE_MARK in line), "")
        status = code if code >= 0 else 128 - code
        text = (
            f"The replica {replica.name} exited with a non-zero status of {status}. Termination reason: Error. "
            "Last log lines:\n" + "\n".join(lines[-20:])
        )
        return f"{reason}\n{text}" if reason else text

    def _launch(self, run: _Run) -> None:
        """Start every replica of every worker pool (a new attempt: fresh folders, new log files)."""
        from google.cloud import aiplatform_v1
        from google.protobuf import json_format

        with self._lock:
            spec = _copy(run.job.job_spec)
        base = spec.base_output_directory.output_uri_prefix
        pools = [(i, pool) for i, pool in enumerate(spec.worker_pool_specs) if pool.replica_count > 0]
        cluster = {
            f"workerpool{i}": [f"workerpool{i}-{r}.job-{run.id}:{CLUSTER_PORT}" for r in range(pool.replica_count)]
            for i, pool in pools
        }
        job_text = json.dumps(
            json_format.MessageToDict(aiplatform_v1.CustomJobSpec.pb(spec), preserving_proto_field_name=True)
        )
        port = free_port()
        attempt = run.attempt + 1
        folder = self.root / "jobs" / run.id
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        replicas: list[_Replica] = []
        for i, pool in pools:
            for r in range(pool.replica_count):
                replica = _Replica(
                    i, r, folder / f"workerpool{i}-{r}", folder / "logs" / f"workerpool{i}-{r}.attempt{attempt}.log"
                )
                shutil.rmtree(replica.folder, ignore_errors=True)  # a new VM's disk
                replica.folder.mkdir(parents=True)
                cluster_spec = {
                    "cluster": cluster,
                    "environment": "cloud",
                    "task": {"type": f"workerpool{i}", "index": r},
                    "job": job_text,
                }
                vertex = {
                    "CLUSTER_SPEC": json.dumps(cluster_spec),
                    "CLOUD_ML_JOB_ID": run.id,
                    "LLMOPS_MASTER_ADDR": "127.0.0.1",
                    "LLMOPS_MASTER_PORT": str(port),
                    "LLMOPS_WORK_DIR": str(replica.folder),  # the runtime's local folder: this "VM's disk"
                    # hypertune's file (/tmp/hypertune/output.metrics in a container): on this "VM's disk"
                    "CLOUD_ML_HP_METRIC_FILE": str(replica.folder / "hypertune" / "output.metrics"),
                }
                if base:
                    vertex["AIP_MODEL_DIR"] = _join_uri(base, "model")
                    vertex["AIP_CHECKPOINT_DIR"] = _join_uri(base, "checkpoints")
                    vertex["AIP_TENSORBOARD_LOG_DIR"] = _join_uri(base, "logs")
                container = pool.container_spec
                env = child_env({**self.container_env, **{e.name: e.value for e in container.env}, **vertex})
                with replica.log.open("ab") as log:
                    replica.popen = subprocess.Popen(
                        _container_argv(self.training_command, container.args),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=replica.folder,
                        env=env,
                        start_new_session=True,
                    )
                replicas.append(replica)
                with self._lock:
                    run.logs.append(replica.log)
        run.replicas = replicas
        run.attempt = attempt
        run.running_since = run.running_since or time.monotonic()
        run.stopping = run.failed = None
        run.stop_sent = run.primary_done = None

    def _checkpoint_dir(self, run: _Run) -> Path | None:
        with self._lock:
            base = run.job.job_spec.base_output_directory.output_uri_prefix
        local = _local_path(base) if base else None
        return local / "checkpoints" if local is not None else None

    def _has_checkpoint(self, run: _Run) -> bool:
        """A complete checkpoint (weights and a readable trainer state) anywhere under AIP_CHECKPOINT_DIR."""
        folder = self._checkpoint_dir(run)
        if folder is None:
            raise ValueError("after_checkpoint needs a file:// base_output_directory (AIP_CHECKPOINT_DIR is read)")
        if not folder.is_dir():
            return False
        for state in folder.rglob(STATE_FILE):
            checkpoint = state.parent
            if not CHECKPOINT_PATTERN.match(checkpoint.name):
                continue
            if not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
                return True
        return False

    def _preempt(self, run: _Run) -> None:
        """(Caller holds the clock.) Kill the replicas' VMs, then start the replicas again."""
        for replica in run.replicas:  # the VM stops at once: nothing gets to finish writing
            _signal_tree(replica.popen, replica.known, signal.SIGSTOP)
        for replica in run.replicas:
            _signal_tree(replica.popen, replica.known, signal.SIGKILL)
            if replica.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    replica.popen.wait(timeout=10)
            with contextlib.suppress(OSError), replica.log.open("a") as log:
                log.write("[vertex-standin] the Spot VM was preempted; the replica restarts on a new VM\n")
        run.preemptions += 1
        self._launch(run)
        with self._lock:
            run.job.update_time = _now()

    # -- servers --------------------------------------------------------------------------------------------------
    def _start_server(self, server: _Server) -> None:
        server.started = time.monotonic()
        server.folder.mkdir(parents=True, exist_ok=True)
        with server.log.open("ab") as log:
            server.popen = subprocess.Popen(
                _container_argv(self.serving_command, server.args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=server.folder,
                env=child_env(server.env),
                start_new_session=True,
            )

    def _check_server(self, server: _Server) -> None:
        if server.ready or server.failure or server.stopped:
            return
        if server.popen is None:
            try:
                self._start_server(server)
            except (OSError, ValueError) as err:
                server.failure = f"Model server could not be started: {err}"
            return
        _remember(server.popen, server.known)
        code = server.popen.poll()
        if code is not None:
            server.failure = (
                f"Model server exited unexpectedly (exit code {code}). Model server logs:\n{_tail(server.log, 15)}"
            )
            return
        try:
            with urllib.request.urlopen(f"{server.url}{server.health_route}", timeout=2) as answer:
                server.ready = answer.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if not server.ready and time.monotonic() - (server.started or 0) > self.server_start_timeout:
            server.failure = (
                f"Model server never became ready: {server.health_route} did not answer 200 within "
                f"{self.server_start_timeout:.0f}s. Model server logs:\n{_tail(server.log, 15)}"
            )

    def _stop_server(self, server: _Server) -> None:
        server.stopped = True
        server.ready = False
        if server.popen is not None and server.popen.poll() is None:
            _signal_tree(server.popen, server.known, signal.SIGTERM)
            with self._lock:
                self._reaping.append((server.popen, server.known, time.monotonic() + 10))

    def _reap(self) -> None:
        with self._lock:
            pending = list(self._reaping)
        finished = []
        for item in pending:
            popen, known, deadline = item
            if popen.poll() is None:
                if time.monotonic() > deadline:
                    _signal_tree(popen, known, signal.SIGKILL)
                continue
            _signal_tree(popen, known, signal.SIGKILL)  # what the stopped server left behind
            finished.append(item)
        with self._lock:
            self._reaping = [item for item in self._reaping if item not in finished]

    # -- operations -----------------------------------------------------------------------------------------------
    def _operation(self, name: str, metadata: Any, finish: Callable[[], Any] | None) -> _Operation:
        """A new operation; a simple one (``finish``) is done in the reply when ``operation_seconds`` is 0."""
        op = _Operation(name=name, metadata=metadata, finish=finish, due=time.monotonic() + self.operation_seconds)
        with self._lock:
            self._operations[name] = op
        if finish is not None and self.operation_seconds <= 0:
            self._complete(op)
        return op

    def _complete(self, op: _Operation) -> None:
        assert op.finish is not None
        try:
            response = op.finish()
        except ApiError as err:
            self._fail_op(op, err.status, err.message)
            return
        self._finish_op(op, response)

    def _finish_op(self, op: _Operation, response: Any) -> None:
        with self._lock:
            op.response = response
            op.done = True
            op.metadata.generic_metadata.update_time = _now()

    def _fail_op(self, op: _Operation, status: str, message: str) -> None:
        with self._lock:
            op.error = (status, message)
            op.done = True
            op.metadata.generic_metadata.update_time = _now()

    def _metadata(self, cls: Any) -> Any:
        from google.cloud import aiplatform_v1

        now = _now()
        return cls(generic_metadata=aiplatform_v1.GenericOperationMetadata(create_time=now, update_time=now))

    def _operation_json(self, op: _Operation, ints: bool) -> dict[str, Any]:
        from google.longrunning import operations_pb2
        from google.protobuf import any_pb2, empty_pb2, json_format
        from google.rpc import status_pb2

        with self._lock:
            pb = operations_pb2.Operation(name=op.name, done=op.done)
            metadata = any_pb2.Any()
            metadata.Pack(type(op.metadata).pb(op.metadata))
            pb.metadata.CopyFrom(metadata)
            if op.done and op.error is not None:
                status, message = op.error
                pb.error.CopyFrom(status_pb2.Status(code=_CODES[status][0], message=message))
            elif op.done:
                response = any_pb2.Any()
                response.Pack(empty_pb2.Empty() if op.response is None else type(op.response).pb(op.response))
                pb.response.CopyFrom(response)
        return json_format.MessageToDict(pb, use_integers_for_enums=ints)

    # -- endpoints: the clock -------------------------------------------------------------------------------------
    def _advance_change(self, change: _Change) -> None:
        if change.kind == "undeploy":
            self._finish_undeploy(change)
            return
        server = change.server
        assert server is not None
        self._check_server(server)
        if server.failure:
            self._stop_server(server)
            self._end_change(change)
            self._fail_op(change.op, "INVALID_ARGUMENT", server.failure)
        elif server.ready:
            self._finish_deploy(change, server)

    def _end_change(self, change: _Change) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._changes.remove(change)
            state = self._endpoints.get(change.endpoint_id)
            if state is not None and state.busy is change.op:
                state.busy = None

    def _finish_deploy(self, change: _Change, server: _Server) -> None:
        from google.cloud import aiplatform_v1

        with self._lock:
            state = self._endpoints[change.endpoint_id]
            endpoint = state.endpoint
            deployed = change.deployed
            deployed.create_time = _now()
            endpoint.deployed_models.append(deployed)
            if change.traffic_split:  # "0" is the model being deployed
                split = {(deployed.id if k == "0" else k): v for k, v in change.traffic_split.items()}
            elif not endpoint.deployed_models[:-1]:
                split = {deployed.id: 100}  # the first model takes all the traffic
            else:
                split = dict(endpoint.traffic_split)  # left as it is: the new model gets none
            endpoint.traffic_split.clear()
            endpoint.traffic_split.update(split)
            endpoint.update_time = _now()
            state.servers[deployed.id] = server
            model = self._models.get(deployed.model.split("@")[0].rsplit("/", 1)[-1])
            if model is not None:
                model.deployed_models.append(
                    aiplatform_v1.DeployedModelRef(endpoint=endpoint.name, deployed_model_id=deployed.id)
                )
            response = aiplatform_v1.DeployModelResponse(deployed_model=_copy(deployed))
        self._end_change(change)
        self._finish_op(change.op, response)

    def _finish_undeploy(self, change: _Change) -> None:
        from google.cloud import aiplatform_v1

        dmid = change.deployed_model_id
        with self._lock:
            state = self._endpoints[change.endpoint_id]
            endpoint = state.endpoint
            kept = [d for d in endpoint.deployed_models if d.id != dmid]
            gone = [d for d in endpoint.deployed_models if d.id == dmid]
            del endpoint.deployed_models[:]
            endpoint.deployed_models.extend(kept)
            split = change.traffic_split or {k: v for k, v in endpoint.traffic_split.items() if k != dmid}
            endpoint.traffic_split.clear()
            if kept:
                endpoint.traffic_split.update({k: v for k, v in split.items() if k != dmid})
            endpoint.update_time = _now()
            server = state.servers.pop(dmid, None)
            self._faults.pop((change.endpoint_id, dmid), None)
            for deployed in gone:
                model = self._models.get(deployed.model.split("@")[0].rsplit("/", 1)[-1])
                if model is not None:
                    refs = [r for r in model.deployed_models if r.deployed_model_id != dmid]
                    del model.deployed_models[:]
                    model.deployed_models.extend(refs)
        if server is not None:
            self._stop_server(server)
        self._end_change(change)
        self._finish_op(change.op, aiplatform_v1.UndeployModelResponse())

    # -- REST: dispatch -------------------------------------------------------------------------------------------
    def _routes(self) -> list[tuple[str, re.Pattern[str], Callable[..., Any], str]]:
        table = [
            ("POST", r"customJobs", self._create_custom_job, "CreateCustomJobRequest"),
            ("GET", r"customJobs", self._list_custom_jobs, "ListCustomJobsRequest"),
            ("GET", r"customJobs/([^/:]+)", self._get_custom_job, "GetCustomJobRequest"),
            ("DELETE", r"customJobs/([^/:]+)", self._delete_custom_job, "DeleteCustomJobRequest"),
            ("POST", r"customJobs/([^/:]+):cancel", self._cancel_custom_job, "CancelCustomJobRequest"),
            ("POST", r"hyperparameterTuningJobs", self._create_tuning_job, "CreateHyperparameterTuningJobRequest"),
            ("GET", r"hyperparameterTuningJobs", self._list_tuning_jobs, "ListHyperparameterTuningJobsRequest"),
            ("GET", r"hyperparameterTuningJobs/([^/:]+)", self._get_tuning_job, "GetHyperparameterTuningJobRequest"),
            (
                "POST",
                r"hyperparameterTuningJobs/([^/:]+):cancel",
                self._cancel_tuning_job,
                "CancelHyperparameterTuningJobRequest",
            ),
            ("POST", r"models:upload", self._upload_model, "UploadModelRequest"),
            ("GET", r"models", self._list_models, "ListModelsRequest"),
            ("GET", r"models/([^/:]+)", self._get_model, "GetModelRequest"),
            ("DELETE", r"models/([^/:]+)", self._delete_model, "DeleteModelRequest"),
            ("POST", r"endpoints", self._create_endpoint, "CreateEndpointRequest"),
            ("GET", r"endpoints", self._list_endpoints, "ListEndpointsRequest"),
            ("GET", r"endpoints/([^/:]+)", self._get_endpoint, "GetEndpointRequest"),
            ("PATCH", r"endpoints/([^/:]+)", self._update_endpoint, "UpdateEndpointRequest"),
            ("DELETE", r"endpoints/([^/:]+)", self._delete_endpoint, "DeleteEndpointRequest"),
            ("POST", r"endpoints/([^/:]+):deployModel", self._deploy_model, "DeployModelRequest"),
            ("POST", r"endpoints/([^/:]+):undeployModel", self._undeploy_model, "UndeployModelRequest"),
            ("POST", r"endpoints/([^/:]+):predict", self._predict, "PredictRequest"),
        ]
        return [(verb, re.compile(pattern), fn, request) for verb, pattern, fn, request in table]

    def _dispatch(
        self, verb: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        ints = "enum-encoding=int" in (query.get("$alt") or [""])[0]
        rest = next((path[len(p) :] for p in ("/v1/", "/ui/") if path.startswith(p)), None)
        match = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)(?:/(.+))?", rest or "")
        if match is None:
            raise ApiError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
        project, location, tail = match.group(1), match.group(2), match.group(3) or ""
        if project != self.project:
            raise ApiError(
                "PERMISSION_DENIED",
                f"Permission denied on resource project {project} (the stand-in emulates project {self.project} only).",
            )
        if location != self.location:
            raise ApiError("INVALID_ARGUMENT", f"The stand-in emulates location {self.location} only, not {location}.")
        if re.fullmatch(r"(?:(?:endpoints|models|customJobs)/[^/]+/)?operations/[^/]+", tail):
            if verb != "GET":
                raise ApiError("UNIMPLEMENTED", f"{verb} on operations is not emulated (GET only).")
            with self._lock:
                op = self._operations.get(rest or "")
            if op is None:
                raise ApiError("NOT_FOUND", f"Operation {rest} is not found.")
            return 200, self._operation_json(op, ints), {}
        for route_verb, pattern, fn, request in self._routes():
            found = pattern.fullmatch(tail)
            if found is not None and route_verb == verb:
                self._check_query(query, request)
                return fn(*found.groups(), query=query, body=body, ints=ints)
        raise ApiError("NOT_FOUND", f"The requested URL {path} ({verb}) was not found on this server.")

    def _check_query(self, query: Mapping[str, list[str]], request: str) -> None:
        from google.cloud import aiplatform_v1

        descriptor = getattr(aiplatform_v1, request).pb().DESCRIPTOR
        names = {f.name for f in descriptor.fields} | {f.json_name for f in descriptor.fields}
        for key in query:
            if key != "$alt" and key.split(".")[0] not in names:
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f'Invalid JSON payload received. Unknown name "{key}": Cannot bind query parameter. Field '
                    f"'{key}' could not be found in request message.",
                )

    def _param(self, query: Mapping[str, list[str]], name: str) -> str:
        for key in (name, _snake(name)):
            if query.get(key):
                return query[key][0]
        return ""

    def _page(self, items: list[Any], query: Mapping[str, list[str]], key: str, ints: bool) -> dict[str, Any]:
        try:
            size = int(self._param(query, "pageSize") or 0) or 100
            start = int(self._param(query, "pageToken") or 0)
        except ValueError:
            raise ApiError("INVALID_ARGUMENT", "Invalid pageSize or pageToken.") from None
        with self._lock:
            out: dict[str, Any] = {key: [_to_json(item, ints) for item in items[start : start + size]]}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return out

    def _listed(self, resources: list[Any], query: Mapping[str, list[str]], extra: Mapping[str, str]) -> list[Any]:
        """Resources a list call's filter keeps: ``display_name``, ``labels.<key>`` and the ``extra`` keys (key ->
        the resource attribute, e.g. ``state``)."""
        text = self._param(query, "filter")
        terms = _parse_filter(
            text, lambda k: k in ("display_name", "displayName") or k.startswith("labels.") or k in extra, "list"
        )

        def value_of(resource: Any) -> Callable[[str], str | None]:
            def get(key: str) -> str | None:
                if key in ("display_name", "displayName"):
                    return str(resource.display_name)
                if key.startswith("labels."):
                    return resource.labels.get(key[len("labels.") :])
                value = getattr(resource, extra[key])
                return value.name if hasattr(value, "name") and not isinstance(value, str) else str(value)

            return get

        with self._lock:
            return [r for r in resources if _matches(terms, value_of(r))]

    # -- hyperparameter tuning jobs -------------------------------------------------------------------------------
    def _study(self, job_id: str) -> _Study:
        with self._lock:
            study = self._studies.get(job_id)
        if study is None:
            raise ApiError(
                "NOT_FOUND",
                f"The HyperparameterTuningJob {self.parent}/hyperparameterTuningJobs/{job_id} is not found.",
            )
        return study

    def _check_tuning_job(self, job: Any) -> None:
        from google.cloud import aiplatform_v1

        errors: list[tuple[str, str]] = []
        path = "hyperparameter_tuning_job"
        if not job.display_name:
            errors.append((f"{path}.display_name", "Required field is not set."))
        if job.max_trial_count < 1:
            errors.append((f"{path}.max_trial_count", "must be positive"))
        if job.parallel_trial_count < 1:
            errors.append((f"{path}.parallel_trial_count", "must be positive"))
        study = job.study_spec
        if len(study.metrics) != 1:
            errors.append((f"{path}.study_spec.metrics", "the stand-in emulates exactly one metric"))
        for i, metric in enumerate(study.metrics):
            if not metric.metric_id or metric.goal == 0:
                errors.append((f"{path}.study_spec.metrics[{i}]", "metric_id and goal are required"))
        if not study.parameters:
            errors.append((f"{path}.study_spec.parameters", "Required field is not set."))
        ids = [p.parameter_id for p in study.parameters]
        if len(set(ids)) != len(ids) or not all(ids):
            errors.append((f"{path}.study_spec.parameters", "parameter_id must be set and unique"))
        for i, param in enumerate(study.parameters):
            where = f"{path}.study_spec.parameters[{i}]"
            kinds = [
                k
                for k in ("double_value_spec", "integer_value_spec", "categorical_value_spec", "discrete_value_spec")
                if k in param
            ]
            if len(kinds) != 1:
                errors.append((where, f"exactly one parameter_value_spec must be set, got {kinds}"))
                continue
            kind = kinds[0]
            value = getattr(param, kind)
            if kind in ("double_value_spec", "integer_value_spec"):
                if value.min_value > value.max_value:
                    errors.append((f"{where}.{kind}", "min_value must not exceed max_value"))
                scale = aiplatform_v1.StudySpec.ParameterSpec.ScaleType(param.scale_type).name
                if scale == "UNIT_LOG_SCALE" and value.min_value <= 0:
                    errors.append((f"{where}.{kind}", "a log scale needs min_value > 0"))
            elif not value.values:
                errors.append((f"{where}.{kind}.values", "Required field is not set."))
        trial_job = aiplatform_v1.CustomJob(display_name=job.display_name or "trial", job_spec=job.trial_job_spec)
        try:
            self._check_custom_job(trial_job)
        except ApiError as err:
            errors.append((f"{path}.trial_job_spec", err.message))
        errors += _check_labels(job.labels, f"{path}.labels")
        _invalid(errors)

    def _create_tuning_job(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        job = _parse_message(aiplatform_v1.HyperparameterTuningJob, body, "HyperparameterTuningJob")
        self._check_tuning_job(job)
        pb = aiplatform_v1.HyperparameterTuningJob.pb(job)
        for name in ("name", "state", "create_time", "start_time", "end_time", "update_time", "error", "trials"):
            pb.ClearField(name)
        with self._lock:
            jid = self._new_id()
            job.name = f"{self.parent}/hyperparameterTuningJobs/{jid}"
            job.state = aiplatform_v1.JobState.JOB_STATE_PENDING
            job.create_time = job.update_time = _now()
            self._studies[jid] = _Study(id=jid, job=job, random=random.Random(int(jid)))
            return 200, _to_json(job, ints), {}

    def _get_tuning_job(self, job_id: str, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        study = self._study(job_id)
        with self._lock:
            return 200, _to_json(study.job, ints), {}

    def _list_tuning_jobs(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            jobs = [study.job for study in self._studies.values()]
        listed = self._listed(jobs, query, {"state": "state"})
        return 200, self._page(listed, query, "hyperparameterTuningJobs", ints), {}

    def _cancel_tuning_job(
        self, job_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        _parse_message(aiplatform_v1.CancelHyperparameterTuningJobRequest, body, "CancelHyperparameterTuningJobRequest")
        study = self._study(job_id)
        with self._lock:
            state = aiplatform_v1.JobState(study.job.state).name
            if state not in ("JOB_STATE_PENDING", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING"):
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Cannot cancel the HyperparameterTuningJob {study.job.name}: it is in state {state}.",
                )
            study.cancel = True
            self._set_study_state(study, "JOB_STATE_CANCELLING")
        return 200, {}, {}

    def _set_study_state(self, study: _Study, state: str, error: tuple[int, str] | None = None) -> None:
        """(Caller holds the lock.)"""
        from google.cloud import aiplatform_v1
        from google.rpc import status_pb2

        now = _now()
        study.job.state = aiplatform_v1.JobState[state]
        study.job.update_time = now
        if state == "JOB_STATE_RUNNING" and "start_time" not in study.job:
            study.job.start_time = now
        if state in TERMINAL_JOB_STATES:
            study.job.end_time = now
            study.done = True
        if error is not None:
            study.job.error = status_pb2.Status(code=error[0], message=error[1][:ERROR_MESSAGE_MAX])

    def _suggest(self, study: _Study) -> dict[str, Any]:
        """A trial's values: random within each range (both algorithms: the stand-in has no Bayesian optimizer)."""
        from google.cloud import aiplatform_v1

        values: dict[str, Any] = {}
        for param in study.job.study_spec.parameters:
            pick = study.random
            log = aiplatform_v1.StudySpec.ParameterSpec.ScaleType(param.scale_type).name == "UNIT_LOG_SCALE"
            if "double_value_spec" in param:
                low, high = param.double_value_spec.min_value, param.double_value_spec.max_value
                values[param.parameter_id] = (
                    math.exp(pick.uniform(math.log(low), math.log(high))) if log else pick.uniform(low, high)
                )
            elif "integer_value_spec" in param:
                low, high = param.integer_value_spec.min_value, param.integer_value_spec.max_value
                values[param.parameter_id] = float(pick.randint(int(low), int(high)))
            elif "discrete_value_spec" in param:
                values[param.parameter_id] = float(pick.choice(list(param.discrete_value_spec.values)))
            else:
                values[param.parameter_id] = pick.choice(list(param.categorical_value_spec.values))
        return values

    def _start_trial(self, study: _Study) -> None:
        """(Caller holds the lock.) A new trial: a custom job of the trial job spec with the trial's values as
        ``--name=value`` arguments and its outputs under ``<base_output_directory>/<trial id>/``."""
        from google.cloud import aiplatform_v1

        trial_id = str(len(study.job.trials) + 1)
        values = self._suggest(study)
        spec = _copy(study.job.trial_job_spec)
        base = spec.base_output_directory.output_uri_prefix
        if base:
            spec.base_output_directory.output_uri_prefix = _join_uri(base, trial_id)
        kinds = {p.parameter_id: ("integer_value_spec" in p) for p in study.job.study_spec.parameters}
        args = [f"--{k}={int(v) if kinds[k] else v}" for k, v in values.items()]
        for pool in spec.worker_pool_specs:
            pool.container_spec.args = [*pool.container_spec.args, *args]
            pool.container_spec.env = [
                *pool.container_spec.env,
                aiplatform_v1.EnvVar(name="CLOUD_ML_TRIAL_ID", value=trial_id),
            ]
        jid = self._new_id()
        job = aiplatform_v1.CustomJob(
            name=f"{self.parent}/customJobs/{jid}",
            display_name=f"{study.job.display_name}-trial-{trial_id}"[:128],
            job_spec=spec,
            state=aiplatform_v1.JobState.JOB_STATE_PENDING,
            create_time=_now(),
            update_time=_now(),
        )
        self._runs[jid] = _Run(id=jid, job=job)
        study.runs[trial_id] = jid
        study.job.trials.append(
            aiplatform_v1.Trial(
                id=trial_id,
                state=aiplatform_v1.Trial.State.ACTIVE,
                parameters=[aiplatform_v1.Trial.Parameter(parameter_id=k, value=v) for k, v in values.items()],
                start_time=_now(),
                custom_job=job.name,
            )
        )

    def _measure(self, study: _Study, trial_id: str) -> tuple[int, float] | None:
        """The trial's last reported (step, value) of the study's metric, from the primary replica's hypertune
        file."""
        metric = study.job.study_spec.metrics[0].metric_id
        path = self.root / "jobs" / study.runs[trial_id] / "workerpool0-0" / "hypertune" / "output.metrics"
        found = None
        with contextlib.suppress(OSError):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(line)
                    found = (int(record.get("global_step") or 0), float(record[metric]))
        return found

    def _advance_study(self, study: _Study) -> None:
        from google.cloud import aiplatform_v1

        with self._lock:
            state = aiplatform_v1.JobState(study.job.state).name
            if state == "JOB_STATE_PENDING":
                if study.cancel:
                    self._set_study_state(study, "JOB_STATE_CANCELLED", (1, "CANCELED"))
                else:
                    self._set_study_state(study, "JOB_STATE_RUNNING")
                return
            active = 0
            for trial in study.job.trials:
                if trial.state != aiplatform_v1.Trial.State.ACTIVE:
                    continue
                run = self._runs[study.runs[trial.id]]
                if not run.done:
                    active += 1
                    if study.cancel and not run.cancel:
                        run.cancel = True
                        self._set_state(run, "JOB_STATE_CANCELLING")
                    continue
                trial.end_time = _now()
                ended = aiplatform_v1.JobState(run.job.state).name
                measured = self._measure(study, trial.id) if ended == "JOB_STATE_SUCCEEDED" else None
                if measured is not None:
                    metric = study.job.study_spec.metrics[0].metric_id
                    trial.final_measurement = aiplatform_v1.Measurement(
                        step_count=measured[0],
                        metrics=[aiplatform_v1.Measurement.Metric(metric_id=metric, value=measured[1])],
                    )
                    trial.state = aiplatform_v1.Trial.State.SUCCEEDED
                else:
                    trial.state = aiplatform_v1.Trial.State.INFEASIBLE
                    trial.infeasible_reason = (
                        run.job.error.message
                        if ended != "JOB_STATE_SUCCEEDED"
                        else "The trial's job succeeded but reported no value of the study's metric."
                    )[:ERROR_MESSAGE_MAX]
            if active:
                study.job.update_time = _now()
            trials = list(study.job.trials)
            failed = [t for t in trials if t.state == aiplatform_v1.Trial.State.INFEASIBLE]
            succeeded = [t for t in trials if t.state == aiplatform_v1.Trial.State.SUCCEEDED]
            limit = study.job.max_failed_trial_count
            if study.cancel:
                if not active:
                    self._set_study_state(study, "JOB_STATE_CANCELLED", (1, "CANCELED"))
                return
            if limit and len(failed) >= limit and not active:
                reason = failed[0].infeasible_reason
                self._set_study_state(
                    study, "JOB_STATE_FAILED", (9, f"{len(failed)} trials failed (limit {limit}). First: {reason}")
                )
                return
            if limit and len(failed) >= limit:
                return  # the running trials end first
            while active < study.job.parallel_trial_count and len(study.job.trials) < study.job.max_trial_count:
                self._start_trial(study)
                active += 1
            if active:
                return
            if succeeded:
                self._set_study_state(study, "JOB_STATE_SUCCEEDED")
            else:
                reason = failed[0].infeasible_reason if failed else "no trial ran"
                self._set_study_state(study, "JOB_STATE_FAILED", (9, f"All trials failed. First: {reason}"))

    def tuning_job_id(self, display_name: str) -> str:
        with self._lock:
            found = [sid for sid, study in self._studies.items() if study.job.display_name == display_name]
        if len(found) != 1:
            raise KeyError(f"no single tuning job {display_name!r} (found {found})")
        return found[0]

    # -- REST: custom jobs ----------------------------------------------------------------------------------------
    def _run(self, job_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(job_id)
        if run is None:
            raise ApiError("NOT_FOUND", f"The CustomJob {self.parent}/customJobs/{job_id} is not found.")
        return run

    def _check_custom_job(self, job: Any) -> None:
        errors: list[tuple[str, str]] = []
        if not job.display_name:
            errors.append(("custom_job.display_name", "Required field is not set."))
        pools = job.job_spec.worker_pool_specs
        if not pools:
            errors.append(("custom_job.job_spec.worker_pool_specs", "Required field is not set."))
        for i, pool in enumerate(pools):
            path = f"custom_job.job_spec.worker_pool_specs[{i}]"
            if i == 0 and pool.replica_count != 1:
                errors.append(
                    (
                        f"{path}.replica_count",
                        "The replica count of the first worker pool (the primary replica) must be 1.",
                    )
                )
            if pool.replica_count < 0:
                errors.append((f"{path}.replica_count", "must not be negative"))
            if pool.replica_count == 0:
                continue
            if not pool.machine_spec.machine_type:
                errors.append((f"{path}.machine_spec.machine_type", "Required field is not set."))
            if "python_package_spec" in pool:
                errors.append((f"{path}.python_package_spec", "not emulated by the stand-in: use container_spec"))
            elif not pool.container_spec.image_uri:
                errors.append((f"{path}.container_spec.image_uri", "Required field is not set."))
            names = [e.name for e in pool.container_spec.env]
            if any(not n for n in names) or len(set(names)) != len(names):
                errors.append((f"{path}.container_spec.env", "environment variable names must be set and unique"))
        base = job.job_spec.base_output_directory.output_uri_prefix
        if base and not base.startswith(("gs://", "file://")):
            errors.append(
                (
                    "custom_job.job_spec.base_output_directory.output_uri_prefix",
                    "must be a Cloud Storage URI (gs://; file:// on the stand-in)",
                )
            )
        errors += _check_labels(job.labels, "custom_job.labels")
        _invalid(errors)

    def _create_custom_job(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        job = _parse_message(aiplatform_v1.CustomJob, body, "CustomJob")
        self._check_custom_job(job)
        pb = aiplatform_v1.CustomJob.pb(job)
        for name in ("name", "state", "create_time", "start_time", "end_time", "update_time", "error"):
            pb.ClearField(name)
        pb.ClearField("web_access_uris")
        with self._lock:
            jid = self._new_id()
            job.name = f"{self.parent}/customJobs/{jid}"
            job.state = aiplatform_v1.JobState.JOB_STATE_PENDING
            job.create_time = job.update_time = _now()
            self._runs[jid] = _Run(id=jid, job=job)
            return 200, _to_json(job, ints), {}

    def _get_custom_job(self, job_id: str, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        run = self._run(job_id)
        with self._lock:
            return 200, _to_json(run.job, ints), {}

    def _list_custom_jobs(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            jobs = [run.job for run in self._runs.values()]
        return 200, self._page(self._listed(jobs, query, {"state": "state"}), query, "customJobs", ints), {}

    def _cancel_custom_job(
        self, job_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        _parse_message(aiplatform_v1.CancelCustomJobRequest, body, "CancelCustomJobRequest")
        run = self._run(job_id)
        with self._lock:
            state = aiplatform_v1.JobState(run.job.state).name
            if state not in ("JOB_STATE_PENDING", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING"):
                raise ApiError(
                    "FAILED_PRECONDITION", f"Cannot cancel the CustomJob {run.job.name}: it is in state {state}."
                )
            run.cancel = True
            self._set_state(run, "JOB_STATE_CANCELLING")
        return 200, {}, {}

    def _delete_custom_job(
        self, job_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        run = self._run(job_id)
        with self._lock:
            state = aiplatform_v1.JobState(run.job.state).name
            if state not in TERMINAL_JOB_STATES:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"The CustomJob {run.job.name} is in state {state}: cancel it "
                    "and wait for it to end before deleting it.",
                )

        def finish() -> None:
            with self._lock:
                self._runs.pop(job_id, None)

        op = self._operation(
            f"{self.parent}/operations/{self._new_id()}", self._metadata(aiplatform_v1.DeleteOperationMetadata), finish
        )
        return 200, self._operation_json(op, ints), {}

    # -- REST: models ---------------------------------------------------------------------------------------------
    def _model(self, model_id: str) -> Any:
        key = model_id.split("@", maxsplit=1)[0]
        with self._lock:
            model = self._models.get(key)
        if model is None:
            raise ApiError("NOT_FOUND", f"The Model {self.parent}/models/{model_id} is not found.")
        return model

    def _upload_model(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        request = _parse_message(aiplatform_v1.UploadModelRequest, body, "UploadModelRequest")
        model = request.model
        errors: list[tuple[str, str]] = []
        if not model.display_name:
            errors.append(("model.display_name", "Required field is not set."))
        if not model.container_spec.image_uri:
            errors.append(
                (
                    "model.container_spec.image_uri",
                    "Required field is not set (the stand-in emulates custom-container models only).",
                )
            )
        if request.parent_model:
            errors.append(("parent_model", "model versions are not emulated by the stand-in"))
        if request.model_id and (
            not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", request.model_id) or request.model_id in self._models
        ):
            errors.append(("model_id", "must be unused, lowercase letters, digits and dashes"))
        errors += _check_labels(model.labels, "model.labels")
        _invalid(errors)
        with self._lock:
            mid = request.model_id or self._new_id()
            name = f"{self.parent}/models/{mid}"
            self._models.setdefault(mid, None)  # reserved until the operation completes

        def finish() -> Any:
            stored = _copy(model)
            pb = aiplatform_v1.Model.pb(stored)
            for key in ("deployed_models", "create_time", "update_time", "version_create_time", "version_update_time"):
                pb.ClearField(key)
            now = _now()
            stored.name = name
            stored.version_id = "1"
            del stored.version_aliases[:]
            stored.version_aliases.append("default")
            stored.create_time = stored.update_time = stored.version_create_time = stored.version_update_time = now
            del stored.supported_deployment_resources_types[:]
            stored.supported_deployment_resources_types.append(
                aiplatform_v1.Model.DeploymentResourcesType.DEDICATED_RESOURCES
            )
            with self._lock:
                self._models[mid] = stored
            return aiplatform_v1.UploadModelResponse(model=name, model_version_id="1")

        op = self._operation(
            f"{name}/operations/{self._new_id()}", self._metadata(aiplatform_v1.UploadModelOperationMetadata), finish
        )
        return 200, self._operation_json(op, ints), {}

    def _get_model(self, model_id: str, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        model = self._model(model_id)
        with self._lock:
            return 200, _to_json(model, ints), {}

    def _list_models(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            models = [m for m in self._models.values() if m is not None]
        return 200, self._page(self._listed(models, query, {}), query, "models", ints), {}

    def _delete_model(self, model_id: str, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        model = self._model(model_id)
        self._refuse_deployed(model)

        def finish() -> None:
            self._refuse_deployed(model)
            with self._lock:
                self._models.pop(model.name.rsplit("/", 1)[-1], None)

        op = self._operation(
            f"{self.parent}/operations/{self._new_id()}", self._metadata(aiplatform_v1.DeleteOperationMetadata), finish
        )
        return 200, self._operation_json(op, ints), {}

    def _refuse_deployed(self, model: Any) -> None:
        with self._lock:
            places = [f"{r.endpoint} (deployed model {r.deployed_model_id})" for r in model.deployed_models]
            places += [
                f"{self.parent}/endpoints/{c.endpoint_id} (being deployed)"
                for c in self._changes
                if c.kind == "deploy" and c.deployed.model.split("@")[0] == model.name
            ]
        if places:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"The Model {model.name} is deployed or being deployed at the "
                f"following Endpoint(s): {', '.join(places)}. Undeploy it first.",
            )

    # -- REST: endpoints ------------------------------------------------------------------------------------------
    def _endpoint_state(self, endpoint_id: str) -> _EndpointState:
        with self._lock:
            state = self._endpoints.get(endpoint_id)
        if state is None:
            raise ApiError("NOT_FOUND", f"The Endpoint {self.parent}/endpoints/{endpoint_id} is not found.")
        return state

    def _create_endpoint(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        endpoint = _parse_message(aiplatform_v1.Endpoint, body, "Endpoint")
        errors: list[tuple[str, str]] = []
        if not endpoint.display_name:
            errors.append(("endpoint.display_name", "Required field is not set."))
        if endpoint.deployed_models or endpoint.traffic_split:
            errors.append(("endpoint.deployed_models", "models are deployed with DeployModel, not on creation"))
        errors += _check_labels(endpoint.labels, "endpoint.labels")
        logging = endpoint.predict_request_response_logging_config
        if logging.enabled:
            if not logging.bigquery_destination.output_uri.startswith("bq://"):
                errors.append(
                    (
                        "endpoint.predict_request_response_logging_config.bigquery_destination.output_uri",
                        "must be a BigQuery URI (bq://project[.dataset[.table]])",
                    )
                )
            if not 0 < logging.sampling_rate <= 1:
                errors.append(("endpoint.predict_request_response_logging_config.sampling_rate", "must be in (0, 1]"))
        wanted = self._param(query, "endpointId")
        if wanted and (not wanted.isdigit() or wanted in self._endpoints):
            errors.append(("endpoint_id", "must be an unused number"))
        _invalid(errors)
        with self._lock:
            eid = wanted or self._new_id()
            name = f"{self.parent}/endpoints/{eid}"

        def finish() -> Any:
            stored = _copy(endpoint)
            now = _now()
            stored.name = name
            stored.create_time = stored.update_time = now
            with self._lock:
                self._endpoints[eid] = _EndpointState(stored)
                return _copy(stored)

        op = self._operation(
            f"{name}/operations/{self._new_id()}", self._metadata(aiplatform_v1.CreateEndpointOperationMetadata), finish
        )
        return 200, self._operation_json(op, ints), {}

    def _get_endpoint(
        self, endpoint_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        state = self._endpoint_state(endpoint_id)
        with self._lock:
            return 200, _to_json(state.endpoint, ints), {}

    def _list_endpoints(self, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            endpoints = [s.endpoint for s in self._endpoints.values()]
        return 200, self._page(self._listed(endpoints, query, {}), query, "endpoints", ints), {}

    def _check_split(self, split: Mapping[str, int], deployed: set[str], path: str) -> None:
        """Vertex's rule: integer percents for deployed models ("0": the one being deployed), summing to 100."""
        errors: list[tuple[str, str]] = []
        unknown = sorted(set(split) - deployed)
        if unknown:
            errors.append((path, f"{unknown} are not deployed models of the Endpoint (it has {sorted(deployed)})"))
        if any(v < 0 or v > 100 for v in split.values()):
            errors.append((path, "traffic percentages must be between 0 and 100"))
        if split and sum(split.values()) != 100:
            errors.append((path, f"The sum of all traffic_split values must be 100, not {sum(split.values())}."))
        _invalid(errors)

    def _update_endpoint(
        self, endpoint_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        update = _parse_message(aiplatform_v1.Endpoint, body, "Endpoint")
        state = self._endpoint_state(endpoint_id)
        paths = [_snake(p.strip()) for p in self._param(query, "updateMask").split(",") if p.strip()]
        if not paths:
            raise ApiError("INVALID_ARGUMENT", "update_mask is required (e.g. traffic_split).")
        unsupported = sorted(set(paths) - {"traffic_split", "display_name", "description", "labels"})
        if unsupported:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"update_mask paths {unsupported} are not updatable here (the "
                "stand-in updates traffic_split, display_name, description, labels).",
            )
        errors: list[tuple[str, str]] = []
        if "display_name" in paths and not update.display_name:
            errors.append(("endpoint.display_name", "Required field is not set."))
        if "labels" in paths:
            errors += _check_labels(update.labels, "endpoint.labels")
        _invalid(errors)
        with self._lock:
            endpoint = state.endpoint
            if "traffic_split" in paths:
                split = dict(update.traffic_split)
                deployed = {d.id for d in endpoint.deployed_models}
                self._check_split(split, deployed, "endpoint.traffic_split")
                if deployed and not split:
                    _invalid([("endpoint.traffic_split", "The sum of all traffic_split values must be 100, not 0.")])
                endpoint.traffic_split.clear()
                endpoint.traffic_split.update(split)
            if "display_name" in paths:
                endpoint.display_name = update.display_name
            if "description" in paths:
                endpoint.description = update.description
            if "labels" in paths:
                endpoint.labels.clear()
                endpoint.labels.update(dict(update.labels))
            endpoint.update_time = _now()
            return 200, _to_json(endpoint, ints), {}

    def _claim(self, state: _EndpointState, op: _Operation) -> None:
        """(Caller holds the lock.) One mutating operation at a time per endpoint."""
        if state.busy is not None and not state.busy.done:
            raise ApiError(
                "FAILED_PRECONDITION",
                f"The Endpoint {state.endpoint.name} has an operation in progress "
                f"({state.busy.name}); wait for it to finish.",
            )
        state.busy = op

    def _delete_endpoint(
        self, endpoint_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        state = self._endpoint_state(endpoint_id)
        with self._lock:
            if state.endpoint.deployed_models:
                ids = [d.id for d in state.endpoint.deployed_models]
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"The Endpoint {state.endpoint.name} has deployed models {ids}; undeploy them before deleting it.",
                )
            if state.busy is not None and not state.busy.done:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"The Endpoint {state.endpoint.name} has an operation in progress ({state.busy.name}).",
                )

        def finish() -> None:
            with self._lock:
                self._endpoints.pop(endpoint_id, None)

        op = self._operation(
            f"{self.parent}/operations/{self._new_id()}", self._metadata(aiplatform_v1.DeleteOperationMetadata), finish
        )
        return 200, self._operation_json(op, ints), {}

    def _check_deployed_model(self, deployed: Any) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        path = "deployed_model"
        if not deployed.model:
            errors.append((f"{path}.model", "Required field is not set."))
        if "automatic_resources" in deployed:
            errors.append((f"{path}.automatic_resources", "custom-container models need dedicated_resources"))
        resources = deployed.dedicated_resources
        if "dedicated_resources" not in deployed:
            errors.append((f"{path}.dedicated_resources", "Required field is not set."))
        else:
            if not resources.machine_spec.machine_type:
                errors.append((f"{path}.dedicated_resources.machine_spec.machine_type", "Required field is not set."))
            if resources.min_replica_count < 1:
                errors.append((f"{path}.dedicated_resources.min_replica_count", "must be at least 1"))
            if resources.max_replica_count and resources.max_replica_count < resources.min_replica_count:
                errors.append((f"{path}.dedicated_resources.max_replica_count", "must not be below min_replica_count"))
            for i, spec in enumerate(resources.autoscaling_metric_specs):
                if spec.metric_name not in AUTOSCALING_METRICS:
                    errors.append(
                        (
                            f"{path}.dedicated_resources.autoscaling_metric_specs[{i}].metric_name",
                            f"{spec.metric_name!r} is not one of {sorted(AUTOSCALING_METRICS)}",
                        )
                    )
                if spec.target < 0:
                    errors.append(
                        (f"{path}.dedicated_resources.autoscaling_metric_specs[{i}].target", "must not be negative")
                    )
        if deployed.id and not deployed.id.isdigit():
            errors.append((f"{path}.id", "must be a number"))
        return errors

    def _deploy_model(
        self, endpoint_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        request = _parse_message(aiplatform_v1.DeployModelRequest, body, "DeployModelRequest")
        state = self._endpoint_state(endpoint_id)
        deployed = _copy(request.deployed_model)
        _invalid(self._check_deployed_model(deployed))
        model_id = deployed.model.split("@")[0].rsplit("/", 1)[-1]
        if not deployed.model.split("@")[0].startswith(f"{self.parent}/models/"):
            _invalid([("deployed_model.model", f"must be a model resource name {self.parent}/models/<id>")])
        model = self._model(model_id)
        split = dict(request.traffic_split)
        with self._lock:
            current = {d.id for d in state.endpoint.deployed_models}
            self._check_split(split, current | {"0"}, "traffic_split")
            if deployed.id and (
                deployed.id in current or any(c.deployed_model_id == deployed.id for c in self._changes)
            ):
                _invalid([("deployed_model.id", f"{deployed.id} is in use on the Endpoint")])
            dmid = deployed.id or self._new_id()
            op = _Operation(
                f"{state.endpoint.name}/operations/{self._new_id()}",
                self._metadata(aiplatform_v1.DeployModelOperationMetadata),
            )
            self._claim(state, op)
            self._operations[op.name] = op
            deployed.id = dmid
            deployed.model = model.name
            deployed.model_version_id = "1"
            if not deployed.display_name:
                deployed.display_name = model.display_name
            container = model.container_spec
            health = container.health_route or f"/v1/endpoints/{endpoint_id}/deployedModels/{dmid}"
            predict = container.predict_route or f"/v1/endpoints/{endpoint_id}/deployedModels/{dmid}:predict"
            port = free_port()
            env = {
                **self.container_env,
                **{e.name: e.value for e in container.env},
                "AIP_HTTP_PORT": str(port),
                "AIP_HEALTH_ROUTE": health,
                "AIP_PREDICT_ROUTE": predict,
                "AIP_DEPLOYED_MODEL_ID": dmid,
                "AIP_ENDPOINT_ID": endpoint_id,
                "AIP_MODEL_NAME": model_id,
                "AIP_MODE": "PREDICTION",
                "AIP_MODE_VERSION": "1.0.0",
                "AIP_FRAMEWORK": "CUSTOM_CONTAINER",
                "AIP_MACHINE_TYPE": deployed.dedicated_resources.machine_spec.machine_type,
                "AIP_PROJECT_NUMBER": self.project,
                "LLMOPS_SERVE_HOST": "127.0.0.1",
                "LLMOPS_WORK_DIR": str(self.root / "serving" / endpoint_id / dmid),
            }
            if model.artifact_uri:
                env["AIP_STORAGE_URI"] = model.artifact_uri
            server = _Server(
                endpoint_id=endpoint_id,
                deployed_model_id=dmid,
                model=model.name,
                folder=self.root / "serving" / endpoint_id / dmid,
                port=port,
                health_route=health,
                predict_route=predict,
                env=env,
                args=list(container.args),
            )
            self._changes.append(_Change("deploy", op, endpoint_id, deployed, dmid, split, server))
        return 200, self._operation_json(op, ints), {}

    def _undeploy_model(
        self, endpoint_id: str, *, query: Any, body: bytes, ints: bool
    ) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        request = _parse_message(aiplatform_v1.UndeployModelRequest, body, "UndeployModelRequest")
        state = self._endpoint_state(endpoint_id)
        dmid = request.deployed_model_id
        split = dict(request.traffic_split)
        with self._lock:
            endpoint = state.endpoint
            current = {d.id for d in endpoint.deployed_models}
            if dmid not in current:
                raise ApiError("NOT_FOUND", f"The DeployedModel {dmid} is not deployed on {endpoint.name}.")
            remaining = current - {dmid}
            if split:
                if split.get(dmid, 0):
                    _invalid([("traffic_split", f"the DeployedModel {dmid} being undeployed must get no traffic")])
                split.pop(dmid, None)
                self._check_split(split, remaining, "traffic_split")
            elif remaining and endpoint.traffic_split.get(dmid, 0):
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"The DeployedModel {dmid} has {endpoint.traffic_split[dmid]}% of the Endpoint's traffic: give "
                    "its traffic to other models first, or pass a traffic_split that does.",
                )
            op = _Operation(
                f"{endpoint.name}/operations/{self._new_id()}",
                self._metadata(aiplatform_v1.UndeployModelOperationMetadata),
            )
            self._claim(state, op)
            self._operations[op.name] = op
            self._changes.append(_Change("undeploy", op, endpoint_id, None, dmid, split))
        return 200, self._operation_json(op, ints), {}

    # -- REST: prediction -----------------------------------------------------------------------------------------
    def _predict(self, endpoint_id: str, *, query: Any, body: bytes, ints: bool) -> tuple[int, Any, dict[str, str]]:
        from google.cloud import aiplatform_v1

        started = time.time()
        _parse_message(aiplatform_v1.PredictRequest, body, "PredictRequest")
        request = json.loads(body or b"{}")
        state = self._endpoint_state(endpoint_id)
        with self._lock:
            endpoint = state.endpoint
            split = {k: v for k, v in endpoint.traffic_split.items() if v > 0 and k in state.servers}
            if not split:
                raise ApiError(
                    "FAILED_PRECONDITION", f"The Endpoint {endpoint.name} has no deployed model with traffic."
                )
            ids = sorted(split)
            dmid = ids[0] if len(ids) == 1 else self._random.choices(ids, weights=[split[i] for i in ids], k=1)[0]
            server = state.servers[dmid]
            deployed = next(d for d in endpoint.deployed_models if d.id == dmid)
            fault = self._faults.get((endpoint_id, dmid))
        payload = {"instances": request.get("instances", [])}
        if "parameters" in request:
            payload["parameters"] = request["parameters"]
        status, data, model_ms = self._forward(server, payload, fault)
        headers = {"X-Vertex-AI-Endpoint-Id": endpoint_id, "X-Vertex-AI-Deployed-Model-Id": dmid}
        answer: Any = None
        if 200 <= status < 300:
            try:
                answer = json.loads(data)
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):
                status, data = (
                    500,
                    (
                        "The model server's answer is not a JSON object with a 'predictions' list: "
                        + data[:300].decode("utf-8", errors="replace")
                    ).encode(),
                )
        with self._lock:
            self._predictions.append(_Prediction(endpoint_id, dmid, status, started, time.time(), model_ms))
        if not 200 <= status < 300:
            error = ApiError(
                _STATUS_OF_HTTP.get(status, "UNKNOWN" if status >= 500 else "FAILED_PRECONDITION"),
                data.decode("utf-8", errors="replace"),
            )
            payload_out = {"error": {"code": status, "message": error.message, "status": error.status}}
            return status, payload_out, headers
        assert isinstance(answer, dict)
        logging = endpoint.predict_request_response_logging_config
        if logging.enabled and self._random.random() < logging.sampling_rate:
            self._log_request(endpoint, dmid, payload["instances"], answer["predictions"], started)
        result = {
            "predictions": answer["predictions"],
            "deployedModelId": dmid,
            "model": deployed.model,
            "modelDisplayName": deployed.display_name,
            "modelVersionId": deployed.model_version_id or "1",
        }
        return 200, result, headers

    def _log_request(
        self, endpoint: Any, dmid: str, instances: Sequence[Any], predictions: Sequence[Any], started: float
    ) -> None:
        """One row of the endpoint's request-response logging table: ``endpoint``, ``deployed_model_id``,
        ``logging_time``, ``request_id``, ``request_payload`` / ``response_payload`` (one JSON string per instance
        and per prediction)."""
        with self._lock:
            self._logged.append(
                {
                    "endpoint": endpoint.name,
                    "deployed_model_id": dmid,
                    "logging_time": started,
                    "request_id": str(self._random.getrandbits(62)),
                    "request_payload": [json.dumps(i) for i in instances],
                    "response_payload": [json.dumps(p) for p in predictions],
                }
            )

    def export_request_response_log(self, endpoint: str, folder: Path) -> Path:
        """The endpoint's request-response logging table exported as BigQuery exports a table to Cloud Storage
        as JSON (newline-delimited, ``TIMESTAMP`` as ``YYYY-MM-DD HH:MM:SS.ffffff UTC``): one file in ``folder``."""
        name = f"{self.parent}/endpoints/{self.endpoint_id(endpoint)}"
        with self._lock:
            rows = [dict(row) for row in self._logged if row["endpoint"] == name]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "000000000000.json"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                stamp = datetime.fromtimestamp(row["logging_time"], tz=timezone.utc)
                row["logging_time"] = stamp.strftime("%Y-%m-%d %H:%M:%S.%f UTC")
                handle.write(json.dumps(row) + "\n")
        return path

    def _forward(self, server: _Server, payload: Mapping[str, Any], fault: _Fault | None) -> tuple[int, bytes, float]:
        """POST to the server's predict route: (status, body, model latency in ms)."""
        started = time.perf_counter()
        if fault is not None:
            return fault.status, fault.body.encode("utf-8"), (time.perf_counter() - started) * 1000.0
        request = urllib.request.Request(
            f"{server.url}{server.predict_route}",
            data=json.dumps(payload).encode("utf-8"),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, data = answer.status, answer.read()
        except urllib.error.HTTPError as err:
            status, data = err.code, err.read()
        except (urllib.error.URLError, OSError) as err:
            status, data = 503, json.dumps({"error": f"the model server could not be reached: {err}"}).encode()
        return status, data, (time.perf_counter() - started) * 1000.0

    # -- Cloud Monitoring -----------------------------------------------------------------------------------------
    def _on_list_time_series(self, request: Any, context: Any) -> Any:
        import grpc

        try:
            return self._list_time_series(request)
        except ApiError as err:
            context.abort(getattr(grpc.StatusCode, err.status), err.message)
        except Exception:
            self.errors.append(f"ListTimeSeries: {traceback.format_exc()}")
            context.abort(grpc.StatusCode.INTERNAL, "the stand-in failed; see VertexStandIn.errors")
        raise AssertionError("unreachable")  # context.abort raises

    def _list_time_series(self, request: Any) -> Any:
        from google.cloud import monitoring_v3

        if request.name not in (f"projects/{self.project}",):
            raise ApiError(
                "PERMISSION_DENIED",
                f"Permission denied on {request.name!r} (the stand-in emulates projects/{self.project} only).",
            )
        terms = _parse_filter(
            request.filter,
            lambda k: (
                k in ("metric.type", "resource.type")
                or k.startswith(("metric.label.", "metric.labels.", "resource.label.", "resource.labels."))
            ),
            "Monitoring",
        )
        types = [v for k, op, v in terms if k == "metric.type" and op == "="]
        if len(types) != 1:
            raise ApiError("INVALID_ARGUMENT", 'The filter must name exactly one metric type: metric.type = "...".')
        metric_type = types[0]
        if metric_type not in METRIC_TYPES:
            raise ApiError("NOT_FOUND", f'Cannot find metric(s) that match type = "{metric_type}".')
        if not request.interval.HasField("end_time"):
            raise ApiError("INVALID_ARGUMENT", "Field interval.endTime is required.")
        end = request.interval.end_time.ToNanoseconds() / 1e9
        start = request.interval.start_time.ToNanoseconds() / 1e9 if request.interval.HasField("start_time") else end
        if start > end:
            raise ApiError("INVALID_ARGUMENT", "interval.startTime must not be later than interval.endTime.")
        series = []
        for (metric_labels, resource_labels), points in self._raw_series(metric_type).items():
            labels = {"metric.type": metric_type, "resource.type": ENDPOINT_RESOURCE}
            labels.update({f"metric.label.{k}": v for k, v in metric_labels})
            labels.update({f"resource.label.{k}": v for k, v in resource_labels})
            if not _matches(terms, lambda key, labels=labels: labels.get(key.replace(".labels.", ".label."))):
                continue
            kept = [p for p in points if start < p[1] <= end or start == end == p[1]]
            if kept:
                series.append((labels, kept))
        if request.secondary_aggregation.per_series_aligner or request.secondary_aggregation.cross_series_reducer:
            raise ApiError("INVALID_ARGUMENT", "secondary_aggregation is not emulated by the stand-in.")
        value_type = "DISTRIBUTION" if metric_type == PREDICTION_LATENCIES else "INT64"
        out = _aggregate(series, value_type, request.aggregation, start, end)
        unit = "ms" if metric_type == PREDICTION_LATENCIES else "1"
        headers_only = request.view == monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.HEADERS
        out.sort(key=lambda s: sorted(s[0].items()))
        try:
            size = request.page_size or 100_000
            first = int(request.page_token or 0)
        except ValueError:
            raise ApiError("INVALID_ARGUMENT", "Invalid page_token.") from None
        response = monitoring_v3.ListTimeSeriesResponse.pb()()
        for labels, kind, vtype, points in out[first : first + size]:
            response.time_series.append(_time_series(labels, kind, vtype, unit, [] if headers_only else points))
        if first + size < len(out):
            response.next_page_token = str(first + size)
        return response

    def _raw_series(self, metric_type: str) -> dict[Any, list[tuple[float, float, Any]]]:
        """The metric's points by (metric labels, resource labels): (start, end, value: int or list of ms)."""
        found: dict[Any, list[tuple[float, float, Any]]] = {}
        with self._lock:
            predictions = list(self._predictions)
        for p in predictions:
            resource = (
                ("endpoint_id", p.endpoint_id),
                ("location", self.location),
                ("resource_container", self.project),
            )
            entries: list[tuple[dict[str, str], Any]] = []
            if metric_type in (PREDICTION_COUNT, RESPONSE_COUNT):
                entries.append(({"deployed_model_id": p.deployed_model_id, "response_code": str(p.code)}, 1))
            elif metric_type == ERROR_COUNT and not 200 <= p.code < 300:
                entries.append(({"deployed_model_id": p.deployed_model_id}, 1))
            elif metric_type == PREDICTION_LATENCIES:
                overhead = max(0.0, p.total_ms - p.model_ms)
                for latency_type, value in (("model", p.model_ms), ("overhead", overhead), ("total", p.total_ms)):
                    entries.append(({"deployed_model_id": p.deployed_model_id, "latency_type": latency_type}, [value]))
            for metric_labels, value in entries:
                key = (tuple(sorted(metric_labels.items())), resource)
                found.setdefault(key, []).append((p.start, p.end, value))
        return found


# -- Cloud Monitoring: aggregation ----------------------------------------------------------------------------------

_SUM_ALIGNERS = ("ALIGN_SUM", "ALIGN_DELTA")
_GAUGE_ALIGNERS = (
    "ALIGN_RATE",
    "ALIGN_MEAN",
    "ALIGN_MIN",
    "ALIGN_MAX",
    "ALIGN_PERCENTILE_05",
    "ALIGN_PERCENTILE_50",
    "ALIGN_PERCENTILE_95",
    "ALIGN_PERCENTILE_99",
)
_REDUCERS = ("REDUCE_NONE", "REDUCE_SUM", "REDUCE_MEAN", "REDUCE_MIN", "REDUCE_MAX", "REDUCE_COUNT")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def _align_values(aligner: str, value_type: str, values: list[Any], period: float) -> tuple[Any, str]:
    """One aligned value from a window's point values: (value, value type)."""
    flat: list[float] = [v for vs in values for v in vs] if value_type == "DISTRIBUTION" else [float(v) for v in values]
    if aligner in _SUM_ALIGNERS:
        if value_type == "DISTRIBUTION":
            return flat, "DISTRIBUTION"
        return int(sum(values)), "INT64"
    if aligner == "ALIGN_COUNT":
        return len(values), "INT64"
    if aligner == "ALIGN_RATE":
        if value_type == "DISTRIBUTION":
            raise ApiError("INVALID_ARGUMENT", "ALIGN_RATE does not apply to a DISTRIBUTION metric.")
        return sum(values) / period, "DOUBLE"
    if aligner == "ALIGN_MEAN":
        return sum(flat) / len(flat), "DOUBLE"
    if aligner in ("ALIGN_MIN", "ALIGN_MAX"):
        if value_type == "DISTRIBUTION":
            raise ApiError("INVALID_ARGUMENT", f"{aligner} does not apply to a DISTRIBUTION metric.")
        return int((min if aligner == "ALIGN_MIN" else max)(values)), "INT64"
    return _percentile(flat, float(aligner.rsplit("_", 1)[1])), "DOUBLE"


def _reduce_values(reducer: str, value_type: str, values: list[Any]) -> tuple[Any, str]:
    if reducer == "REDUCE_COUNT":
        return len(values), "INT64"
    if value_type == "DISTRIBUTION":
        if reducer != "REDUCE_SUM":
            raise ApiError("INVALID_ARGUMENT", f"{reducer} does not apply to DISTRIBUTION values (REDUCE_SUM does).")
        return [v for vs in values for v in vs], "DISTRIBUTION"
    if reducer == "REDUCE_SUM":
        return sum(values), value_type
    if reducer == "REDUCE_MEAN":
        return sum(values) / len(values), "DOUBLE"
    return (min if reducer == "REDUCE_MIN" else max)(values), value_type


def _aggregate(
    series: list[tuple[dict[str, str], list[tuple[float, float, Any]]]],
    value_type: str,
    aggregation: Any,
    start: float,
    end: float,
) -> list[tuple[dict[str, str], str, str, list[tuple[float, float, Any]]]]:
    """Series as (labels, metric kind, value type, points newest first) after the request's aggregation."""
    from google.cloud import monitoring_v3

    enum = monitoring_v3.Aggregation
    aligner = enum.Aligner(aggregation.per_series_aligner).name
    reducer = enum.Reducer(aggregation.cross_series_reducer).name
    if aligner == "ALIGN_NONE":
        if reducer != "REDUCE_NONE":
            raise ApiError(
                "INVALID_ARGUMENT",
                "A cross_series_reducer needs a per_series_aligner (not ALIGN_NONE) and an alignment_period.",
            )
        return [(labels, "DELTA", value_type, sorted(points, key=lambda p: -p[1])) for labels, points in series]
    if aligner not in (*_SUM_ALIGNERS, "ALIGN_COUNT", *_GAUGE_ALIGNERS):
        raise ApiError("INVALID_ARGUMENT", f"The stand-in does not emulate {aligner}.")
    if reducer not in _REDUCERS:
        raise ApiError("INVALID_ARGUMENT", f"The stand-in does not emulate {reducer}.")
    period = aggregation.alignment_period.ToNanoseconds() / 1e9
    if period < MIN_ALIGNMENT_SECONDS:
        raise ApiError(
            "INVALID_ARGUMENT", f"alignment_period must be at least {MIN_ALIGNMENT_SECONDS} seconds (got {period:g}s)."
        )
    kind = "DELTA" if aligner in (*_SUM_ALIGNERS, "ALIGN_COUNT") else "GAUGE"
    aligned: list[tuple[dict[str, str], str, dict[int, Any]]] = []
    for labels, points in series:
        windows: dict[int, list[Any]] = {}
        for _, point_end, value in points:
            windows.setdefault(math.floor((end - point_end) / period), []).append(value)
        values: dict[int, Any] = {}
        vtype = value_type
        for k, vs in windows.items():
            values[k], vtype = _align_values(aligner, value_type, vs, period)
        aligned.append((labels, vtype, values))
    if reducer != "REDUCE_NONE":
        fields = [f.replace(".labels.", ".label.") for f in aggregation.group_by_fields]
        groups: dict[tuple[str | None, ...], list[tuple[dict[str, str], str, dict[int, Any]]]] = {}
        for item in aligned:
            groups.setdefault(tuple(item[0].get(f) for f in fields), []).append(item)
        reduced: list[tuple[dict[str, str], str, dict[int, Any]]] = []
        for key, members in groups.items():
            labels = {"metric.type": members[0][0]["metric.type"], "resource.type": members[0][0]["resource.type"]}
            labels.update({f: v for f, v in zip(fields, key, strict=True) if v is not None})
            vtype = members[0][1]
            values = {}
            for k in sorted({k for _, _, vs in members for k in vs}):
                values[k], out_type = _reduce_values(reducer, vtype, [vs[k] for _, _, vs in members if k in vs])
            reduced.append((labels, out_type if values else vtype, values))
        aligned = reduced
    out = []
    for labels, vtype, values in aligned:
        points = []
        for k in sorted(values):
            window_end = end - k * period
            window_start = window_end - period if kind == "DELTA" else window_end
            points.append((max(window_start, start) if kind == "DELTA" else window_start, window_end, values[k]))
        out.append((labels, kind, vtype, points))
    return out


def _distribution(values: list[float]) -> Any:
    from google.api import distribution_pb2

    scale, growth, count = LATENCY_BUCKETS
    buckets = [0] * (int(count) + 2)
    for v in values:
        index = 0 if v < scale else min(math.floor(math.log(v / scale, growth)) + 1, int(count) + 1)
        buckets[index] += 1
    mean = sum(values) / len(values) if values else 0.0
    return distribution_pb2.Distribution(
        count=len(values),
        mean=mean,
        sum_of_squared_deviation=sum((v - mean) ** 2 for v in values),
        range=distribution_pb2.Distribution.Range(min=min(values, default=0.0), max=max(values, default=0.0)),
        bucket_options=distribution_pb2.Distribution.BucketOptions(
            exponential_buckets=distribution_pb2.Distribution.BucketOptions.Exponential(
                num_finite_buckets=int(count), growth_factor=growth, scale=scale
            )
        ),
        bucket_counts=buckets,
    )


def _timestamp(seconds: float) -> Any:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _time_series(
    labels: Mapping[str, str], kind: str, value_type: str, unit: str, points: list[tuple[float, float, Any]]
) -> Any:
    from google.api import metric_pb2, monitored_resource_pb2
    from google.cloud import monitoring_v3

    series = monitoring_v3.TimeSeries.pb()(
        metric=metric_pb2.Metric(
            type=labels["metric.type"],
            labels={k[len("metric.label.") :]: v for k, v in labels.items() if k.startswith("metric.label.")},
        ),
        resource=monitored_resource_pb2.MonitoredResource(
            type=labels["resource.type"],
            labels={k[len("resource.label.") :]: v for k, v in labels.items() if k.startswith("resource.label.")},
        ),
        metric_kind=metric_pb2.MetricDescriptor.MetricKind.Value(kind),
        value_type=metric_pb2.MetricDescriptor.ValueType.Value(value_type),
        unit=unit,
    )
    for start, end, value in points:
        point = series.points.add()
        point.interval.end_time.CopyFrom(_timestamp(end))
        if kind == "DELTA":
            point.interval.start_time.CopyFrom(_timestamp(start))
        if value_type == "DISTRIBUTION":
            point.value.distribution_value.CopyFrom(_distribution(value))
        elif value_type == "DOUBLE":
            point.value.double_value = float(value)
        else:
            point.value.int64_value = int(value)
    return series


# -- HTTP -----------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client library's session expects
    standin: VertexStandIn

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self, verb: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""  # always read it, or the next request on the
        split = urllib.parse.urlsplit(self.path)  # connection starts inside this one's body
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        self.standin.calls.append(f"{verb} {urllib.parse.unquote(self.path)}")
        headers: dict[str, str] = {}
        try:
            status, payload, headers = self.standin._dispatch(verb, urllib.parse.unquote(split.path), query, body)
        except ApiError as err:
            status, payload = err.http, err.payload()
        except Exception:
            self.standin.errors.append(f"{verb} {self.path}: {traceback.format_exc()}")
            error = ApiError("INTERNAL", "the stand-in failed; see VertexStandIn.errors")
            status, payload = error.http, error.payload()
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")


@contextlib.contextmanager
def vertex_standin(root: Path | None = None, **kwargs: Any) -> Iterator[VertexStandIn]:
    """``with vertex_standin(tmp) as vertex:`` — started, and stopped afterwards."""
    with VertexStandIn(root, **kwargs) as standin:
        yield standin


__all__ = [
    "ENDPOINT_RESOURCE",
    "ERROR_COUNT",
    "LOCATION",
    "PREDICTION_COUNT",
    "PREDICTION_LATENCIES",
    "PROJECT",
    "RESPONSE_COUNT",
    "ApiError",
    "VertexStandIn",
    "vertex_standin",
]
