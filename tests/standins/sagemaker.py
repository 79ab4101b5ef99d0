"""A SageMaker stand-in for tests: moto's server in this process, with training jobs and endpoints that really run.

moto stores SageMaker resources but finishes everything at once and serves canned answers. :class:`SageMakerStandIn`
starts moto's ``ThreadedMotoServer`` on loopback and patches moto's SageMaker response handlers (in this process:
moto's URL table is bound to the original classes, so the patches go on them, undone by :meth:`SageMakerStandIn.stop`)
so that:

* a training job runs its container command once per instance in a ``/opt/ml``-like folder of its own, with
  SageMaker's statuses moving as the processes do (InProgress: Starting, Downloading, Training, Uploading; then
  Completed, Failed, Stopped), its logs in CloudWatch Logs, its checkpoints synced to S3, spot interruptions; when
  it ends, FinalMetricDataList holds, for each of its AlgorithmSpecification.MetricDefinitions, the first group of
  the regex's last match in its CloudWatch log lines;
* a hyperparameter tuning job (Random or Bayesian strategy) launches its trials as real training jobs like the
  above, at most ``MaxParallelTrainingJobs`` at a time, until ``MaxNumberOfTrainingJobs`` have run: SageMaker's
  names (``<tuning job>-<NNN>-<8 hex>``), TrainingJobDefinition's fields, StaticHyperParameters plus one value per
  ParameterRange as a string. Both strategies sample at random here (uniformly on the range's scale; Auto is taken
  as Linear), seeded by the stand-in's ``seed`` (or the request's RandomSeed): no Bayesian model. A trial's objective
  is its FinalMetricDataList value for the objective metric; a Failed trial, or one without that metric, has a
  Failed objective. DescribeHyperParameterTuningJob shows InProgress, then Completed, Failed (no trial had an
  objective value) or Stopping/Stopped (StopHyperParameterTuningJob, not in moto, stops the running trials as
  StopTrainingJob does), the status and objective counters (a failed trial counts as NonRetryableError: none is
  retried) and BestTrainingJob; ListTrainingJobsForHyperParameterTuningJob (not in moto) lists the trials. A trial's
  CheckpointConfig.S3Uri gets the trial's name appended (no trial resumes from another's checkpoints).
  TrainingJobEarlyStoppingType is stored (default Off) but nothing is stopped early; ResourceLimits'
  MaxRuntimeInSeconds is stored, not enforced. Not emulated (rejected): the Hyperband and Grid strategies,
  TrainingJobDefinitions, WarmStartConfig, Autotune, TuningJobCompletionCriteria;
* an endpoint starts one real model server per variant (the serving command) and InvokeEndpoint forwards to them by
  the variants' weights, puts SageMaker's CloudWatch metrics and writes Data Capture files to S3; UpdateEndpoint
  (not in moto) runs SageMaker's blue/green deployment with its guardrails (canary, linear, all at once, baking,
  auto-rollback on CloudWatch alarms); UpdateEndpointWeightsAndCapacities moves the weights.

Statuses move on a background clock (:meth:`SageMakerStandIn.advance`, every ``tick`` seconds) in real time.
One stand-in is active in a process at a time (the patches are process-wide).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow_llmops.processes import child_env, free_port

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
ENDPOINT_LOG_GROUP = "/aws/sagemaker/Endpoints/{endpoint}"
METRICS_NAMESPACE = "AWS/SageMaker"
DEFAULT_TRAINING_COMMAND = (sys.executable, "-m", "airflow_llmops.ml.runtime", "train")
DEFAULT_SERVING_COMMAND = (sys.executable, "-m", "airflow_llmops.ml.runtime", "serve")
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
FAILURE_REASON_MAX = 1024  # DescribeTrainingJob's FailureReason is at most 1024 characters
TERMINAL_TRAINING = frozenset({"Completed", "Failed", "Stopped"})
SERVING_STATUSES = frozenset({"InService", "Updating", "RollingBack", "SystemUpdating"})
CHECKPOINT_QUIET_SECONDS = 0.5  # a checkpoint file unchanged this long is taken as written
TRAINING_REQUEST_KEYS = (  # the CreateTrainingJob parameters the harness uses
    "AlgorithmSpecification",
    "HyperParameters",
    "InputDataConfig",
    "OutputDataConfig",
    "ResourceConfig",
    "StoppingCondition",
    "CheckpointConfig",
    "Environment",
    "EnableManagedSpotTraining",
    "RetryStrategy",
)


# -- small helpers --------------------------------------------------------------------------------------------------


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _utcnow() -> datetime:
    from moto.core.utils import utcnow

    return utcnow()  # what moto stamps its own objects with


def _signal_group(popen: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Signal the process group a child leads (it was started with a session of its own)."""
    if popen is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def _remember(popen: subprocess.Popen[bytes] | None, known: dict[int, Any]) -> None:
    """Add the processes a container started to ``known``: they may leave its process group and session (torchrun
    does) and outlive it, but are part of the "container", so a kill must reach them."""
    import psutil

    if popen is None or popen.poll() is not None:  # once reaped, the pid may be a stranger's
        return
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(popen.pid).children(recursive=True):
            known.setdefault(proc.pid, proc)


def _signal_tree(popen: subprocess.Popen[bytes] | None, known: dict[int, Any], sig: int) -> None:
    """Signal a container: its process group and every process it started (psutil checks each is still the one
    seen, so a reused pid is left alone)."""
    import psutil

    _remember(popen, known)
    _signal_group(popen, sig)
    for proc in list(known.values()):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _tar_folder(folder: Path) -> bytes:
    """A tar.gz of the folder's contents (files at the archive's root, as SageMaker packs /opt/ml/model)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


def _folder_has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class _LogPump:
    """Copies a local log file to a CloudWatch Logs stream, line by line, as it grows."""

    path: Path
    group: str
    stream: str
    offset: int = 0
    created: bool = False

    def pump(self, logs: Any, *, final: bool = False) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        if not final:
            cut = data.rfind(b"\n")
            data = data[: cut + 1] if cut >= 0 else b""
        if not data:
            return
        self.offset += len(data)
        if not self.created:
            for call, kwargs in (
                (logs.create_log_group, {"logGroupName": self.group}),
                (logs.create_log_stream, {"logGroupName": self.group, "logStreamName": self.stream}),
            ):
                with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
                    call(**kwargs)
            self.created = True
        now = int(time.time() * 1000)
        lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
        for start in range(0, len(lines), 500):
            events = [{"timestamp": now, "message": line[:200_000]} for line in lines[start : start + 500]]
            logs.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=events)


# -- training -------------------------------------------------------------------------------------------------------


@dataclass
class _Host:
    """One training instance: its /opt/ml folder and, while it runs, its container process."""

    name: str  # algo-1, algo-2...
    root: Path
    popen: subprocess.Popen[bytes] | None = None
    known: dict[int, Any] = field(default_factory=dict)  # the processes it started (psutil.Process by pid)
    log: _LogPump | None = None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()


@dataclass
class _TrainingRun:
    name: str
    request: dict[str, Any]  # the CreateTrainingJob request's parameters the harness needs
    created: float = field(default_factory=time.monotonic)
    phase: str = "starting"  # starting, downloading, training, uploading, interrupted, restarting, done
    hosts: list[_Host] = field(default_factory=list)
    attempt: int = 0
    attempt_started: float | None = None
    training_seconds: float = 0.0
    stop_reason: str | None = None  # the final SecondaryStatus: Stopped (StopTrainingJob), MaxRuntimeExceeded...
    stop_sent: float | None = None
    failing: str | None = None  # a host failed while others ran: they were told to stop
    first_failed: list[str] = field(default_factory=list)  # the hosts that had failed when the failure was seen
    synced_this_attempt: bool = False  # a checkpoint file of this attempt reached S3
    interrupt_armed: bool = False  # interrupt_training(..., after_checkpoint=True) waits for the clock to do it
    interruptions: int = 0
    last_sync: float = 0.0
    synced: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    epoch_used: set[int] = field(default_factory=set)


# -- hyperparameter tuning ------------------------------------------------------------------------------------------

TUNING_NAME_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}")
TUNING_NAME_MAX = 32
MAX_TUNED_HYPERPARAMETERS = 30  # SageMaker searches at most 30 hyperparameters per tuning job
MAX_CATEGORICAL_VALUES = 30
SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")
EMULATED_STRATEGIES = ("Bayesian", "Random")
TRAINING_COUNTERS = ("Completed", "InProgress", "RetryableError", "NonRetryableError", "Stopped")
OBJECTIVE_COUNTERS = ("Succeeded", "Pending", "Failed")


@dataclass(frozen=True)
class _Range:
    """One of a tuning job's ParameterRanges, parsed."""

    name: str
    kind: str  # continuous, integer, categorical
    low: float = 0.0
    high: float = 0.0
    scaling: str = "Linear"  # Auto is sampled as Linear
    values: tuple[str, ...] = ()

    def sample(self, rng: random.Random) -> str:
        """A random value in the range, as the string SageMaker passes in HyperParameters."""
        if self.kind == "categorical":
            return rng.choice(self.values)
        if self.kind == "integer" and self.scaling != "Logarithmic":
            return str(rng.randint(int(self.low), int(self.high)))
        if self.scaling == "Logarithmic":
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        elif self.scaling == "ReverseLogarithmic":
            x = 1.0 - math.exp(rng.uniform(math.log(1.0 - self.high), math.log(1.0 - self.low)))
        else:
            x = rng.uniform(self.low, self.high)
        if self.kind == "integer":
            return str(min(int(self.high), max(int(self.low), round(x))))
        return repr(min(self.high, max(self.low, x)))


@dataclass
class _Trial:
    """A training job a tuning job launched."""

    name: str
    index: int
    tuned: dict[str, str]  # TunedHyperParameters
    status: str = "InProgress"  # its TrainingJobStatus once settled
    settled: bool = False  # it ended and its objective was read
    value: float | None = None  # the objective metric's final value (None: the objective failed)


@dataclass
class _Tuning:
    name: str
    objective: dict[str, str]  # HyperParameterTuningJobObjective: Type, MetricName
    definition: dict[str, Any]  # TrainingJobDefinition
    ranges: list[_Range]
    max_jobs: int
    max_parallel: int
    random: random.Random
    arn: str = ""
    created: float = field(default_factory=time.monotonic)
    trials: list[_Trial] = field(default_factory=list)
    stop_requested: bool = False
    done: bool = False
    shown: Any = None  # what DescribeHyperParameterTuningJob showed last (LastModifiedTime moves when it changes)


# -- serving --------------------------------------------------------------------------------------------------------


@dataclass
class _Server:
    """A model server for one variant of one endpoint (shared by configs that serve the same model there)."""

    endpoint_uid: str
    endpoint: str
    variant: str
    model: str
    folder: Path  # LLMOPS_OPT_ML: holds model/
    port: int
    popen: subprocess.Popen[bytes] | None = None
    known: dict[int, Any] = field(default_factory=dict)
    log: _LogPump | None = None
    started: float | None = None
    ready: bool = False
    failure: str | None = None
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class _Fleet:
    """The servers of one endpoint config on one endpoint."""

    config_name: str
    variants: list[dict[str, Any]]  # the config's ProductionVariants
    shadows: list[dict[str, Any]]  # its ShadowProductionVariants
    capture: dict[str, Any]  # its DataCaptureConfig
    servers: dict[str, _Server] = field(default_factory=dict)  # by variant name, shadows included

    def weights(self) -> dict[str, float]:
        return {v["VariantName"]: float(v.get("InitialVariantWeight", 1.0)) for v in self.variants}

    def instance_count(self, variant: str) -> int:
        for v in self.variants + self.shadows:
            if v["VariantName"] == variant:
                return int(v.get("InitialInstanceCount") or 1)
        return 1


@dataclass
class _Update:
    """An UpdateEndpoint in progress: the new (green) fleet, SageMaker's traffic-shifting steps, the guardrails."""

    fleet: _Fleet
    deployment: dict[str, Any] | None
    steps: list[tuple[float, float]]  # (green traffic share, seconds to bake at it)
    termination_wait: float
    max_seconds: float | None
    alarms: list[str]
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=_utcnow)
    phase: str = "provisioning"  # provisioning, shifting, terminating, rollingback
    step: int = 0
    step_started: float = 0.0
    share: float = 0.0  # of the traffic that goes to the green fleet now
    failure: str | None = None


@dataclass
class _Endpoint:
    name: str
    uid: str
    live: _Fleet
    weights: dict[str, float]  # current weights of the live fleet's variants
    desired_weights: dict[str, float]
    counts: dict[str, int]
    desired_counts: dict[str, int]
    status: str = "Creating"
    status_since: float = field(default_factory=time.monotonic)
    described_in_status: int = 0
    update: _Update | None = None
    weights_pending: bool = False
    deleted: bool = False
    last_deployment: dict[str, Any] | None = None


@dataclass
class _Fault:
    status: int
    body: str


@dataclass
class _Invocation:
    """What the harness needs of one InvokeEndpoint call."""

    endpoint: str
    body: bytes
    content_type: str
    accept: str | None
    target_variant: str | None
    inference_id: str | None


# -- the stand-in ---------------------------------------------------------------------------------------------------


class SageMakerStandIn:
    """moto's server on loopback, with SageMaker training jobs and endpoints that run for real (see the module).

    ``root``: where the instances' /opt/ml folders, servers' model folders and logs go (a temporary folder,
    removed by :meth:`stop`, when not given). ``training_command`` / ``serving_command``: the container commands.
    ``container_env``: extra environment for every container (e.g. ``{"OMP_NUM_THREADS": "1"}``). ``tick``: seconds
    between two steps of the clock. ``checkpoint_sync_seconds``: how often running hosts' checkpoints go to S3.
    ``stop_grace_seconds``: SIGTERM to SIGKILL for a stopped job (SageMaker gives 120 s).
    ``min_transition_seconds``: an endpoint leaves Updating/RollingBack once a DescribeEndpoint has seen it, or after
    this long. ``server_start_timeout``: how long a model server may take to answer /ping. ``seed``: the random
    choices (variants by weight, data capture sampling, tuning jobs' sampled hyperparameters and trial names).
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        region: str = "us-east-1",
        bucket: str = "llmops-standin",
        training_command: Sequence[str] = DEFAULT_TRAINING_COMMAND,
        serving_command: Sequence[str] = DEFAULT_SERVING_COMMAND,
        container_env: Mapping[str, str] | None = None,
        tick: float = 0.5,
        checkpoint_sync_seconds: float = 2.0,
        stop_grace_seconds: float = 20.0,
        min_transition_seconds: float = 3.0,
        server_start_timeout: float = 240.0,
        capture_flush_seconds: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="llmops-sagemaker-"))
        self.region = region
        self.bucket = bucket
        self.training_command = list(training_command)
        self.serving_command = list(serving_command)
        self.container_env = dict(container_env or {})
        self.tick = tick
        self.checkpoint_sync_seconds = checkpoint_sync_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.min_transition_seconds = min_transition_seconds
        self.server_start_timeout = server_start_timeout
        self.capture_flush_seconds = capture_flush_seconds
        self.errors: list[str] = []  # what went wrong inside the clock (a test can assert it stays empty)
        self.endpoint_url = ""
        self.account_id = ""
        self.role_arn = ""
        self.seed = seed
        self._random = random.Random(seed)
        self._lock = threading.RLock()  # the harness's state and moto's objects
        self._advance_lock = threading.Lock()  # one step of the clock at a time
        self._runs: dict[str, _TrainingRun] = {}
        self._tunings: dict[str, _Tuning] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._retired: list[_Endpoint] = []  # deleted endpoints whose servers are still to stop
        self._servers: dict[tuple[str, str, str], _Server] = {}
        self._reaping: list[tuple[subprocess.Popen[bytes], dict[int, Any], float]] = []
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._capture: dict[tuple[str, str, str], list[tuple[datetime, dict[str, Any]]]] = {}
        self._capture_since: dict[tuple[str, str, str], float] = {}
        self._clients: dict[str, Any] = {}
        self._patches: list[Any] = []
        self._server: Any = None
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._started = False
        self._werkzeug_level: int | None = None

    _active: SageMakerStandIn | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def __enter__(self) -> SageMakerStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SageMakerStandIn:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.server import ThreadedMotoServer

        if SageMakerStandIn._active is not None:
            raise RuntimeError("another SageMakerStandIn is running in this process (moto's handlers are patched)")
        SageMakerStandIn._active = self
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.account_id = DEFAULT_ACCOUNT_ID
            self._reset_moto()
            self._install_patches()
            werkzeug = logging.getLogger("werkzeug")  # one line per request otherwise
            self._werkzeug_level = werkzeug.level
            werkzeug.setLevel(logging.WARNING)
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            host, port = self._server.get_host_and_port()
            self.endpoint_url = f"http://{host}:{port}"
            s3 = self.client("s3")
            try:
                s3.create_bucket(Bucket=self.bucket)
            except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
                self._empty_bucket(delete=False)  # moto's S3 is process-wide: start from an empty bucket
            iam = self.client("iam")
            trust = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "sagemaker.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
            try:
                role = iam.create_role(RoleName="llmops-standin-sagemaker", AssumeRolePolicyDocument=json.dumps(trust))
            except iam.exceptions.EntityAlreadyExistsException:
                role = iam.get_role(RoleName="llmops-standin-sagemaker")
            self.role_arn = role["Role"]["Arn"]
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sagemaker-standin-shadow")
            self._stopping.clear()
            self._ticker = threading.Thread(target=self._tick_loop, name="sagemaker-standin-clock", daemon=True)
            self._ticker.start()
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the clock, every container and server (their process groups), moto's server; undo the patches."""
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(timeout=60)
            self._ticker = None
        with contextlib.suppress(Exception):
            self.flush_capture()
        procs: list[tuple[subprocess.Popen[bytes], dict[int, Any]]] = []
        with self._lock:
            for run in self._runs.values():
                procs += [(h.popen, h.known) for h in run.hosts if h.popen is not None]
            procs += [(s.popen, s.known) for s in self._servers.values() if s.popen is not None]
            procs += [(p, known) for p, known, _ in self._reaping]
        for popen, known in procs:
            _signal_tree(popen, known, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for popen, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for popen, known in procs:  # what is left, and whatever they started
            _signal_tree(popen, known, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._empty_bucket(delete=True)
            with contextlib.suppress(Exception):
                self._server.stop()
            self._server = None
        for patch in reversed(self._patches):
            with contextlib.suppress(RuntimeError):
                patch.stop()
        self._patches.clear()
        if SageMakerStandIn._active is self:
            with contextlib.suppress(Exception):
                self._reset_moto()
            SageMakerStandIn._active = None
        self._clients.clear()
        if self._werkzeug_level is not None:
            logging.getLogger("werkzeug").setLevel(self._werkzeug_level)
            self._werkzeug_level = None
        self._started = False
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _reset_moto(self) -> None:
        """Forget what an earlier stand-in left in moto's (process-wide) backends of the services it emulates."""
        from moto.backends import get_backend

        for service in ("sagemaker", "sagemaker-runtime", "cloudwatch", "logs", "applicationautoscaling"):
            get_backend(service).reset()  # type: ignore[call-overload]

    def _empty_bucket(self, *, delete: bool) -> None:
        s3 = self.client("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=self.bucket, Key=obj["Key"])
        if delete:
            s3.delete_bucket(Bucket=self.bucket)

    # -- what tests and adapters use ---------------------------------------------------------------------------------
    def connection_extra(self) -> dict[str, str]:
        """The extra of an Airflow ``aws`` connection that reaches the stand-in (AwsBaseHook reads
        ``aws_access_key_id``/``aws_secret_access_key`` from the extra when the login/password are empty)."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
        }

    def connection(self) -> dict[str, Any]:
        """A whole Airflow connection (JSON form of ``AIRFLOW_CONN_<ID>``): access keys as login/password."""
        extra = {"endpoint_url": self.endpoint_url, "region_name": self.region}
        return {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY, "extra": extra}

    def client(self, service: str) -> Any:
        """A boto3 client against the stand-in (no retries: botocore would retry moto's 500s)."""
        with self._lock:
            if service not in self._clients:
                import boto3
                from botocore.config import Config

                self._clients[service] = boto3.session.Session().client(
                    service,
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                    config=Config(retries={"max_attempts": 1}, read_timeout=120, max_pool_connections=20),
                )
            return self._clients[service]

    def s3_uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def upload_folder(self, folder: Path, prefix: str) -> str:
        """Upload a folder's files under ``prefix`` of the stand-in's bucket; returns the S3 URI of the prefix."""
        s3 = self.client("s3")
        prefix = prefix.strip("/")
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(folder)}")
        return self.s3_uri(prefix + "/")

    def upload_model(self, folder: Path, key: str) -> str:
        """Pack a model folder as SageMaker's model.tar.gz (files at the root) at ``key``; returns its S3 URI."""
        self.client("s3").put_object(Bucket=self.bucket, Key=key, Body=_tar_folder(Path(folder)))
        return self.s3_uri(key)

    def invoke(
        self,
        endpoint_name: str,
        body: Mapping[str, Any] | str,
        target_variant: str | None = None,
        *,
        content_type: str = "application/json",
    ) -> tuple[int, Any, str | None]:
        """InvokeEndpoint through boto3: (the container's HTTP status, its body as JSON or text, the variant).

        A container's error comes back from SageMaker as a ModelError (HTTP 424) carrying the container's status
        and body (``OriginalStatusCode``, ``OriginalMessage``); those are what this returns then."""
        from botocore.exceptions import ClientError

        runtime = self.client("sagemaker-runtime")
        payload = json.dumps(body) if not isinstance(body, str) else body
        kwargs: dict[str, Any] = {"EndpointName": endpoint_name, "Body": payload, "ContentType": content_type}
        if target_variant:
            kwargs["TargetVariant"] = target_variant
        try:
            resp = runtime.invoke_endpoint(**kwargs)
        except ClientError as err:
            headers = err.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            variant = headers.get("x-amzn-invoked-production-variant")
            if err.response.get("Error", {}).get("Code") != "ModelError":
                raise
            return (
                int(err.response.get("OriginalStatusCode", 500)),
                _maybe_json(err.response.get("OriginalMessage")),
                variant,
            )
        text = resp["Body"].read().decode("utf-8", errors="replace")
        return 200, _maybe_json(text), resp.get("InvokedProductionVariant")

    def fail_variant(self, endpoint: str, variant: str, status: int = 500, body: str | None = None) -> None:
        """From now on the variant's container answers ``status`` (without reaching its server)."""
        with self._lock:
            self._faults[(endpoint, variant)] = _Fault(status, body or json.dumps({"error": "fault injected"}))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def interrupt_training(self, job_name: str, *, after_checkpoint: bool = False, timeout: float = 120.0) -> None:
        """A spot interruption: the hosts' checkpoints go to S3, their containers are killed (SIGKILL); a managed spot
        job restarts (Interrupted, Restarting, Downloading, Training) with its checkpoints restored, another fails.

        Waits for the job to be Training; ``after_checkpoint``: the clock interrupts it at the first moment S3 holds
        all its checkpoint files of this attempt (so a short job cannot finish between the test seeing a checkpoint
        and the interruption). Returns once interrupted; RuntimeError if the job ended first."""
        deadline = time.monotonic() + timeout
        with self._advance_lock:
            run = self._runs.get(job_name)
            if run is None:
                raise KeyError(f"no training job {job_name!r}")
            before = run.interruptions
            run.interrupt_armed = after_checkpoint
        while True:
            with self._advance_lock:
                if run.interruptions > before:
                    return
                if run.phase == "training" and not after_checkpoint and run.stop_reason is None and not run.failing:
                    self._interrupt(run)
                    return
                if run.phase in ("done", "uploading") or run.stop_reason is not None:
                    run.interrupt_armed = False
                    raise RuntimeError(f"training job {job_name!r} ended before the interruption ({run.phase})")
                if time.monotonic() > deadline:
                    run.interrupt_armed = False
                    raise TimeoutError(f"training job {job_name!r} was not interrupted within {timeout:.0f}s")
            time.sleep(0.1)

    def flush_capture(self) -> list[str]:
        """Write the buffered Data Capture records to S3 now; returns the S3 URIs written."""
        with self._lock:
            batches = {key: recs for key, recs in self._capture.items() if recs}
            for key in batches:
                self._capture[key] = []
                self._capture_since.pop(key, None)
        written: list[str] = []
        s3 = self.client("s3")
        for (destination, endpoint, variant), records in batches.items():
            first = records[0][0]
            bucket, prefix = split_s3(destination.rstrip("/"))
            name = f"{first:%M-%S}-{first.microsecond // 1000:03d}-{uuid.uuid4()}.jsonl"
            key = "/".join(p for p in (prefix, endpoint, variant, f"{first:%Y/%m/%d/%H}", name) if p)
            body = "".join(json.dumps(rec, separators=(",", ":")) + "\n" for _, rec in records)
            s3.put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"))
            written.append(f"s3://{bucket}/{key}")
        return written

    def training_root(self, job_name: str, host: int = 1) -> Path:
        """The /opt/ml folder of a training job's instance ``algo-<host>``."""
        return self.root / "training" / job_name / f"algo-{host}"

    def training_logs(self, job_name: str) -> list[Path]:
        """The local copies of the job's container logs (one per host and attempt), oldest first."""
        return sorted((self.root / "training" / job_name / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)

    def serving_root(self, endpoint: str, variant: str) -> Path | None:
        """The LLMOPS_OPT_ML folder of the server that serves the variant on the endpoint now (None: none)."""
        with self._lock:
            ep = self._endpoints.get(endpoint)
            server = ep.live.servers.get(variant) if ep else None
            return server.folder if server else None

    def wait_training(
        self, job_name: str, statuses: Sequence[str] = tuple(TERMINAL_TRAINING), timeout: float = 300
    ) -> dict[str, Any]:
        """Poll DescribeTrainingJob until its TrainingJobStatus is one of ``statuses``; returns the description."""
        return self._wait(
            lambda: self.client("sagemaker").describe_training_job(TrainingJobName=job_name),
            "TrainingJobStatus",
            statuses,
            timeout,
            f"training job {job_name}",
        )

    def wait_tuning(
        self,
        tuning_job_name: str,
        statuses: Sequence[str] = ("Completed", "Failed", "Stopped"),
        timeout: float = 600,
    ) -> dict[str, Any]:
        """Poll DescribeHyperParameterTuningJob until its status is one of ``statuses``; returns the description."""
        return self._wait(
            lambda: self.client("sagemaker").describe_hyper_parameter_tuning_job(
                HyperParameterTuningJobName=tuning_job_name
            ),
            "HyperParameterTuningJobStatus",
            statuses,
            timeout,
            f"tuning job {tuning_job_name}",
        )

    def wait_endpoint(
        self, endpoint: str, statuses: Sequence[str] = ("InService", "Failed"), timeout: float = 300
    ) -> dict[str, Any]:
        """Poll DescribeEndpoint until its EndpointStatus is one of ``statuses``; returns the description."""
        return self._wait(
            lambda: self.client("sagemaker").describe_endpoint(EndpointName=endpoint),
            "EndpointStatus",
            statuses,
            timeout,
            f"endpoint {endpoint}",
        )

    def _wait(
        self, describe: Callable[[], dict[str, Any]], key: str, statuses: Sequence[str], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            desc = describe()
            status = desc[key]
            if not seen or seen[-1] != status:
                seen.append(status)
            if status in statuses:
                return desc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: still {status} after {timeout:.0f}s (seen {seen}); errors: {self.errors}")
            time.sleep(0.25)

    # -- the clock ---------------------------------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stopping.wait(self.tick):
            self.advance()

    def advance(self) -> None:
        """One step of the clock: move every training job and endpoint along (the background thread calls it every
        ``tick`` seconds; a test may call it too)."""
        with self._advance_lock:
            if self._stopping.is_set() and self._ticker is not None and threading.current_thread() is not self._ticker:
                return
            for run in list(self._runs.values()):
                self._guard(f"training job {run.name}", self._advance_training, run)
            for tuning in list(self._tunings.values()):
                self._guard(f"tuning job {tuning.name}", self._advance_tuning, tuning)
            for ep in list(self._endpoints.values()):
                self._guard(f"endpoint {ep.name}", self._advance_endpoint, ep)
            self._guard("retired endpoints", self._advance_retired)
            self._guard("reaper", self._reap)
            self._guard("data capture", self._flush_due_capture)

    def _guard(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.errors.append(f"{what}: {traceback.format_exc()}")

    # -- moto's objects ----------------------------------------------------------------------------------------------
    @property
    def _backend(self) -> Any:
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends[self.account_id][self.region]

    def _job(self, name: str) -> Any:
        return self._backend.training_jobs[name]

    # -- training: requests ------------------------------------------------------------------------------------------
    def _check_region(self, resp: Any) -> None:
        from moto.sagemaker.exceptions import ValidationError

        if resp.region != self.region or resp.current_account != self.account_id:
            raise ValidationError(message=f"the stand-in emulates account {self.account_id} in {self.region} only")

    def _on_create_training_job(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        self._check_region(resp)
        name = resp._get_param("TrainingJobName")
        request = {key: copy.deepcopy(resp._get_param(key)) for key in TRAINING_REQUEST_KEYS}
        with self._lock:
            self._check_new_training_name(resp.sagemaker_backend, name)
            result = original(resp)
            self._adopt_training_job(resp.sagemaker_backend.training_jobs[name], request)
        return result

    def _check_new_training_name(self, backend: Any, name: str) -> None:
        from moto.sagemaker.exceptions import ResourceInUseException

        if name in backend.training_jobs:
            raise ResourceInUseException(
                "Training job names must be unique within an AWS account and region, and a training job "
                f"with this name already exists ({backend.training_jobs[name].arn})"
            )

    def _adopt_training_job(self, job: Any, request: dict[str, Any], *, tuning_arn: str | None = None) -> None:
        """(Caller holds the lock.) moto's new training job becomes one the clock runs: InProgress, Starting."""
        now = _utcnow()
        # Every attribute DescribeTrainingJob may show is set here once (None hides it), so later changes never
        # grow the object's __dict__ while moto serialises it in another thread.
        job.algorithm_specification = request["AlgorithmSpecification"] or {}
        job.environment = request["Environment"] or None
        job.training_job_status = "InProgress"
        job.secondary_status = "Starting"
        job.secondary_status_transitions = [
            {"Status": "Starting", "StartTime": now, "StatusMessage": "Launching requested ML instances"}
        ]
        job.creation_time = job.last_modified_time = now
        job.training_start_time = None
        job.training_end_time = None
        job.model_artifacts = None
        job.final_metric_data_list = None
        job.failure_reason = None
        job.training_time_in_seconds = None
        job.billable_time_in_seconds = None
        job.retry_strategy = request["RetryStrategy"] or None
        job.tuning_job_arn = tuning_arn  # DescribeTrainingJob's TuningJobArn: the tuning job that launched it
        self._runs[job.training_job_name] = _TrainingRun(name=job.training_job_name, request=request)

    def _on_describe_training_job(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        with self._lock:
            return _copied(original(resp))

    def _on_stop_training_job(self, resp: Any) -> Any:
        from moto.core.responses import EmptyResult
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("TrainingJobName")
        with self._lock:
            job = resp.sagemaker_backend.training_jobs.get(name)
            run = self._runs.get(name)
            if job is None or run is None:
                arn = f"arn:aws:sagemaker:{self.region}:{self.account_id}:training-job/{name}"
                raise ValidationError(message=f"Requested resource not found: {arn}")
            if job.training_job_status != "InProgress":
                raise ValidationError(
                    message=f"The request was rejected because the training job is in status {job.training_job_status}."
                )
            self._request_stop(job, run)
        return EmptyResult()

    def _request_stop(self, job: Any, run: _TrainingRun) -> None:
        """(Caller holds the lock.) StopTrainingJob: Stopping now; the clock stops the containers."""
        run.stop_reason = "Stopped"
        job.training_job_status = "Stopping"
        self._secondary(job, "Stopping", "Stopping the training job")

    # -- training: the clock -----------------------------------------------------------------------------------------
    def _secondary(self, job: Any, status: str, message: str) -> None:
        """Move a job's SecondaryStatus (caller holds the lock)."""
        now = _utcnow()
        transitions = list(job.secondary_status_transitions or [])
        if transitions and "EndTime" not in transitions[-1]:
            transitions[-1] = {**transitions[-1], "EndTime": now}
        transitions.append({"Status": status, "StartTime": now, "StatusMessage": message})
        job.secondary_status_transitions = transitions
        job.secondary_status = status
        job.last_modified_time = now

    def _advance_training(self, run: _TrainingRun) -> None:
        if run.phase == "done":
            return
        with self._lock:
            job = self._job(run.name)
        if run.phase in ("starting", "interrupted", "restarting") and run.stop_reason is not None:
            self._finish(run, "Stopped", secondary=run.stop_reason, message="Training job stopped")
            return
        if run.phase != "uploading" and self._max_wait_exceeded(run):
            run.stop_reason = run.stop_reason or "MaxWaitTimeExceeded"
        if run.phase == "starting":
            with self._lock:
                self._secondary(job, "Downloading", "Downloading input data")
            run.phase = "downloading"
        elif run.phase == "interrupted":
            with self._lock:
                self._secondary(job, "Restarting", "Restarting the training job after the spot interruption")
            run.phase = "restarting"
        elif run.phase == "restarting":
            with self._lock:
                self._secondary(job, "Downloading", "Downloading input data")
            run.phase = "downloading"
        elif run.phase == "downloading":
            if run.stop_reason is not None:
                self._finish(run, "Stopped", secondary=run.stop_reason, message="Training job stopped")
                return
            try:
                self._prepare_hosts(run)
            except Exception as err:
                self._finish(run, "Failed", reason=f"ClientError: {err}"[:FAILURE_REASON_MAX])
                return
            self._launch(run)
            with self._lock:
                self._secondary(job, "Training", "Training image download completed. Training in progress.")
                if job.training_start_time is None:
                    job.training_start_time = _utcnow()
            run.phase = "training"
        elif run.phase == "training":
            self._advance_running(run)
        elif run.phase == "uploading":
            if run.stop_reason is not None:  # StopTrainingJob came while the model was being uploaded
                self._upload_outputs(run, model_if_any=True)
                self._finish(run, "Stopped", secondary=run.stop_reason, message="Training job stopped")
                return
            self._upload_outputs(run)
            self._finish(run, "Completed", secondary="Completed", message="Training job completed")

    def _max_wait_exceeded(self, run: _TrainingRun) -> bool:
        limit = (run.request.get("StoppingCondition") or {}).get("MaxWaitTimeInSeconds")
        return bool(limit) and time.monotonic() - run.created > float(limit)

    def _running_seconds(self, run: _TrainingRun) -> float:
        now = time.monotonic()
        return run.training_seconds + (now - run.attempt_started if run.attempt_started is not None else 0.0)

    def _advance_running(self, run: _TrainingRun) -> None:
        logs = self.client("logs")
        for host in run.hosts:
            _remember(host.popen, host.known)
            if host.log is not None:
                host.log.pump(logs)
        codes = [host.exit_code() for host in run.hosts]
        limit = (run.request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
        if run.stop_reason is None and limit and self._running_seconds(run) > float(limit):
            run.stop_reason = "MaxRuntimeExceeded"
        if run.stop_reason is not None and run.stop_sent is None:
            with self._lock:
                job = self._job(run.name)
                if job.training_job_status != "Stopping":
                    job.training_job_status = "Stopping"
                    self._secondary(job, "Stopping", "Stopping the training job")
            for host in run.hosts:  # docker stop: SIGTERM to the container's processes, SIGKILL after the grace
                _signal_group(host.popen, signal.SIGTERM)
            run.stop_sent = time.monotonic()
        elif run.stop_reason is None and run.failing is None and any(c not in (None, 0) for c in codes):
            run.first_failed = [h.name for h, c in zip(run.hosts, codes, strict=True) if c not in (None, 0)]
            if any(c is None for c in codes):  # one host failed: SageMaker stops the others
                run.failing = "a host failed"
                for host, code in zip(run.hosts, codes, strict=True):
                    if code is None:
                        _signal_group(host.popen, signal.SIGTERM)
                run.stop_sent = time.monotonic()
        if run.stop_sent is not None and time.monotonic() - run.stop_sent > self.stop_grace_seconds:
            for host in run.hosts:
                _signal_tree(host.popen, host.known, signal.SIGKILL)
        if run.interrupt_armed or time.monotonic() - run.last_sync >= self.checkpoint_sync_seconds:
            snapshot = self._sync_checkpoints(run, stable_only=True)
            if run.interrupt_armed and snapshot and all(c is None for c in codes) and run.stop_reason is None:
                self._interrupt(run)
                return
        if any(c is None for c in codes):
            return
        # Every host has exited.
        self._end_attempt(run)
        self._sync_checkpoints(run, stable_only=False)
        if run.stop_reason is not None:  # SecondaryStatus Stopped, MaxRuntimeExceeded or MaxWaitTimeExceeded
            self._upload_outputs(run, model_if_any=True)
            self._finish(run, "Stopped", secondary=run.stop_reason, message="Training job stopped")
        elif all(c == 0 for c in codes):
            with self._lock:
                self._secondary(self._job(run.name), "Uploading", "Uploading generated training model")
            run.phase = "uploading"
        else:
            self._upload_outputs(run, model=False)
            self._finish(run, "Failed", reason=self._failure_reason(run, codes))

    def _end_attempt(self, run: _TrainingRun) -> None:
        for host in run.hosts:  # the container is gone: what its processes started goes with it
            _signal_tree(host.popen, host.known, signal.SIGKILL)
        if run.attempt_started is not None:
            run.training_seconds += time.monotonic() - run.attempt_started
            run.attempt_started = None
        logs = self.client("logs")
        for host in run.hosts:
            if host.log is not None:
                host.log.pump(logs, final=True)

    def _failure_reason(self, run: _TrainingRun, codes: list[int | None]) -> str:
        pairs = sorted(zip(run.hosts, codes, strict=True), key=lambda hc: hc[0].name not in run.first_failed)
        for host, code in pairs:
            failure = host.root / "output" / "failure"
            if code not in (0, None) and failure.is_file():
                text = failure.read_text(errors="replace").strip()
                if text:
                    return f"AlgorithmError: {text}"[:FAILURE_REASON_MAX]
        for host in run.hosts:  # a host that was stopped after another failed may have written one too
            failure = host.root / "output" / "failure"
            if failure.is_file() and failure.read_text(errors="replace").strip():
                return f"AlgorithmError: {failure.read_text(errors='replace').strip()}"[:FAILURE_REASON_MAX]
        code = next(c for _, c in pairs if c not in (0, None))
        return f"AlgorithmError: exit code {code}"

    def _finish(
        self,
        run: _TrainingRun,
        status: str,
        *,
        secondary: str | None = None,
        message: str | None = None,
        reason: str | None = None,
    ) -> None:
        for host in run.hosts:  # nothing of the job may outlive it (torchrun's workers included)
            _signal_tree(host.popen, host.known, signal.SIGKILL)
        self._end_attempt(run)
        metrics = self._final_metrics(run)  # the logs are all in CloudWatch Logs now
        with self._lock:
            job = self._job(run.name)
            now = _utcnow()
            job.final_metric_data_list = metrics
            job.training_job_status = status
            if status == "Failed":
                job.failure_reason = reason or "AlgorithmError"
                self._secondary(
                    job, secondary or "Failed", message or f"Training job failed. Reason: {job.failure_reason}"
                )
            else:
                self._secondary(job, secondary or status, message or f"Training job {status.lower()}")
            last = job.secondary_status_transitions[-1]
            job.secondary_status_transitions = [*job.secondary_status_transitions[:-1], {**last, "EndTime": now}]
            job.training_end_time = now
            if job.training_start_time is not None:
                seconds = max(1, math.ceil(run.training_seconds))
                job.training_time_in_seconds = seconds
                job.billable_time_in_seconds = seconds
        run.phase = "done"

    def _final_metrics(self, run: _TrainingRun) -> list[dict[str, Any]] | None:
        """FinalMetricDataList: for each of AlgorithmSpecification.MetricDefinitions, the value its regex captured
        (first group) in the job's CloudWatch log lines, the last match winning, as SageMaker does."""
        definitions = (run.request.get("AlgorithmSpecification") or {}).get("MetricDefinitions") or []
        patterns: list[tuple[str, re.Pattern[str]]] = []
        for definition in definitions:
            with contextlib.suppress(re.error, KeyError, TypeError):
                patterns.append((definition["Name"], re.compile(definition["Regex"])))
        if not patterns:
            return None
        found: dict[str, float] = {}
        for line in self._training_log_lines(run.name):
            for name, pattern in patterns:
                match = pattern.search(line)
                if match is None:
                    continue
                with contextlib.suppress(ValueError, TypeError):
                    value = float(match.group(1) if pattern.groups else match.group(0))
                    if math.isfinite(value):
                        found[name] = value
        now = _utcnow()
        data = [{"MetricName": name, "Value": found[name], "Timestamp": now} for name, _ in patterns if name in found]
        return data or None

    def _training_log_lines(self, job_name: str) -> list[str]:
        """The job's log lines as CloudWatch Logs holds them: its streams (``<job>/algo-<n>-<epoch>``) by attempt,
        then host."""
        logs = self.client("logs")
        streams: list[str] = []
        try:
            for page in logs.get_paginator("describe_log_streams").paginate(
                logGroupName=TRAINING_LOG_GROUP, logStreamNamePrefix=f"{job_name}/"
            ):
                streams += [s["logStreamName"] for s in page.get("logStreams", [])]
        except logs.exceptions.ResourceNotFoundException:
            return []

        def order(stream: str) -> tuple[int, str]:
            host, _, epoch = stream.rsplit("/", 1)[-1].rpartition("-")
            return (int(epoch) if epoch.isdigit() else 0, host)

        lines: list[str] = []
        for stream in sorted(streams, key=order):
            kwargs: dict[str, Any] = {
                "logGroupName": TRAINING_LOG_GROUP,
                "logStreamName": stream,
                "startFromHead": True,
            }
            token = None
            while True:
                page = logs.get_log_events(**kwargs, **({"nextToken": token} if token else {}))
                lines += [event["message"] for event in page.get("events", [])]
                if not page.get("events") or page.get("nextForwardToken") in (None, token):
                    break
                token = page["nextForwardToken"]
        return lines

    def _prepare_hosts(self, run: _TrainingRun) -> None:
        """Fresh /opt/ml folders for every instance: configs, input channels, restored checkpoints."""
        request = run.request
        resource = request.get("ResourceConfig") or {}
        count = int(resource.get("InstanceCount") or 1)
        names = [f"algo-{i}" for i in range(1, count + 1)]
        job_folder = self.root / "training" / run.name
        run.hosts = []
        for index, name in enumerate(names):
            root = job_folder / name
            shutil.rmtree(root, ignore_errors=True)  # a restarted (spot) instance starts from a clean disk
            for sub in ("input/config", "input/data", "model", "output/data", "checkpoints", "code"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            config = root / "input" / "config"
            config.joinpath("hyperparameters.json").write_text(json.dumps(request.get("HyperParameters") or {}))
            config.joinpath("resourceconfig.json").write_text(
                json.dumps(
                    {
                        "current_host": name,
                        "current_instance_type": resource.get("InstanceType", "ml.m5.large"),
                        "current_group_name": "homogeneousCluster",
                        "hosts": names,
                        "instance_groups": [
                            {
                                "instance_group_name": "homogeneousCluster",
                                "instance_type": resource.get("InstanceType", "ml.m5.large"),
                                "hosts": names,
                            }
                        ],
                        "network_interface_name": "eth0",
                    }
                )
            )
            channels = request.get("InputDataConfig") or []
            config.joinpath("inputdataconfig.json").write_text(
                json.dumps(
                    {
                        ch["ChannelName"]: {
                            **({"ContentType": ch["ContentType"]} if ch.get("ContentType") else {}),
                            "TrainingInputMode": ch.get("InputMode", "File"),
                            "S3DistributionType": ch.get("DataSource", {})
                            .get("S3DataSource", {})
                            .get("S3DataDistributionType", "FullyReplicated"),
                            "RecordWrapperType": ch.get("RecordWrapperType", "None"),
                        }
                        for ch in channels
                    }
                )
            )
            checkpoint = request.get("CheckpointConfig") or {}
            if checkpoint.get("S3Uri"):
                config.joinpath("checkpointconfig.json").write_text(
                    json.dumps(
                        {"LocalPath": checkpoint.get("LocalPath", "/opt/ml/checkpoints"), "S3Uri": checkpoint["S3Uri"]}
                    )
                )
            for channel in channels:
                source = channel.get("DataSource", {}).get("S3DataSource")
                if not source:
                    raise ValueError(f"channel {channel.get('ChannelName')}: only S3DataSource is emulated")
                if source.get("S3DataType", "S3Prefix") != "S3Prefix":
                    raise ValueError(f"channel {channel['ChannelName']}: only S3DataType S3Prefix is emulated")
                shard = (index, count) if source.get("S3DataDistributionType") == "ShardedByS3Key" else None
                found = self._download_prefix(source["S3Uri"], root / "input" / "data" / channel["ChannelName"], shard)
                if not found:
                    raise ValueError(f'No S3 objects found under S3 URL "{source["S3Uri"]}" given in input data source')
            if checkpoint.get("S3Uri"):
                restored = self._checkpoint_dir(run, root)
                self._download_prefix(checkpoint["S3Uri"], restored, folder=True)
                for path in restored.rglob("*"):  # in S3 already: not uploaded again
                    if path.is_file():
                        stat = path.stat()
                        run.synced[(name, str(path.relative_to(restored)))] = (stat.st_size, stat.st_mtime_ns)
            run.hosts.append(_Host(name=name, root=root))

    def _checkpoint_dir(self, run: _TrainingRun, root: Path) -> Path:
        local = (run.request.get("CheckpointConfig") or {}).get("LocalPath") or "/opt/ml/checkpoints"
        rel = local[len("/opt/ml/") :] if local.startswith("/opt/ml/") else f"local{local}"
        return root / rel

    def _download_prefix(
        self, uri: str, dest: Path, shard: tuple[int, int] | None = None, *, folder: bool = False
    ) -> int:
        """The objects under an S3 prefix into ``dest`` (``folder``: the URI names a folder, as CheckpointConfig's
        does, so ``.../job`` does not take ``.../job-2/...``); returns how many."""
        s3 = self.client("s3")
        bucket, prefix = split_s3(uri)
        if folder and prefix:
            prefix = prefix.rstrip("/") + "/"
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        keys.sort()
        if shard is not None:
            keys = [key for i, key in enumerate(keys) if i % shard[1] == shard[0]]
        dest.mkdir(parents=True, exist_ok=True)
        for key in keys:
            rel = key[len(prefix) :].lstrip("/") or key.rsplit("/", 1)[-1]
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
        return len(keys)

    def _launch(self, run: _TrainingRun) -> None:
        request = run.request
        port = free_port()
        names = [host.name for host in run.hosts]
        epoch = int(time.time())
        while epoch in run.epoch_used:
            epoch += 1
        run.epoch_used.add(epoch)
        logs_folder = self.root / "training" / run.name / "logs"
        logs_folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            arn = self._job(run.name).arn
        for host in run.hosts:
            env = child_env(
                {
                    **self.container_env,
                    **(request.get("Environment") or {}),
                    "LLMOPS_OPT_ML": str(host.root),
                    "LLMOPS_MASTER_ADDR": "127.0.0.1",
                    "LLMOPS_MASTER_PORT": str(port),
                    "SM_HOSTS": json.dumps(names),
                    "SM_CURRENT_HOST": host.name,
                    "SM_NUM_GPUS": "0",
                    "TRAINING_JOB_NAME": run.name,
                    "TRAINING_JOB_ARN": arn,
                    "AWS_REGION": self.region,
                    "AWS_DEFAULT_REGION": self.region,
                    "AWS_ENDPOINT_URL": self.endpoint_url,
                    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                }
            )
            stream = f"{run.name}/{host.name}-{epoch}"
            log_path = logs_folder / f"{host.name}-{epoch}.log"
            with log_path.open("ab") as log:
                host.popen = subprocess.Popen(
                    self.training_command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=host.root,
                    env=env,
                    start_new_session=True,
                )
            host.log = _LogPump(log_path, TRAINING_LOG_GROUP, stream)
        run.attempt += 1
        run.synced_this_attempt = False
        run.attempt_started = time.monotonic()
        run.stop_sent = None
        run.failing = None
        run.last_sync = time.monotonic()

    def _sync_checkpoints(self, run: _TrainingRun, *, stable_only: bool) -> bool:
        """Every host's checkpoint folder to CheckpointConfig.S3Uri (all hosts to the same prefix, as SageMaker does);
        only new or changed files, and while the job runs only those unchanged for CHECKPOINT_QUIET_SECONDS (not
        half written).
        True when S3 now holds every checkpoint file of this attempt (at least one): a consistent snapshot."""
        run.last_sync = time.monotonic()
        uri = (run.request.get("CheckpointConfig") or {}).get("S3Uri")
        if not uri:
            return False
        files = skipped = 0
        s3 = self.client("s3")
        bucket, prefix = split_s3(uri.rstrip("/"))
        now = time.time()
        for host in run.hosts:
            folder = self._checkpoint_dir(run, host.root)
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if not path.is_file():
                    continue
                files += 1
                if stable_only and now - stat.st_mtime < CHECKPOINT_QUIET_SECONDS:
                    skipped += 1
                    continue
                rel = str(path.relative_to(folder))
                signature = (stat.st_size, stat.st_mtime_ns)
                if run.synced.get((host.name, rel)) == signature:
                    continue
                try:
                    s3.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)
                except FileNotFoundError:
                    skipped += 1
                    continue
                run.synced[(host.name, rel)] = signature
                run.synced_this_attempt = True
        return files > 0 and skipped == 0 and run.synced_this_attempt

    def _upload_outputs(self, run: _TrainingRun, *, model: bool = True, model_if_any: bool = False) -> None:
        """algo-1's model/ as <S3OutputPath>/<job>/output/model.tar.gz (and output/data/ as output.tar.gz)."""
        if not run.hosts:
            return
        s3 = self.client("s3")
        output = (run.request.get("OutputDataConfig") or {}).get("S3OutputPath", "")
        if not output:
            return
        bucket, prefix = split_s3(output.rstrip("/"))
        base = "/".join(p for p in (prefix, run.name, "output") if p)
        first = run.hosts[0].root
        if _folder_has_files(first / "output" / "data"):
            s3.put_object(Bucket=bucket, Key=f"{base}/output.tar.gz", Body=_tar_folder(first / "output" / "data"))
        if model or (model_if_any and _folder_has_files(first / "model")):
            s3.put_object(Bucket=bucket, Key=f"{base}/model.tar.gz", Body=_tar_folder(first / "model"))
            with self._lock:
                self._job(run.name).model_artifacts = {"S3ModelArtifacts": f"s3://{bucket}/{base}/model.tar.gz"}

    def _interrupt(self, run: _TrainingRun) -> None:
        """(Caller holds the clock.) Freeze the containers, save their checkpoints, kill them."""
        run.interrupt_armed = False
        run.interruptions += 1
        for host in run.hosts:  # freeze the whole container (torchrun and its workers too) while saving
            _signal_tree(host.popen, host.known, signal.SIGSTOP)
        self._sync_checkpoints(run, stable_only=True)
        for host in run.hosts:
            _signal_tree(host.popen, host.known, signal.SIGKILL)
            if host.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.popen.wait(timeout=10)
        self._end_attempt(run)
        spot = bool(run.request.get("EnableManagedSpotTraining"))
        with self._lock:
            self._secondary(
                self._job(run.name), "Interrupted", "The training job was interrupted: spot capacity was reclaimed"
            )
        if spot:
            run.phase = "interrupted"
        else:
            self._finish(run, "Failed", reason="InternalServerError: the training instances were lost (interrupted)")

    # -- hyperparameter tuning: requests -----------------------------------------------------------------------------
    def _on_create_hyper_parameter_tuning_job(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        from moto.sagemaker.exceptions import ValidationError

        self._check_region(resp)
        name = resp._get_param("HyperParameterTuningJobName")
        config = copy.deepcopy(resp._get_param("HyperParameterTuningJobConfig") or {})
        definition = copy.deepcopy(resp._get_param("TrainingJobDefinition"))
        unsupported = [
            key for key in ("TrainingJobDefinitions", "WarmStartConfig", "Autotune") if resp._get_param(key)
        ] + [f"HyperParameterTuningJobConfig.{key}" for key in ("TuningJobCompletionCriteria",) if config.get(key)]
        if unsupported:
            raise ValidationError(message=f"the stand-in does not emulate {', '.join(unsupported)}")
        try:
            tuning = self._plan_tuning(name, config, definition)
        except (ValueError, TypeError, KeyError) as err:
            raise ValidationError(message=str(err).strip("'\"")) from None
        config.setdefault("TrainingJobEarlyStoppingType", "Off")  # stored and shown; no early stopping is emulated
        with self._lock:
            result = original(resp)  # moto: ResourceInUse for a name in use
            obj = resp.sagemaker_backend.hyper_parameter_tuning_jobs[name]
            now = _utcnow()
            # As for training jobs: every attribute DescribeHyperParameterTuningJob shows is set once here.
            obj.hyper_parameter_tuning_job_config = config
            obj.training_job_definition = definition
            obj.hyper_parameter_tuning_job_status = "InProgress"
            obj.creation_time = obj.last_modified_time = now
            obj.hyper_parameter_tuning_end_time = None
            obj.training_job_status_counters = dict.fromkeys(TRAINING_COUNTERS, 0)
            obj.objective_status_counters = dict.fromkeys(OBJECTIVE_COUNTERS, 0)
            obj.best_training_job = None
            obj.OverallBestTrainingJob = None  # only for warm starts (not emulated)
            obj.failure_reason = None
            obj.tuning_job_completion_details = None
            obj.consumed_resources = {"RuntimeInSeconds": 0}
            tuning.arn = obj.arn
            self._tunings[name] = tuning
        return result

    def _plan_tuning(self, name: Any, config: dict[str, Any], definition: Any) -> _Tuning:
        """Check a CreateHyperParameterTuningJob request as SageMaker does where that is cheap (ValueError says what
        is wrong); the tuning job it asks for."""
        if not isinstance(name, str) or len(name) > TUNING_NAME_MAX:
            raise ValueError(
                f"1 validation error detected: Value '{name}' at 'hyperParameterTuningJobName' failed to satisfy "
                f"constraint: Member must have length less than or equal to {TUNING_NAME_MAX}"
            )
        if not TUNING_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"1 validation error detected: Value '{name}' at 'hyperParameterTuningJobName' failed to satisfy "
                f"constraint: Member must satisfy regular expression pattern: {TUNING_NAME_PATTERN.pattern}"
            )
        strategy = config.get("Strategy")
        if strategy not in EMULATED_STRATEGIES:
            if strategy in ("Hyperband", "Grid"):
                raise ValueError(f"the stand-in does not emulate the {strategy} strategy (Bayesian and Random only)")
            raise ValueError(
                f"1 validation error detected: Value '{strategy}' at 'hyperParameterTuningJobConfig.strategy' failed "
                "to satisfy constraint: Member must satisfy enum value set: [Bayesian, Random, Hyperband, Grid]"
            )
        if not isinstance(definition, dict):
            raise ValueError("TrainingJobDefinition is required (the stand-in does not emulate TrainingJobDefinitions)")
        for key in ("AlgorithmSpecification", "RoleArn", "OutputDataConfig", "ResourceConfig", "StoppingCondition"):
            if not definition.get(key):
                extra = " (HyperParameterTuningResourceConfig is not emulated)" if key == "ResourceConfig" else ""
                raise ValueError(f"TrainingJobDefinition.{key} is required{extra}")
        if not (definition.get("OutputDataConfig") or {}).get("S3OutputPath"):
            raise ValueError("TrainingJobDefinition.OutputDataConfig.S3OutputPath is required")
        objective = config.get("HyperParameterTuningJobObjective") or {}
        if objective.get("Type") not in ("Maximize", "Minimize") or not objective.get("MetricName"):
            raise ValueError(
                "HyperParameterTuningJobObjective needs a Type (Maximize or Minimize) and a MetricName for the "
                f"{strategy} strategy"
            )
        metrics = [
            d.get("Name") for d in definition["AlgorithmSpecification"].get("MetricDefinitions") or [] if d.get("Name")
        ]
        if objective["MetricName"] not in metrics:
            raise ValueError(
                f"The objective metric for the hyperparameter tuning job, [{objective['MetricName']}], isn't valid "
                f"for the specified algorithm: it is not one of the MetricDefinitions {metrics}."
            )
        for definition_of_metric in definition["AlgorithmSpecification"].get("MetricDefinitions") or []:
            try:
                re.compile(definition_of_metric.get("Regex") or "")
            except re.error as err:
                raise ValueError(
                    f"metric definition {definition_of_metric.get('Name')}: invalid Regex: {err}"
                ) from None
        limits = config.get("ResourceLimits") or {}
        for key in ("MaxNumberOfTrainingJobs", "MaxParallelTrainingJobs"):
            value = limits.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"1 validation error detected: Value '{value}' at 'hyperParameterTuningJobConfig.resourceLimits."
                    f"{key[0].lower()}{key[1:]}' failed to satisfy constraint: Member must have value greater than "
                    "or equal to 1"
                )
        stopping = config.get("TrainingJobEarlyStoppingType", "Off")
        if stopping not in ("Off", "Auto"):
            raise ValueError(
                f"1 validation error detected: Value '{stopping}' at 'hyperParameterTuningJobConfig."
                "trainingJobEarlyStoppingType' failed to satisfy constraint: Member must satisfy enum value set: "
                "[Off, Auto]"
            )
        ranges = _parse_ranges(config.get("ParameterRanges") or {}, definition.get("StaticHyperParameters") or {})
        seed = config.get("RandomSeed")  # SageMaker's own seed for the search; else the stand-in's
        if seed is None and self.seed is not None:
            seed = f"{self.seed}/{name}"
        return _Tuning(
            name=name,
            objective={"Type": objective["Type"], "MetricName": objective["MetricName"]},
            definition=definition,
            ranges=ranges,
            max_jobs=limits["MaxNumberOfTrainingJobs"],
            max_parallel=limits["MaxParallelTrainingJobs"],
            random=random.Random(seed),
        )

    def _on_describe_hyper_parameter_tuning_job(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        with self._lock:
            return _copied(original(resp))

    def _on_list_hyper_parameter_tuning_jobs(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        with self._lock:
            return _copied(original(resp))

    def _tuning_or_raise(self, resp: Any, name: str) -> tuple[Any, _Tuning | None]:
        from moto.sagemaker.exceptions import ResourceNotFound

        obj = resp.sagemaker_backend.hyper_parameter_tuning_jobs.get(name)
        if obj is None:
            raise ResourceNotFound(message=f"Amazon SageMaker can't find a tuning job with name {name}")
        return obj, self._tunings.get(name)

    def _on_stop_hyper_parameter_tuning_job(self, resp: Any) -> Any:
        """StopHyperParameterTuningJob (not in moto): Stopping; its running training jobs are stopped as
        StopTrainingJob stops them, no more are launched; Stopped once they all ended."""
        from moto.core.responses import EmptyResult
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("HyperParameterTuningJobName")
        with self._lock:
            obj, tuning = self._tuning_or_raise(resp, name)
            status = obj.hyper_parameter_tuning_job_status
            if tuning is None or status != "InProgress":
                raise ValidationError(
                    message=f"The request was rejected because the hyperparameter tuning job is in status {status}."
                )
            tuning.stop_requested = True
            obj.hyper_parameter_tuning_job_status = "Stopping"
            obj.last_modified_time = _utcnow()
            for trial in tuning.trials:
                job = resp.sagemaker_backend.training_jobs.get(trial.name)
                run = self._runs.get(trial.name)
                if job is not None and run is not None and job.training_job_status == "InProgress":
                    self._request_stop(job, run)
        return EmptyResult()

    def _on_delete_hyper_parameter_tuning_job(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("HyperParameterTuningJobName")
        with self._lock:
            obj, _ = self._tuning_or_raise(resp, name)
            status = obj.hyper_parameter_tuning_job_status
            if status in ("InProgress", "Stopping"):
                raise ValidationError(
                    message=f"The request was rejected because the hyperparameter tuning job is in status {status}."
                )
            result = original(resp)
            self._tunings.pop(name, None)
        return result

    def _on_list_training_jobs_for_hyper_parameter_tuning_job(self, resp: Any) -> Any:
        """ListTrainingJobsForHyperParameterTuningJob (not in moto): the trials as HyperParameterTrainingJobSummary,
        sorted by Name (default), CreationTime, Status or FinalObjectiveMetricValue (only trials with a value),
        Ascending by default; NextToken is an offset."""
        from moto.core.responses import ActionResult
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("HyperParameterTuningJobName")
        sort_by = resp._get_param("SortBy") or "Name"
        order = resp._get_param("SortOrder") or "Ascending"
        status = resp._get_param("StatusEquals")
        limit = int(resp._get_param("MaxResults") or 10)
        token = resp._get_param("NextToken")
        if sort_by not in ("Name", "CreationTime", "Status", "FinalObjectiveMetricValue"):
            raise ValidationError(message=f"Invalid SortBy: {sort_by}")
        if order not in ("Ascending", "Descending") or not 1 <= limit <= 100:
            raise ValidationError(message="Invalid SortOrder or MaxResults (1 to 100)")
        with self._lock:
            _, tuning = self._tuning_or_raise(resp, name)
            summaries = [self._trial_summary(tuning, t) for t in tuning.trials] if tuning is not None else []
        if status:
            summaries = [s for s in summaries if s["TrainingJobStatus"] == status]
        if sort_by == "FinalObjectiveMetricValue":
            summaries = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s]
        keys: dict[str, Callable[[dict[str, Any]], Any]] = {
            "Name": lambda s: s["TrainingJobName"],
            "CreationTime": lambda s: s["CreationTime"],
            "Status": lambda s: s["TrainingJobStatus"],
            "FinalObjectiveMetricValue": lambda s: s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"],
        }
        summaries.sort(key=keys[sort_by], reverse=order == "Descending")
        try:
            start = int(token) if token else 0
        except ValueError:
            raise ValidationError(message="Invalid pagination token") from None
        page = summaries[start : start + limit]
        more = start + limit < len(summaries)
        return ActionResult({"TrainingJobSummaries": page, "NextToken": str(start + limit) if more else None})

    def _trial_summary(self, tuning: _Tuning, trial: _Trial) -> dict[str, Any]:
        """(Caller holds the lock.) A trial as SageMaker's HyperParameterTrainingJobSummary."""
        job = self._backend.training_jobs[trial.name]
        summary: dict[str, Any] = {
            "TrainingJobName": trial.name,
            "TrainingJobArn": job.arn,
            "TuningJobName": tuning.name,
            "CreationTime": job.creation_time,
            "TrainingJobStatus": job.training_job_status,
            "TunedHyperParameters": dict(trial.tuned),
        }
        if job.training_start_time is not None:
            summary["TrainingStartTime"] = job.training_start_time
        if job.training_end_time is not None:
            summary["TrainingEndTime"] = job.training_end_time
        if job.failure_reason:
            summary["FailureReason"] = job.failure_reason
        if trial.settled and trial.value is not None:
            summary["FinalHyperParameterTuningJobObjectiveMetric"] = {**tuning.objective, "Value": trial.value}
        summary["ObjectiveStatus"] = (
            "Pending" if not trial.settled else "Succeeded" if trial.value is not None else "Failed"
        )
        return copy.deepcopy(summary)

    # -- hyperparameter tuning: the clock ----------------------------------------------------------------------------
    def _advance_tuning(self, tuning: _Tuning) -> None:
        """Read the objective of the trials that ended, launch new ones up to MaxParallelTrainingJobs (until
        MaxNumberOfTrainingJobs were launched), and show it all in DescribeHyperParameterTuningJob."""
        if tuning.done:
            return
        metric = tuning.objective["MetricName"]
        with self._lock:
            if tuning.name not in self._backend.hyper_parameter_tuning_jobs:
                tuning.done = True
                return
            for trial in tuning.trials:
                job = self._backend.training_jobs.get(trial.name)
                if trial.settled or job is None or job.training_job_status not in TERMINAL_TRAINING:
                    continue
                values = [m["Value"] for m in job.final_metric_data_list or [] if m.get("MetricName") == metric]
                trial.value = float(values[-1]) if values and job.training_job_status != "Failed" else None
                trial.status = job.training_job_status
                trial.settled = True
        while (
            not tuning.stop_requested
            and len(tuning.trials) < tuning.max_jobs
            and sum(not t.settled for t in tuning.trials) < tuning.max_parallel
        ):
            self._launch_trial(tuning)
        self._sync_tuning(tuning)

    def _launch_trial(self, tuning: _Tuning) -> None:
        """A training job for the next trial: TrainingJobDefinition's fields, StaticHyperParameters plus a value
        sampled at random in each range, named ``<tuning job>-<NNN>-<8 hex>`` as SageMaker names them."""
        index = len(tuning.trials) + 1
        tuned = {r.name: r.sample(tuning.random) for r in tuning.ranges}
        name = f"{tuning.name}-{index:03d}-{tuning.random.getrandbits(32):08x}"
        d = tuning.definition
        checkpoint = copy.deepcopy(d.get("CheckpointConfig")) or None
        if checkpoint and checkpoint.get("S3Uri"):  # a folder per trial: no trial resumes from another's checkpoint
            checkpoint["S3Uri"] = f"{checkpoint['S3Uri'].rstrip('/')}/{name}"
        request: dict[str, Any] = {
            "AlgorithmSpecification": copy.deepcopy(d["AlgorithmSpecification"]),
            "HyperParameters": {**(d.get("StaticHyperParameters") or {}), **tuned},
            "InputDataConfig": copy.deepcopy(d.get("InputDataConfig")),
            "OutputDataConfig": copy.deepcopy(d["OutputDataConfig"]),
            "ResourceConfig": copy.deepcopy(d["ResourceConfig"]),
            "StoppingCondition": copy.deepcopy(d["StoppingCondition"]),
            "CheckpointConfig": checkpoint,
            "Environment": copy.deepcopy(d.get("Environment")),
            "EnableManagedSpotTraining": bool(d.get("EnableManagedSpotTraining")),
            "RetryStrategy": copy.deepcopy(d.get("RetryStrategy")),
        }
        with self._lock:
            if tuning.stop_requested:  # StopHyperParameterTuningJob came in meanwhile
                return
            backend = self._backend
            self._check_new_training_name(backend, name)
            backend.create_training_job(  # what moto's CreateTrainingJob handler calls
                training_job_name=name,
                hyper_parameters=dict(request["HyperParameters"]),
                algorithm_specification=copy.deepcopy(request["AlgorithmSpecification"]),
                role_arn=d["RoleArn"],
                input_data_config=copy.deepcopy(request["InputDataConfig"]),
                output_data_config=copy.deepcopy(request["OutputDataConfig"]),
                resource_config=copy.deepcopy(request["ResourceConfig"]),
                vpc_config=copy.deepcopy(d.get("VpcConfig")),
                stopping_condition=copy.deepcopy(request["StoppingCondition"]),
                tags=[],
                enable_network_isolation=bool(d.get("EnableNetworkIsolation")),
                enable_inter_container_traffic_encryption=bool(d.get("EnableInterContainerTrafficEncryption")),
                enable_managed_spot_training=request["EnableManagedSpotTraining"],
                checkpoint_config=copy.deepcopy(checkpoint),
                debug_hook_config=None,
                debug_rule_configurations=None,
                tensor_board_output_config=None,
                experiment_config=None,
            )
            self._adopt_training_job(backend.training_jobs[name], request, tuning_arn=tuning.arn)
            tuning.trials.append(_Trial(name=name, index=index, tuned=tuned))

    def _best_trial(self, tuning: _Tuning) -> _Trial | None:
        scored = [t for t in tuning.trials if t.settled and t.value is not None]
        if not scored:
            return None
        sign = 1.0 if tuning.objective["Type"] == "Maximize" else -1.0
        return max(scored, key=lambda t: (sign * (t.value or 0.0), -t.index))  # a tie goes to the earlier trial

    def _sync_tuning(self, tuning: _Tuning) -> None:
        """What DescribeHyperParameterTuningJob shows: status, counters, BestTrainingJob; the end once every trial
        ended (all launched, or stop requested): Stopped, Failed when no trial has an objective value, else
        Completed."""
        with self._lock:
            obj = self._backend.hyper_parameter_tuning_jobs.get(tuning.name)
            if obj is None:
                tuning.done = True
                return
            counters = dict.fromkeys(TRAINING_COUNTERS, 0)
            objectives = dict.fromkeys(OBJECTIVE_COUNTERS, 0)
            for trial in tuning.trials:
                if not trial.settled:
                    counters["InProgress"] += 1
                    objectives["Pending"] += 1
                    continue
                counters[trial.status if trial.status in ("Completed", "Stopped") else "NonRetryableError"] += 1
                objectives["Succeeded" if trial.value is not None else "Failed"] += 1
            finished = all(t.settled for t in tuning.trials) and (
                tuning.stop_requested or len(tuning.trials) >= tuning.max_jobs
            )
            status, reason = obj.hyper_parameter_tuning_job_status, None
            if finished:
                if tuning.stop_requested:
                    status = "Stopped"
                elif objectives["Succeeded"] == 0:
                    status = "Failed"
                    first = self._backend.training_jobs.get(tuning.trials[0].name) if tuning.trials else None
                    why = (first.failure_reason if first is not None else None) or "no objective metric in its log"
                    reason = (
                        f"No training job succeeded after {len(tuning.trials)} attempts. For additional details, "
                        "please take a look at the training job failures by listing training jobs for the "
                        f"hyperparameter tuning job. The first one: {why}"
                    )[:FAILURE_REASON_MAX]
                else:
                    status = "Completed"
            best = self._best_trial(tuning)
            shown = (status, counters, objectives, best.name if best else None)
            if shown != tuning.shown:
                tuning.shown = shown
                now = _utcnow()
                obj.hyper_parameter_tuning_job_status = status
                obj.training_job_status_counters = counters
                obj.objective_status_counters = objectives
                obj.best_training_job = self._trial_summary(tuning, best) if best is not None else None
                obj.failure_reason = reason
                obj.last_modified_time = now
                if finished:
                    obj.hyper_parameter_tuning_end_time = now
                    tuning.done = True
            obj.consumed_resources = {"RuntimeInSeconds": int(time.monotonic() - tuning.created)}

    # -- endpoints: requests -----------------------------------------------------------------------------------------
    def _on_create_endpoint_config(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("EndpointConfigName")
        shadows = copy.deepcopy(resp._get_param("ShadowProductionVariants") or [])
        backend = resp.sagemaker_backend
        for variant in shadows:
            if variant.get("ModelName") not in backend._models:
                raise ValidationError(message=f"Could not find model '{variant.get('ModelName')}'.")
        with self._lock:
            if name in backend.endpoint_configs:
                raise ValidationError(message=f'Cannot create already existing endpoint configuration "{name}".')
            result = original(resp)
            backend.endpoint_configs[name].shadow_production_variants = shadows or None
        return result

    def _on_create_endpoint(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        from moto.sagemaker.exceptions import ValidationError

        self._check_region(resp)
        name = resp._get_param("EndpointName")
        backend = resp.sagemaker_backend
        with self._lock:
            if name in backend.endpoints:
                arn = backend.endpoints[name].arn
                raise ValidationError(message=f'Cannot create already existing endpoint "{arn}".')
            result = original(resp)
            obj = backend.endpoints[name]
            fleet = self._fleet(backend, obj.endpoint_config_name)
            weights = fleet.weights()
            counts = {v["VariantName"]: int(v.get("InitialInstanceCount") or 1) for v in fleet.variants}
            old = self._endpoints.pop(name, None)
            if old is not None:
                old.deleted = True
                self._retired.append(old)
            ep = _Endpoint(
                name=name,
                uid=uuid.uuid4().hex[:8],
                live=fleet,
                weights=weights,
                desired_weights=dict(weights),
                counts=counts,
                desired_counts=dict(counts),
            )
            self._endpoints[name] = ep
            obj.shadow_production_variants = None
            obj.last_deployment_config = None
            obj.pending_deployment_summary = None
            obj.failure_reason = None
            self._attach_servers(ep, fleet)
            self._set_status(ep, "Creating")
            self._sync_endpoint(ep)
        return result

    def _fleet(self, backend: Any, config_name: str) -> _Fleet:
        config = backend.endpoint_configs[config_name]
        return _Fleet(
            config_name=config_name,
            variants=copy.deepcopy(config.production_variants),
            shadows=copy.deepcopy(getattr(config, "shadow_production_variants", None) or []),
            capture=copy.deepcopy(config.data_capture_config or {}),
        )

    def _on_describe_endpoint(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        name = resp._get_param("EndpointName")
        with self._lock:
            result = _copied(original(resp))
            ep = self._endpoints.get(name)
            if ep is not None:
                ep.described_in_status += 1
        return result

    def _on_delete_endpoint(self, resp: Any, original: Callable[[Any], Any]) -> Any:
        name = resp._get_param("EndpointName")
        with self._lock:
            result = original(resp)
            ep = self._endpoints.pop(name, None)
            if ep is not None:
                ep.deleted = True
                self._retired.append(ep)
        return result

    def _check_updatable(self, resp: Any, name: str) -> tuple[Any, _Endpoint]:
        from moto.sagemaker.exceptions import ValidationError

        obj = resp.sagemaker_backend.endpoints.get(name)
        ep = self._endpoints.get(name)
        if obj is None or ep is None:
            arn = f"arn:aws:sagemaker:{self.region}:{self.account_id}:endpoint/{name}"
            raise ValidationError(message=f"Could not find endpoint '{arn}'.")
        if ep.status == "Failed":
            raise ValidationError(message=f'Cannot update endpoint "{obj.arn}": it is in status Failed.')
        if ep.status != "InService":
            raise ValidationError(message=f'Cannot update in-progress endpoint "{obj.arn}".')
        return obj, ep

    def _on_update_endpoint_weights_and_capacities(self, resp: Any) -> Any:
        from moto.core.responses import ActionResult
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("EndpointName")
        desired = resp._get_param("DesiredWeightsAndCapacities") or []
        with self._lock:
            obj, ep = self._check_updatable(resp, name)
            names = [d.get("VariantName") for d in desired]
            if len(set(names)) != len(names):
                raise ValidationError(message="The variant names in the request are not unique.")
            unknown = [n for n in names if n not in ep.weights]
            if unknown:
                raise ValidationError(
                    message=f'The variant name(s) "{", ".join(map(str, unknown))}" is/are not present within '
                    f'endpoint configuration "{ep.live.config_name}".'
                )
            for item in desired:
                variant = item["VariantName"]
                if item.get("DesiredWeight") is not None:
                    ep.desired_weights[variant] = float(item["DesiredWeight"])
                if item.get("DesiredInstanceCount") is not None:
                    ep.desired_counts[variant] = int(item["DesiredInstanceCount"])
            ep.weights_pending = True
            self._set_status(ep, "Updating")
            self._sync_endpoint(ep)
            return ActionResult({"EndpointArn": obj.arn})

    def _on_update_endpoint(self, resp: Any) -> Any:
        from moto.core.responses import ActionResult
        from moto.sagemaker.exceptions import ValidationError

        name = resp._get_param("EndpointName")
        config_name = resp._get_param("EndpointConfigName")
        deployment = copy.deepcopy(resp._get_param("DeploymentConfig"))
        backend = resp.sagemaker_backend
        with self._lock:
            obj, ep = self._check_updatable(resp, name)
            if config_name not in backend.endpoint_configs:
                arn = f"arn:aws:sagemaker:{self.region}:{self.account_id}:endpoint-config/{config_name}"
                raise ValidationError(message=f"Could not find endpoint configuration '{arn}'.")
            if resp._get_param("RetainAllVariantProperties"):
                raise ValidationError(message="the stand-in does not emulate RetainAllVariantProperties")
            if deployment is None and resp._get_param("RetainDeploymentConfig"):
                deployment = copy.deepcopy(ep.last_deployment)
            if deployment and deployment.get("RollingUpdatePolicy"):
                raise ValidationError(message="the stand-in does not emulate RollingUpdatePolicy")
            fleet = self._fleet(backend, config_name)
            try:
                ep.update = self._plan_update(fleet, deployment)
            except (ValueError, KeyError, TypeError) as err:
                raise ValidationError(message=f"invalid DeploymentConfig: {err}") from None
            self._attach_servers(ep, fleet)
            if deployment is not None:
                ep.last_deployment = deployment
                obj.last_deployment_config = deployment
            self._set_status(ep, "Updating")
            self._sync_endpoint(ep)
            return ActionResult({"EndpointArn": obj.arn})

    def _plan_update(self, fleet: _Fleet, deployment: dict[str, Any] | None) -> _Update:
        """SageMaker's traffic-shifting steps for a blue/green update (ALL_AT_ONCE without a DeploymentConfig)."""
        policy = (deployment or {}).get("BlueGreenUpdatePolicy") or {}
        routing = policy.get("TrafficRoutingConfiguration") or {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
        kind = routing.get("Type", "ALL_AT_ONCE")
        wait = float(routing.get("WaitIntervalInSeconds") or 0)
        capacity = sum(int(v.get("InitialInstanceCount") or 1) for v in fleet.variants) or 1

        def share(size: dict[str, Any] | None) -> float:
            if not size:
                raise ValueError(f"a {kind} TrafficRoutingConfiguration needs its step size")
            value = float(size["Value"])
            fraction = value / 100.0 if size.get("Type") == "CAPACITY_PERCENT" else value / capacity
            return min(1.0, max(0.01, fraction))

        if kind == "CANARY":
            steps = [(share(routing.get("CanarySize")), wait), (1.0, 0.0)]
        elif kind == "LINEAR":
            step = share(routing.get("LinearStepSize"))
            n = math.ceil(1.0 / step - 1e-9)
            steps = [(min(1.0, step * i), wait) for i in range(1, n)] + [(1.0, wait)]
        else:
            steps = [(1.0, wait)]
        rollback = (deployment or {}).get("AutoRollbackConfiguration") or {}
        max_seconds = policy.get("MaximumExecutionTimeoutInSeconds")
        return _Update(
            fleet=fleet,
            deployment=deployment,
            steps=steps,
            termination_wait=float(policy.get("TerminationWaitInSeconds") or 0),
            max_seconds=float(max_seconds) if max_seconds else None,
            alarms=[a["AlarmName"] for a in rollback.get("Alarms") or [] if a.get("AlarmName")],
        )

    # -- endpoints: servers -------------------------------------------------------------------------------------------
    def _attach_servers(self, ep: _Endpoint, fleet: _Fleet) -> None:
        """(Caller holds the lock.) A server per variant of the fleet: the running one for the same model on this
        endpoint if there is one, else a new one (started by the clock)."""
        for variant in fleet.variants + fleet.shadows:
            key = (ep.uid, variant["VariantName"], variant["ModelName"])
            server = self._servers.get(key)
            if server is None or server.stopped:
                base = self.root / "serving" / ep.name / variant["VariantName"]
                folder, n = base, 1
                while folder.exists() or any(s.folder == folder for s in self._servers.values()):
                    n += 1
                    folder = base.with_name(f"{base.name}-{n}")
                server = _Server(
                    endpoint_uid=ep.uid,
                    endpoint=ep.name,
                    variant=variant["VariantName"],
                    model=variant["ModelName"],
                    folder=folder,
                    port=free_port(),
                )
                self._servers[key] = server
            fleet.servers[variant["VariantName"]] = server

    def _start_server(self, server: _Server) -> None:
        """Download and unpack the model, then start the serving command (the clock's thread)."""
        server.started = time.monotonic()
        with self._lock:
            model = self._backend._models.get(server.model)
            container = dict(model.primary_container or {}) if model is not None else {}
            if not container and model is not None and model.containers:
                container = dict(model.containers[0])
        try:
            model_dir = server.folder / "model"
            model_dir.mkdir(parents=True, exist_ok=True)
            url = container.get("ModelDataUrl")
            if url:
                bucket, key = split_s3(url)
                data = self.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                    tar.extractall(model_dir, filter="data")
        except Exception as err:
            server.failure = f"Failed to download model data for production variant {server.variant}: {err}"
            return
        env = child_env(
            {
                **self.container_env,
                **(container.get("Environment") or {}),
                "LLMOPS_OPT_ML": str(server.folder),
                "LLMOPS_SERVE_PORT": str(server.port),
                "LLMOPS_SERVE_HOST": "127.0.0.1",
                "SAGEMAKER_BIND_TO_PORT": str(server.port),
                "AWS_REGION": self.region,
            }
        )
        log_path = server.folder / "server.log"
        with log_path.open("ab") as log:
            server.popen = subprocess.Popen(
                self.serving_command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=server.folder,
                env=env,
                start_new_session=True,
            )
        instance = f"i-{uuid.uuid4().hex[:17]}"
        server.log = _LogPump(
            log_path, ENDPOINT_LOG_GROUP.format(endpoint=server.endpoint), f"{server.variant}/{instance}"
        )

    def _check_server(self, server: _Server) -> None:
        if server.ready or server.failure or server.stopped:
            return
        if server.popen is None:
            self._start_server(server)
            return
        if server.log is not None:
            server.log.pump(self.client("logs"))
        _remember(server.popen, server.known)
        code = server.popen.poll()
        if code is not None:
            server.failure = (
                f"The primary container for production variant {server.variant} did not pass the ping health check "
                f"(it exited with code {code}). Please check CloudWatch logs for this endpoint. Last log lines:\n"
                f"{_tail(server.folder / 'server.log', 8)}"
            )
            return
        try:
            with urllib.request.urlopen(f"{server.url}/ping", timeout=2) as answer:
                server.ready = 200 <= answer.status < 300
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if not server.ready and time.monotonic() - (server.started or 0) > self.server_start_timeout:
            server.failure = (
                f"The primary container for production variant {server.variant} did not pass the ping health check. "
                "Please check CloudWatch logs for this endpoint."
            )

    def _fleet_state(self, fleet: _Fleet) -> tuple[bool, str | None]:
        """(all servers ready, the first failure)."""
        for server in fleet.servers.values():
            self._check_server(server)
        failure = next((s.failure for s in fleet.servers.values() if s.failure), None)
        return all(s.ready for s in fleet.servers.values()), failure

    def _release_unused_servers(self) -> None:
        """Stop the servers no fleet of a live endpoint uses any more."""
        with self._lock:
            used = {
                id(server)
                for ep in self._endpoints.values()
                for fleet in ([ep.live] + ([ep.update.fleet] if ep.update else []))
                for server in fleet.servers.values()
            }
            unused = [(key, s) for key, s in self._servers.items() if id(s) not in used]
            for key, _ in unused:
                del self._servers[key]
        for _, server in unused:
            self._stop_server(server)

    def _stop_server(self, server: _Server) -> None:
        server.stopped = True
        server.ready = False
        if server.log is not None:
            with contextlib.suppress(Exception):
                server.log.pump(self.client("logs"), final=True)
        if server.popen is not None and server.popen.poll() is None:
            _signal_tree(server.popen, server.known, signal.SIGTERM)
            with self._lock:
                self._reaping.append((server.popen, server.known, time.monotonic() + 10))

    def _reap(self) -> None:
        with self._lock:
            pending = list(self._reaping)
        keep = []
        for popen, known, deadline in pending:
            if popen.poll() is None:
                if time.monotonic() > deadline:
                    _signal_tree(popen, known, signal.SIGKILL)
                keep.append((popen, known, deadline))
            else:
                _signal_tree(popen, known, signal.SIGKILL)  # leftovers of the stopped server
        with self._lock:
            self._reaping = [item for item in self._reaping if item in keep or item not in pending]

    # -- endpoints: the clock ------------------------------------------------------------------------------------------
    def _set_status(self, ep: _Endpoint, status: str) -> None:
        """(Caller holds the lock.)"""
        if ep.status != status:
            ep.status = status
            ep.status_since = time.monotonic()
            ep.described_in_status = 0
        obj = self._backend.endpoints.get(ep.name)
        if obj is not None:
            obj.endpoint_status = status
            obj.last_modified_time = _utcnow()

    def _transition_seen(self, ep: _Endpoint) -> bool:
        """A transient status (Updating, RollingBack) may end: a DescribeEndpoint has shown it, or it lasted long."""
        return ep.described_in_status > 0 or time.monotonic() - ep.status_since >= self.min_transition_seconds

    def _sync_endpoint(self, ep: _Endpoint) -> None:
        """(Caller holds the lock.) What DescribeEndpoint shows, from the harness's state."""
        obj = self._backend.endpoints.get(ep.name)
        if obj is None:
            return
        obj.endpoint_config_name = ep.live.config_name
        obj.production_variants = [self._variant_summary(ep.live, v, ep) for v in ep.live.variants]
        obj.shadow_production_variants = [self._variant_summary(ep.live, v, None) for v in ep.live.shadows] or None
        capture = ep.live.capture
        obj.data_capture_config = (
            {
                "EnableCapture": bool(capture.get("EnableCapture")),
                "CaptureStatus": "Started" if capture.get("EnableCapture") else "Stopped",
                "CurrentSamplingPercentage": int(capture.get("InitialSamplingPercentage", 100)),
                "DestinationS3Uri": capture.get("DestinationS3Uri"),
                **({"KmsKeyId": capture["KmsKeyId"]} if capture.get("KmsKeyId") else {}),
            }
            if capture
            else None
        )
        update = ep.update
        if update is not None and update.phase != "rollingback":
            obj.pending_deployment_summary = {
                "EndpointConfigName": update.fleet.config_name,
                "ProductionVariants": [
                    {
                        **self._variant_summary(update.fleet, v, None),
                        "VariantStatus": [
                            {
                                "Status": "Creating" if update.phase == "provisioning" else "Baking",
                                "StartTime": update.started_at,
                            }
                        ],
                    }
                    for v in update.fleet.variants
                ],
                "StartTime": update.started_at,
            }
        else:
            obj.pending_deployment_summary = None

    def _variant_summary(self, fleet: _Fleet, variant: dict[str, Any], ep: _Endpoint | None) -> dict[str, Any]:
        name = variant["VariantName"]
        model = self._backend._models.get(variant["ModelName"])
        image = ((model.primary_container or {}).get("Image") if model is not None else None) or "standin"
        summary: dict[str, Any] = {
            "VariantName": name,
            "DeployedImages": [{"SpecifiedImage": image, "ResolvedImage": image, "ResolutionTime": _utcnow()}],
        }
        if ep is not None:
            summary.update(
                CurrentWeight=ep.weights[name],
                DesiredWeight=ep.desired_weights[name],
                CurrentInstanceCount=ep.counts[name],
                DesiredInstanceCount=ep.desired_counts[name],
            )
        else:
            count = int(variant.get("InitialInstanceCount") or 1)
            weight = float(variant.get("InitialVariantWeight", 1.0))
            summary.update(
                CurrentWeight=weight, DesiredWeight=weight, CurrentInstanceCount=count, DesiredInstanceCount=count
            )
        return summary

    def _advance_endpoint(self, ep: _Endpoint) -> None:
        if ep.status == "Creating":
            ready, failure = self._fleet_state(ep.live)
            with self._lock:
                if failure:
                    obj = self._backend.endpoints.get(ep.name)
                    if obj is not None:
                        obj.failure_reason = failure[:FAILURE_REASON_MAX]
                    self._set_status(ep, "Failed")
                elif ready:
                    self._set_status(ep, "InService")
            if failure:
                for server in ep.live.servers.values():
                    self._stop_server(server)
        elif ep.status in SERVING_STATUSES:
            for server in ep.live.servers.values():
                if server.log is not None:
                    server.log.pump(self.client("logs"))
        if ep.weights_pending and self._transition_seen(ep):
            with self._lock:
                ep.weights.update(ep.desired_weights)
                ep.counts.update(ep.desired_counts)
                ep.weights_pending = False
                self._set_status(ep, "InService")
                self._sync_endpoint(ep)
        if ep.update is not None:
            self._advance_update(ep, ep.update)

    def _alarm_firing(self, names: list[str]) -> str | None:
        if not names:
            return None
        alarms = self.client("cloudwatch").describe_alarms(AlarmNames=names).get("MetricAlarms", [])
        return next((a["AlarmName"] for a in alarms if a.get("StateValue") == "ALARM"), None)

    def _advance_update(self, ep: _Endpoint, update: _Update) -> None:
        now = time.monotonic()
        if update.phase == "rollingback":
            if self._transition_seen(ep):
                with self._lock:
                    ep.update = None
                    self._set_status(ep, "InService")
                    self._sync_endpoint(ep)
                self._release_unused_servers()
            return
        if update.phase == "provisioning":
            ready, failure = self._fleet_state(update.fleet)
            if failure:
                update.failure = failure
                self._roll_back(ep, update)
                return
            if ready:
                update.phase, update.step, update.step_started = "shifting", 0, now
                update.share = update.steps[0][0]
        alarm = self._alarm_firing(update.alarms)
        timed_out = update.max_seconds is not None and now - update.started > update.max_seconds
        if alarm or timed_out:
            self._roll_back(ep, update)
            return
        if update.phase == "shifting" and now - update.step_started >= update.steps[update.step][1]:
            if update.step + 1 < len(update.steps):
                update.step += 1
                update.step_started = now
                update.share = update.steps[update.step][0]
            else:
                update.phase, update.step_started, update.share = "terminating", now, 1.0
        if update.phase == "terminating" and now - update.step_started >= update.termination_wait:
            if not self._transition_seen(ep):
                return
            with self._lock:
                fleet = update.fleet
                ep.live = fleet
                ep.weights = fleet.weights()
                ep.desired_weights = dict(ep.weights)
                ep.counts = {v["VariantName"]: int(v.get("InitialInstanceCount") or 1) for v in fleet.variants}
                ep.desired_counts = dict(ep.counts)
                ep.update = None
                obj = self._backend.endpoints.get(ep.name)
                if obj is not None:
                    obj.failure_reason = None
                self._set_status(ep, "InService")
                self._sync_endpoint(ep)
            self._release_unused_servers()

    def _roll_back(self, ep: _Endpoint, update: _Update) -> None:
        """All traffic back to the old (blue) fleet; the new fleet's servers go; RollingBack, then InService with the
        old config. SageMaker records nothing more than that (a failed provisioning also sets FailureReason)."""
        with self._lock:
            update.phase = "rollingback"
            update.share = 0.0
            if update.failure:
                obj = self._backend.endpoints.get(ep.name)
                if obj is not None:
                    obj.failure_reason = update.failure[:FAILURE_REASON_MAX]
            self._set_status(ep, "RollingBack")
            self._sync_endpoint(ep)
            live = {id(s) for s in ep.live.servers.values()}
            doomed = [s for s in update.fleet.servers.values() if id(s) not in live]
            for key, server in list(self._servers.items()):
                if any(server is d for d in doomed):
                    del self._servers[key]
        for server in doomed:
            self._stop_server(server)

    def _advance_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
            mine = {ep.uid for ep in retired}
            doomed = [(key, s) for key, s in self._servers.items() if s.endpoint_uid in mine]
            for key, _ in doomed:
                del self._servers[key]
        for _, server in doomed:
            self._stop_server(server)

    # -- invocations ---------------------------------------------------------------------------------------------------
    def _on_invoke_endpoint(self, resp: Any) -> Any:
        parts = resp.path.split("/")
        name = urllib.parse.unquote(parts[2]) if len(parts) > 2 else ""
        headers = {k.lower(): v for k, v in resp.headers.items()}
        body = resp.raw_body if isinstance(resp.raw_body, bytes) else str(resp.raw_body or "").encode("utf-8")
        call = _Invocation(
            endpoint=name,
            body=body,
            content_type=headers.get("content-type", "application/octet-stream"),
            accept=headers.get("accept"),
            target_variant=headers.get("x-amzn-sagemaker-target-variant"),
            inference_id=headers.get("x-amzn-sagemaker-inference-id"),
        )
        return self._invoke(call)

    def _route(self, call: _Invocation) -> tuple[_Endpoint, _Fleet, str, _Server] | tuple[int, str]:
        """(Caller holds the lock.) The fleet, variant and server for one invocation, or an error to answer."""
        ep = self._endpoints.get(call.endpoint)
        if ep is None or self._backend.endpoints.get(call.endpoint) is None:
            return 400, f"Endpoint {call.endpoint} of account {self.account_id} not found."
        if ep.status not in SERVING_STATUSES:
            return 400, f"Endpoint {call.endpoint} of account {self.account_id} is not in service (status {ep.status})."
        fleets: list[tuple[_Fleet, dict[str, float], float]] = [(ep.live, ep.weights, 1.0)]
        update = ep.update
        if update is not None and update.share > 0:
            fleets = [(ep.live, ep.weights, 1.0 - update.share), (update.fleet, update.fleet.weights(), update.share)]
        if call.target_variant:
            fleets = [f for f in fleets if call.target_variant in f[1]]
            if not fleets:
                return 400, f'The variant name(s) "{call.target_variant}" is/are not present within the endpoint.'
        fleet, weights, _ = self._choose(fleets, [max(0.0, f[2]) for f in fleets])
        if call.target_variant:
            variant = call.target_variant
        else:
            names = [n for n, w in weights.items() if w > 0]
            if not names:
                return 400, f"Endpoint {call.endpoint} has no variant with a weight above zero."
            variant = self._choose(names, [weights[n] for n in names])
        server = fleet.servers.get(variant)
        if server is None:
            return 400, f'The variant name(s) "{variant}" is/are not present within the endpoint.'
        return ep, fleet, variant, server

    def _choose(self, items: list[Any], weights: list[float]) -> Any:
        if len(items) == 1 or sum(weights) <= 0:
            return items[0]
        return self._random.choices(items, weights=weights, k=1)[0]

    def _invoke(self, call: _Invocation) -> tuple[int, dict[str, str], str | bytes]:
        start = time.perf_counter()
        with self._lock:
            route = self._route(call)
            if len(route) == 2:
                status, message = route  # type: ignore[misc]
                body = json.dumps({"message": message})
                headers = {"status": str(status), "x-amzn-ErrorType": "ValidationError"}
                return status, {**headers, "Content-Type": "application/json"}, body
            ep, fleet, variant, server = route  # type: ignore[misc]
            fault = self._faults.get((call.endpoint, variant))
            shadows = [
                (v["VariantName"], fleet.servers.get(v["VariantName"]), float(v.get("InitialVariantWeight", 1.0)))
                for v in fleet.shadows
            ]
            total_weight = sum(fleet.weights().values()) or 1.0
        status, answer, answer_type, model_micros = self._forward(server, call, fault)
        overhead = max(0.0, (time.perf_counter() - start) * 1e6 - model_micros)
        self._put_invocation_metrics(ep.name, variant, fleet, status, model_micros, overhead)
        self._capture_invocation(ep.name, variant, fleet, call, status, answer, answer_type)
        for shadow_name, shadow_server, weight in shadows:
            if shadow_server is not None and self._random.random() < min(1.0, weight / total_weight) and self._pool:
                with contextlib.suppress(RuntimeError):  # the pool is shutting down
                    self._pool.submit(self._shadow, ep.name, shadow_name, fleet, shadow_server, call)
        headers = {"Content-Type": answer_type, "x-Amzn-Invoked-Production-Variant": variant}
        if 200 <= status < 300:
            return 200, headers, answer
        text = answer.decode("utf-8", errors="replace")
        group = ENDPOINT_LOG_GROUP.format(endpoint=ep.name)
        error = {
            "message": f"Received {'client' if status < 500 else 'server'} error ({status}) from primary with message "
            f'"{text}". See https://{self.region}.console.aws.amazon.com/cloudwatch/home?region={self.region}'
            f"#logEventViewer:group={group} in account {self.account_id} for more information.",
            "OriginalStatusCode": status,
            "OriginalMessage": text,
            "LogStreamArn": f"arn:aws:logs:{self.region}:{self.account_id}:log-group:{group}",
        }
        # moto takes the status from the headers' "status" (the tuple's first item is not used)
        headers.update({"status": "424", "x-amzn-ErrorType": "ModelError", "Content-Type": "application/json"})
        return 424, headers, json.dumps(error)

    def _forward(self, server: _Server, call: _Invocation, fault: _Fault | None) -> tuple[int, bytes, str, float]:
        """POST the body to the server's /invocations: (status, body, content type, model latency in µs)."""
        started = time.perf_counter()
        if fault is not None:
            return fault.status, fault.body.encode("utf-8"), "application/json", (time.perf_counter() - started) * 1e6
        request = urllib.request.Request(
            f"{server.url}/invocations",
            data=call.body,
            method="POST",
            headers={"Content-Type": call.content_type, **({"Accept": call.accept} if call.accept else {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                data = answer.read()
                status, kind = answer.status, answer.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as err:
            data = err.read()
            status, kind = err.code, err.headers.get("Content-Type", "application/json")
        except (urllib.error.URLError, OSError) as err:
            data = json.dumps({"error": f"the model container could not be reached: {err}"}).encode()
            status, kind = 500, "application/json"
        return status, data, kind, (time.perf_counter() - started) * 1e6

    def _shadow(self, endpoint: str, variant: str, fleet: _Fleet, server: _Server, call: _Invocation) -> None:
        start = time.perf_counter()
        status, _, _, model_micros = self._forward(server, call, self._faults.get((endpoint, variant)))
        overhead = max(0.0, (time.perf_counter() - start) * 1e6 - model_micros)
        self._put_invocation_metrics(endpoint, variant, fleet, status, model_micros, overhead)

    def _put_invocation_metrics(
        self, endpoint: str, variant: str, fleet: _Fleet, status: int, model_micros: float, overhead_micros: float
    ) -> None:
        """SageMaker's invocation metrics, per EndpointName+VariantName (and, as for a blue/green update's fleets,
        with the EndpointConfigName that served it as a third dimension)."""
        now = datetime.now(timezone.utc)
        instances = fleet.instance_count(variant)
        values = [
            ("Invocations", 1.0, "None"),
            ("Invocation4XXErrors", 1.0 if 400 <= status < 500 else 0.0, "None"),
            ("Invocation5XXErrors", 1.0 if status >= 500 else 0.0, "None"),
            ("InvocationModelErrors", 0.0 if 200 <= status < 300 else 1.0, "None"),
            ("InvocationsPerInstance", 1.0 / instances, "None"),
            ("ModelLatency", float(model_micros), "Microseconds"),
            ("OverheadLatency", float(overhead_micros), "Microseconds"),
        ]
        base = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
        data = [
            {"MetricName": metric, "Dimensions": dims, "Value": value, "Unit": unit, "Timestamp": now}
            for dims in (base, [*base, {"Name": "EndpointConfigName", "Value": fleet.config_name}])
            for metric, value, unit in values
        ]
        try:
            self.client("cloudwatch").put_metric_data(Namespace=METRICS_NAMESPACE, MetricData=data)
        except Exception:
            self.errors.append(f"metrics of {endpoint}/{variant}: {traceback.format_exc()}")

    def _capture_invocation(
        self,
        endpoint: str,
        variant: str,
        fleet: _Fleet,
        call: _Invocation,
        status: int,
        answer: bytes,
        answer_type: str,
    ) -> None:
        """Buffer a SageMaker Data Capture record (written by the clock or :meth:`flush_capture`)."""
        capture = fleet.capture
        if not capture.get("EnableCapture") or not capture.get("DestinationS3Uri") or not 200 <= status < 300:
            return
        if self._random.random() * 100 >= float(capture.get("InitialSamplingPercentage", 100)):
            return
        modes = {opt.get("CaptureMode") for opt in capture.get("CaptureOptions") or []} or {"Input", "Output"}
        types = capture.get("CaptureContentTypeHeader") or {}
        record_time = datetime.now(timezone.utc)
        data: dict[str, Any] = {}
        if "Input" in modes:
            data["endpointInput"] = _captured(call.body, call.content_type, "INPUT", types)
        if "Output" in modes:
            data["endpointOutput"] = _captured(answer, answer_type, "OUTPUT", types)
        metadata: dict[str, Any] = {
            "eventId": str(uuid.uuid4()),
            "inferenceTime": record_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if call.inference_id:
            metadata["inferenceId"] = call.inference_id
        record = {"captureData": data, "eventMetadata": metadata, "eventVersion": "0"}
        key = (capture["DestinationS3Uri"], endpoint, variant)
        with self._lock:
            self._capture.setdefault(key, []).append((record_time, record))
            self._capture_since.setdefault(key, time.monotonic())

    def _flush_due_capture(self) -> None:
        with self._lock:
            due = any(time.monotonic() - since >= self.capture_flush_seconds for since in self._capture_since.values())
        if due:
            self.flush_capture()

    # -- moto's handlers -----------------------------------------------------------------------------------------------
    def _install_patches(self) -> None:
        from unittest import mock

        from moto.sagemaker.responses import SageMakerResponse
        from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

        standin = self

        def wrap(name: str, handler: Callable[[Any, Callable[[Any], Any]], Any]) -> Callable[[Any], Any]:
            original = getattr(SageMakerResponse, name)

            def method(resp: Any) -> Any:
                return handler(resp, original)

            method.__name__ = name
            return method

        def plain(name: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
            def method(resp: Any) -> Any:
                return handler(resp)

            method.__name__ = name
            return method

        # moto picks a handler by name among the class's plain functions (inspect.isfunction): patch with functions.
        table: list[tuple[type, str, Callable[[Any], Any]]] = [
            (SageMakerResponse, "create_training_job", wrap("create_training_job", standin._on_create_training_job)),
            (
                SageMakerResponse,
                "describe_training_job",
                wrap("describe_training_job", standin._on_describe_training_job),
            ),
            (SageMakerResponse, "stop_training_job", plain("stop_training_job", standin._on_stop_training_job)),
            (
                SageMakerResponse,
                "create_hyper_parameter_tuning_job",
                wrap("create_hyper_parameter_tuning_job", standin._on_create_hyper_parameter_tuning_job),
            ),
            (
                SageMakerResponse,
                "describe_hyper_parameter_tuning_job",
                wrap("describe_hyper_parameter_tuning_job", standin._on_describe_hyper_parameter_tuning_job),
            ),
            (
                SageMakerResponse,
                "list_hyper_parameter_tuning_jobs",
                wrap("list_hyper_parameter_tuning_jobs", standin._on_list_hyper_parameter_tuning_jobs),
            ),
            (
                SageMakerResponse,
                "delete_hyper_parameter_tuning_job",
                wrap("delete_hyper_parameter_tuning_job", standin._on_delete_hyper_parameter_tuning_job),
            ),
            (
                SageMakerResponse,
                "stop_hyper_parameter_tuning_job",
                plain("stop_hyper_parameter_tuning_job", standin._on_stop_hyper_parameter_tuning_job),
            ),
            (
                SageMakerResponse,
                "list_training_jobs_for_hyper_parameter_tuning_job",
                plain(
                    "list_training_jobs_for_hyper_parameter_tuning_job",
                    standin._on_list_training_jobs_for_hyper_parameter_tuning_job,
                ),
            ),
            (
                SageMakerResponse,
                "create_endpoint_config",
                wrap("create_endpoint_config", standin._on_create_endpoint_config),
            ),
            (SageMakerResponse, "create_endpoint", wrap("create_endpoint", standin._on_create_endpoint)),
            (SageMakerResponse, "describe_endpoint", wrap("describe_endpoint", standin._on_describe_endpoint)),
            (SageMakerResponse, "delete_endpoint", wrap("delete_endpoint", standin._on_delete_endpoint)),
            (SageMakerResponse, "update_endpoint", plain("update_endpoint", standin._on_update_endpoint)),
            (
                SageMakerResponse,
                "update_endpoint_weights_and_capacities",
                plain("update_endpoint_weights_and_capacities", standin._on_update_endpoint_weights_and_capacities),
            ),
            (SageMakerRuntimeResponse, "invoke_endpoint", plain("invoke_endpoint", standin._on_invoke_endpoint)),
        ]
        for cls, name, fn in table:
            patch = mock.patch.object(cls, name, fn, create=True)
            patch.start()
            self._patches.append(patch)


def _parse_ranges(ranges: Mapping[str, Any], static: Mapping[str, Any]) -> list[_Range]:
    """ParameterRanges checked as SageMaker checks them (ValueError says what is wrong), parsed."""
    parsed: list[_Range] = []
    for kind, key in (
        ("continuous", "ContinuousParameterRanges"),
        ("integer", "IntegerParameterRanges"),
        ("categorical", "CategoricalParameterRanges"),
    ):
        for item in ranges.get(key) or []:
            name = item.get("Name")
            if not name:
                raise ValueError(f"ParameterRanges.{key}: every range needs a Name")
            if kind == "categorical":
                values = item.get("Values") or []
                if not 1 <= len(values) <= MAX_CATEGORICAL_VALUES or not all(isinstance(v, str) for v in values):
                    raise ValueError(
                        f"The categorical hyperparameter {name} must have between 1 and {MAX_CATEGORICAL_VALUES} values"
                    )
                parsed.append(_Range(name=name, kind=kind, values=tuple(values)))
                continue
            scaling = item.get("ScalingType") or "Auto"
            if scaling not in SCALING_TYPES or (kind == "integer" and scaling == "ReverseLogarithmic"):
                raise ValueError(
                    f"The hyperparameter {name} has ScalingType {scaling}: "
                    + (
                        "ReverseLogarithmic scaling is supported only for continuous hyperparameters"
                        if scaling == "ReverseLogarithmic"
                        else f"valid ScalingType values are {', '.join(SCALING_TYPES)}"
                    )
                )
            cast: Callable[[str], float] = int if kind == "integer" else float
            try:
                low, high = cast(str(item.get("MinValue"))), cast(str(item.get("MaxValue")))
            except ValueError:
                raise ValueError(
                    f"The hyperparameter {name} has MinValue {item.get('MinValue')!r} and MaxValue "
                    f"{item.get('MaxValue')!r}: they must be {'integers' if kind == 'integer' else 'numbers'}"
                ) from None
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(
                    f"The hyperparameter {name} has MinValue {low} greater than MaxValue {high} (or one is not finite)"
                )
            if scaling == "Logarithmic" and low <= 0:
                raise ValueError(
                    f"The hyperparameter {name} uses Logarithmic scaling: it works only for ranges whose values are "
                    "all greater than 0"
                )
            if scaling == "ReverseLogarithmic" and not (low >= 0 and high < 1):
                raise ValueError(
                    f"The hyperparameter {name} uses ReverseLogarithmic scaling: it works only for ranges entirely "
                    "within 0 <= x < 1.0"
                )
            parsed.append(_Range(name=name, kind=kind, low=low, high=high, scaling=scaling))
    names = [r.name for r in parsed]
    if not parsed:
        raise ValueError("ParameterRanges must hold at least one range to tune")
    if len(parsed) > MAX_TUNED_HYPERPARAMETERS:
        raise ValueError(
            f"A tuning job searches at most {MAX_TUNED_HYPERPARAMETERS} hyperparameters, not {len(parsed)}"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"The hyperparameters {duplicates} are given more than one range")
    both = sorted(set(names) & set(static))
    if both:
        raise ValueError(f"The hyperparameters {both} are both static (StaticHyperParameters) and tunable")
    return parsed


def _copied(result: Any) -> Any:
    """A moto ActionResult with its own copy of the data (serialised after the handler returns, outside the lock,
    while the clock may change the objects it came from)."""
    from moto.core.responses import ActionResult

    return ActionResult(copy.deepcopy(result.result)) if isinstance(result, ActionResult) else result


def _maybe_json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _captured(data: bytes, content_type: str, mode: str, types: Mapping[str, Any]) -> dict[str, Any]:
    """One side of a Data Capture record: JSON or CSV content types listed in CaptureContentTypeHeader are kept as
    text, everything else base64-encoded (SageMaker's default when no header is configured)."""
    kind = content_type.split(";", maxsplit=1)[0].strip()
    if kind in (types.get("JsonContentTypes") or []):
        encoding, text = "JSON", data.decode("utf-8", errors="replace")
    elif kind in (types.get("CsvContentTypes") or []):
        encoding, text = "CSV", data.decode("utf-8", errors="replace")
    else:
        encoding, text = "BASE64", base64.b64encode(data).decode("ascii")
    return {"observedContentType": content_type, "mode": mode, "data": text, "encoding": encoding}


@contextlib.contextmanager
def sagemaker_standin(root: Path | None = None, **kwargs: Any) -> Iterator[SageMakerStandIn]:
    """``with sagemaker_standin(tmp) as sm:`` — started, and stopped afterwards."""
    standin = SageMakerStandIn(root, **kwargs)
    with standin:
        yield standin


__all__ = [
    "ENDPOINT_LOG_GROUP",
    "METRICS_NAMESPACE",
    "TRAINING_LOG_GROUP",
    "SageMakerStandIn",
    "sagemaker_standin",
    "split_s3",
]
