"""The runtime of our image in a cloud job: ``python -m airflow_llmops.ml.runtime train`` and ``... serve``.

SageMaker starts a bring-your-own container as ``<image> train`` on each instance of a training job and as
``<image> serve`` behind an endpoint; ``docker/runtime-entrypoint.sh`` hands both to this module. It speaks
SageMaker's container contract, under ``/opt/ml`` (``$LLMOPS_OPT_ML`` instead, for tests and other hosts):

``train``
    reads the :class:`~airflow_llmops.specs.TrainingSpec` JSON from the hyperparameter ``llmops_spec`` in
    ``input/config/hyperparameters.json`` (its ``dataset_uri`` becomes the channel folder ``input/data/dataset``
    when that exists, its ``output_uri`` becomes ``model/``; a tuning job's other hyperparameters, e.g.
    ``learning_rate`` or ``lora.r``, set those spec fields: see :func:`apply_tuned`), the hosts from
    ``input/config/resourceconfig.json``
    (``$SM_HOSTS`` and ``$SM_CURRENT_HOST`` win), and runs the training entry point
    (:mod:`airflow_llmops.ml.train`) under ``torchrun``: ``--nnodes`` = number of hosts, ``--node_rank`` = this
    host's index, ``--nproc_per_node`` = ``$SM_NUM_GPUS`` when > 0, else the spec's ``distributed.nproc_per_node``
    (``auto``: one per GPU, else 1), static rendezvous at ``$LLMOPS_MASTER_ADDR`` (default the first host) and
    ``$LLMOPS_MASTER_PORT`` (default 29500; one host: 127.0.0.1 and a free port). Checkpoints go to
    ``checkpoints/`` and training resumes from the newest complete one found there (SageMaker restores it on every
    host when a managed-spot job restarts). The host of rank 0 writes the model to ``model/``; the others leave
    it empty. ``output/data/`` receives ``status.json``, ``progress.jsonl``, ``spec.json`` and ``train.log``. On
    failure ``output/failure`` holds the reason (SageMaker's ``FailureReason``) and the exit code is non-zero:
    torchrun's (1 when a training process failed), 2 when the container's inputs are unusable, 128 + the signal
    when stopped by SIGTERM (forwarded to torchrun, which stops the training processes).

``serve [ARGS...]``
    ``airflow-llmops serve`` on ``$AIP_HTTP_PORT`` (Vertex AI) > ``$SAGEMAKER_BIND_TO_PORT`` (SageMaker
    multi-container endpoints) > ``$LLMOPS_SERVE_PORT`` > 8080, host ``$LLMOPS_SERVE_HOST`` (default 0.0.0.0),
    serving the model SageMaker extracted to ``model/`` as the variant ``$LLMOPS_VARIANT_NAME`` (default
    ``model``) unless ARGS name a ``--model`` or ``--state-file``; with ``model/`` empty and ``$LLMOPS_MODEL_URI``
    set (a registry version such as ``models:/name/3``), the server loads that from MLflow. The server answers
    SageMaker's ``GET /ping``
    and ``POST /invocations`` next to its own routes.

Vertex AI's contract (a CustomJob replica, detected by ``$CLUSTER_SPEC`` or ``$AIP_MODEL_DIR``; see
:func:`is_vertex`):

``train [--name=value ...]``
    the spec from ``$LLMOPS_SPEC`` (TrainingSpec JSON), with a tuning trial's ``--learning_rate=0.0003`` arguments
    applied (:func:`apply_tuned`); the dataset from ``$LLMOPS_DATASET_URI`` (else the spec's ``dataset_uri``): a
    path or ``file://`` used as it is, a remote folder (``gs://``) downloaded with fsspec first. The replicas are
    ``$CLUSTER_SPEC``'s ``workerpool0`` then ``workerpool1`` entries; node rank = this replica's index among them,
    rendezvous at ``$LLMOPS_MASTER_ADDR`` (default the first workerpool0 host; the port in ``$CLUSTER_SPEC`` is
    Vertex's own) and ``$LLMOPS_MASTER_PORT`` (default 29500), ``nproc_per_node`` as above. The model goes to
    ``$AIP_MODEL_DIR`` from global rank 0 (written locally, then uploaded when remote). Checkpoints: a local or
    ``file://`` ``$AIP_CHECKPOINT_DIR`` is the checkpoints folder; a remote one gets the newest complete checkpoint
    downloaded before training and new ones uploaded every ``$LLMOPS_CHECKPOINT_SYNC_S`` seconds (default 300),
    after training and when stopped (:class:`CheckpointSync`), so a preempted replica resumes. The local working
    folder is ``$LLMOPS_WORK_DIR/<pool>-<index>`` (default ``<tmp>/llmops-runtime/<$CLOUD_ML_JOB_ID>/...``). On
    failure the last stderr line is ``[llmops-failure] <reason>`` (no failure file) and the exit code is as above.
    With ``$LLMOPS_RESULT_URI`` set, the chief also writes the outcome there as JSON (:class:`_VertexOutcome`).
    In a hyperparameter tuning trial (``$LLMOPS_HP_METRIC`` set) the chief reports that metric to Vertex's
    hypertune file (:mod:`airflow_llmops.ml.hypertune`) as the trial's final measurement.

``serve``
    as above, with the model from ``$AIP_STORAGE_URI`` when set (a remote folder downloaded first); the server
    also answers ``GET $AIP_HEALTH_ROUTE`` and ``POST $AIP_PREDICT_ROUTE`` (``{"instances": [...]}`` →
    ``{"predictions": [...]}``), read from the environment by :class:`~airflow_llmops.serving.config.ServerConfig`.

Azure ML's contract (a command job's node, detected by ``$AZUREML_RUN_ID``; see :func:`train_azureml`): ``train``
as on Vertex AI (``$LLMOPS_SPEC``, ``$LLMOPS_DATASET_URI``, ``$LLMOPS_RESULT_URI``), the nodes from Azure ML's
PyTorch distribution with one process per instance (``$NODE_RANK``, ``$AZUREML_NODE_COUNT``, ``$MASTER_ADDR``,
``$MASTER_PORT``), the model to ``$LLMOPS_MODEL_DIR`` and checkpoints to ``$LLMOPS_CHECKPOINT_DIR``. ``serve``
answers Azure ML's liveness/readiness (``/ping``) and scoring (``/invocations``) routes on 8080, with the model
from ``$LLMOPS_MODEL_STORAGE_URI`` (downloaded first when remote).

No Airflow here, and nothing heavy at import: ``torch`` is imported only to count GPUs for ``auto``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from airflow_llmops.ml import hypertune
from airflow_llmops.ml.training.jobdir import CHECKPOINT_PATTERN, STATE_FILE, WEIGHT_FILES, JobDir
from airflow_llmops.specs.base import SpecValidationError
from airflow_llmops.specs.training import TrainingSpec

ENV_OPT_ML = "LLMOPS_OPT_ML"
ENV_MASTER_ADDR = "LLMOPS_MASTER_ADDR"
ENV_MASTER_PORT = "LLMOPS_MASTER_PORT"
ENV_VARIANT_NAME = "LLMOPS_VARIANT_NAME"
DEFAULT_OPT_ML = "/opt/ml"
DEFAULT_MASTER_PORT = 29500
DEFAULT_SERVE_PORT = 8080
DEFAULT_VARIANT_NAME = "model"
SPEC_HYPERPARAMETER = "llmops_spec"
DATASET_CHANNEL = "dataset"
JOB_FOLDER = "llmops-job"  # under output/: the job dir of the training entry point (not uploaded by SageMaker)
PUBLISHED_FILES = ("status.json", "progress.jsonl", "spec.json", "mlflow.json")
FAILURE_MAX_CHARS = 1024  # SageMaker keeps this much of output/failure as the job's FailureReason
EXIT_BAD_INPUT = 2
KILL_AFTER_S = 100.0  # SageMaker sends SIGKILL 120 s after SIGTERM: stop the training processes before that
_TAIL_LINES = 25


class ContractError(Exception):
    """The container's inputs (``/opt/ml``, environment) are unusable; the message says what to change."""


@dataclass(frozen=True)
class OptMl:
    """The ``/opt/ml`` folder of SageMaker's container contract (``$LLMOPS_OPT_ML`` overrides the root)."""

    root: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OptMl:
        env = os.environ if env is None else env
        return cls(Path(env.get(ENV_OPT_ML) or DEFAULT_OPT_ML))

    @property
    def config(self) -> Path:
        return self.root / "input" / "config"

    @property
    def hyperparameters(self) -> Path:
        return self.config / "hyperparameters.json"

    @property
    def resourceconfig(self) -> Path:
        return self.config / "resourceconfig.json"

    def channel(self, name: str) -> Path:
        return self.root / "input" / "data" / name

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def output_data(self) -> Path:
        return self.output / "data"

    @property
    def failure(self) -> Path:
        return self.output / "failure"

    @property
    def job_dir(self) -> Path:
        return self.output / JOB_FOLDER


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ContractError(f"cannot read the {what} {path}: {err}") from None


@dataclass(frozen=True)
class Cluster:
    """The hosts of the job and this one's place among them."""

    hosts: tuple[str, ...]
    current_host: str
    num_gpus: int | None = None

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master_host(self) -> str:
        """Where the rendezvous is when there are several hosts: the first one (it holds global rank 0)."""
        return self.hosts[0]

    @classmethod
    def read(cls, opt_ml: OptMl, env: Mapping[str, str] | None = None) -> Cluster:
        """``resourceconfig.json``, with ``$SM_HOSTS`` (a JSON list), ``$SM_CURRENT_HOST`` and ``$SM_NUM_GPUS``
        winning where set. No file and no variables: one host, ``algo-1``."""
        env = os.environ if env is None else env
        config = _read_json(opt_ml.resourceconfig, "resource config") or {}
        if not isinstance(config, dict):
            raise ContractError(f"{opt_ml.resourceconfig} must hold a JSON object, not {type(config).__name__}")
        hosts: Any = config.get("hosts") or ["algo-1"]
        if env.get("SM_HOSTS"):
            try:
                hosts = json.loads(env["SM_HOSTS"])
            except ValueError as err:
                raise ContractError(f"SM_HOSTS must be a JSON list of host names, got {env['SM_HOSTS']!r}") from err
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ContractError(f"the hosts must be a non-empty list of names, got {hosts!r}")
        if len(set(hosts)) != len(hosts):
            raise ContractError(f"the hosts {hosts} name a host twice")
        current = env.get("SM_CURRENT_HOST") or config.get("current_host") or hosts[0]
        if current not in hosts:
            raise ContractError(f"the current host {current!r} is not one of the hosts {hosts}")
        gpus: int | None = None
        if env.get("SM_NUM_GPUS"):
            try:
                gpus = int(env["SM_NUM_GPUS"])
            except ValueError:
                raise ContractError(f"SM_NUM_GPUS must be a whole number, got {env['SM_NUM_GPUS']!r}") from None
        return cls(tuple(hosts), str(current), gpus)


def load_spec(opt_ml: OptMl) -> TrainingSpec:
    """The hyperparameter ``llmops_spec``: a TrainingSpec as JSON text (a JSON-encoded string of it, as the
    SageMaker Python SDK writes hyperparameters, or an object, work too)."""
    params = _read_json(opt_ml.hyperparameters, "hyperparameters")
    if params is None:
        raise ContractError(
            f"{opt_ml.hyperparameters} is missing: the training job needs the hyperparameter {SPEC_HYPERPARAMETER!r} "
            "holding the TrainingSpec JSON"
        )
    if not isinstance(params, dict) or SPEC_HYPERPARAMETER not in params:
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ContractError(
            f"{opt_ml.hyperparameters} has no {SPEC_HYPERPARAMETER!r} (it has {keys}); set that hyperparameter to "
            "TrainingSpec.to_json()"
        )
    value = params[SPEC_HYPERPARAMETER]
    if isinstance(value, str) and value.lstrip().startswith('"'):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    try:
        spec = TrainingSpec.parse(value) if isinstance(value, dict) else TrainingSpec.from_json(str(value))
    except SpecValidationError as err:
        raise ContractError(f"hyperparameter {SPEC_HYPERPARAMETER!r} is not a valid TrainingSpec: {err}") from None
    tuned = {k: v for k, v in params.items() if k != SPEC_HYPERPARAMETER and not k.startswith(("sagemaker_", "_"))}
    return apply_tuned(spec, tuned) if tuned else spec


def apply_tuned(spec: TrainingSpec, tuned: dict[str, Any]) -> TrainingSpec:
    """A tuning job's values for this trial (``learning_rate``, ``lora.r``: strings, as SageMaker passes them) set
    on the spec; a name that is not a TrainingSpec field is an error, not ignored."""
    data = spec.to_dict()
    for key, raw in tuned.items():
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if leaf not in target and not parents:
            raise ContractError(f"hyperparameter {key!r} is not a TrainingSpec field (tuned values name spec fields)")
        value: Any = raw
        if isinstance(raw, str):
            with contextlib.suppress(ValueError):
                value = json.loads(raw)  # "0.0003" -> 0.0003, "8" -> 8, "true" -> True; other text stays text
        target[leaf] = value
    try:
        return TrainingSpec.parse(data)
    except SpecValidationError as err:
        raise ContractError(f"tuned hyperparameters {tuned} make an invalid TrainingSpec: {err}") from None


def nproc_per_node(spec: TrainingSpec, cluster: Cluster) -> int:
    """``$SM_NUM_GPUS`` when > 0, else the spec's number, else (``auto``) one per GPU, or 1 without one."""
    if cluster.num_gpus:
        return cluster.num_gpus
    if spec.distributed.nproc_per_node != "auto":
        return int(spec.distributed.nproc_per_node)
    try:
        import torch

        return torch.cuda.device_count() or 1
    except ImportError:  # pragma: no cover - the image has torch
        return 1


@dataclass(frozen=True)
class Launch:
    """What this host runs: the spec as the job sees it and torchrun's arguments."""

    spec: TrainingSpec
    nproc: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    """A free port on 127.0.0.1 (one host needs no agreed port; torchrun's workers cannot use port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rendezvous(cluster: Cluster, env: Mapping[str, str]) -> tuple[str, int]:
    """``$LLMOPS_MASTER_ADDR``:``$LLMOPS_MASTER_PORT``, by default the master host and 29500 (one host: 127.0.0.1
    and a free port)."""
    port_text = env.get(ENV_MASTER_PORT) or ""
    try:
        port = int(port_text) if port_text else (DEFAULT_MASTER_PORT if cluster.nnodes > 1 else _free_port())
    except ValueError:
        raise ContractError(f"{ENV_MASTER_PORT} must be a port number, got {port_text!r}") from None
    if cluster.nnodes > 1:
        addr = env.get(ENV_MASTER_ADDR) or cluster.master_host
    else:
        addr = env.get(ENV_MASTER_ADDR) or "127.0.0.1"
    return addr, port


def _launch(
    spec: TrainingSpec, cluster: Cluster, rendezvous: tuple[str, int], *, dataset: str, output: str | None
) -> Launch:
    """The spec as this host's training processes see it: its dataset, model destination, nodes and rendezvous."""
    addr, port = rendezvous
    nproc = nproc_per_node(spec, cluster)
    distributed = spec.distributed.model_copy(
        update={
            "nproc_per_node": nproc,
            "nnodes": cluster.nnodes,
            "node_rank": cluster.node_rank,
            "rdzv_endpoint": f"{addr}:{port}" if cluster.nnodes > 1 else None,
        }
    )
    job_spec = spec.model_copy(update={"dataset_uri": dataset, "output_uri": output, "distributed": distributed})
    return Launch(job_spec, nproc, addr, port)


def plan_launch(spec: TrainingSpec, opt_ml: OptMl, cluster: Cluster, env: Mapping[str, str] | None = None) -> Launch:
    """The spec with the container's paths and hosts in it (dataset channel, model folder, nodes, rendezvous)."""
    env = os.environ if env is None else env
    rendezvous = _rendezvous(cluster, env)
    channel = opt_ml.channel(DATASET_CHANNEL)
    dataset = str(channel) if channel.is_dir() else spec.dataset_uri
    if not dataset:
        raise ContractError(
            f"no dataset: the input channel {DATASET_CHANNEL!r} ({channel}) is missing and the spec has no "
            "dataset_uri; give the training job an input channel named 'dataset' holding the prepared dataset"
        )
    return _launch(spec, cluster, rendezvous, dataset=dataset, output=str(opt_ml.model))


def torchrun_command(launch: Launch, cluster: Cluster, spec_file: Path, job_dir: Path) -> list[str]:
    """``torchrun`` with a static rendezvous: node ranks follow the order of the hosts, so the first host holds
    global rank 0 (and the model)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nproc)]
    argv += ["--nnodes", str(cluster.nnodes), "--node_rank", str(cluster.node_rank), "--max_restarts", "0"]
    argv += ["--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
    argv += ["-m", "airflow_llmops.ml.train", "--spec", str(spec_file), "--job-dir", str(job_dir)]
    return argv


def prepare_job_dir(opt_ml: OptMl) -> JobDir:
    """``output/llmops-job``, whose ``checkpoints`` is a link to the contract's ``checkpoints/`` folder."""
    job = JobDir(opt_ml.job_dir)
    job.root.mkdir(parents=True, exist_ok=True)
    opt_ml.checkpoints.mkdir(parents=True, exist_ok=True)
    opt_ml.model.mkdir(parents=True, exist_ok=True)
    link = job.checkpoints
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise ContractError(f"{link} exists and is not a link to {opt_ml.checkpoints}; remove it")
    link.symlink_to(opt_ml.checkpoints.resolve(), target_is_directory=True)
    return job


def write_failure(opt_ml: OptMl, message: str) -> None:
    """``output/failure``: SageMaker shows its first 1024 characters as the job's FailureReason."""
    text = " ".join(message.split())
    if len(text) > FAILURE_MAX_CHARS:
        text = text[: FAILURE_MAX_CHARS - 3] + "..."
    print(f"[runtime] failed: {message}", file=sys.stderr, flush=True)
    try:
        opt_ml.output.mkdir(parents=True, exist_ok=True)
        opt_ml.failure.write_text(text + "\n", encoding="utf-8")
    except OSError as err:
        print(f"[runtime] cannot write {opt_ml.failure}: {err}", file=sys.stderr, flush=True)


def publish(opt_ml: OptMl, job: JobDir) -> None:
    """Copy the job's records to ``output/data`` (SageMaker uploads it as output.tar.gz)."""
    opt_ml.output_data.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED_FILES:
        source = job.root / name
        if source.is_file():
            with contextlib.suppress(OSError):
                shutil.copyfile(source, opt_ml.output_data / name)


class _Child:
    """torchrun in a process group of its own: its output goes to our stdout and ``train.log`` (the last lines kept
    for a failure message); SIGTERM and SIGINT are forwarded to the group, SIGKILL follows if it lingers."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.signalled: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.signalled = signum
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        print(f"[runtime] got {signal.Signals(signum).name}: stopping the training processes", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        timer = threading.Timer(KILL_AFTER_S, self._kill)
        timer.daemon = True
        timer.start()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                if self.signalled is not None:  # the signal came before the child existed
                    self._forward(self.signalled, None)
                assert self._proc.stdout is not None
                for line in iter(self._proc.stdout.readline, b""):
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                    log.write(line)
                    log.flush()
                    self.tail.append(line.decode("utf-8", errors="replace").rstrip())
                return self._proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_SAGEMAKER_STOP = (
    "SageMaker stops a job, or reclaims a managed-spot instance, this way",
    "the newest complete checkpoint in checkpoints/",
)


def _failure_message(job: JobDir, child: _Child, code: int, stop: tuple[str, str] = _SAGEMAKER_STOP) -> str:
    if child.signalled is not None:
        name = signal.Signals(child.signalled).name
        return f"training stopped by {name} ({stop[0]}); a restart resumes from {stop[1]}"
    status = _read_status(job)
    if status.get("state") == "failed" and status.get("message"):
        return str(status["message"])
    tail = " | ".join(line for line in child.tail if line.strip())[-700:]
    return f"training exited with code {code} without a status; last output: {tail or '(none)'}"


def _read_status(job: JobDir) -> dict[str, Any]:
    try:
        data = json.loads(job.status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def train(env: Mapping[str, str] | None = None, args: Sequence[str] = ()) -> int:
    """Run this host's share of the training job; returns the exit code (see the module docstring). Vertex AI's
    contract when its variables are set (:func:`is_vertex`), Azure ML's when its are (:func:`is_azureml`), else
    SageMaker's."""
    env = dict(os.environ if env is None else env)
    if is_vertex(env) or is_azureml(env):  # their own contracts (below)
        return (train_vertex if is_vertex(env) else train_azureml)(env, args)
    opt_ml = OptMl.from_env(env)
    with contextlib.suppress(FileNotFoundError):
        opt_ml.failure.unlink()  # a previous attempt's reason must not outlive it
    try:
        cluster = Cluster.read(opt_ml, env)
        launch = plan_launch(load_spec(opt_ml), opt_ml, cluster, env)
        job = prepare_job_dir(opt_ml)
    except (ContractError, OSError) as err:
        write_failure(opt_ml, str(err))
        return EXIT_BAD_INPUT
    spec_file = job.root / "spec.json"
    spec_file.write_text(launch.spec.to_json(indent=2), encoding="utf-8")
    argv = torchrun_command(launch, cluster, spec_file, job.root)
    child_env = {**env, "PYTHONUNBUFFERED": "1"}
    if env.get("TRAINING_JOB_NAME"):  # a restarted spot job continues the same MLflow run
        child_env.setdefault("LLMOPS_RUN_KEY", env["TRAINING_JOB_NAME"])
    print(
        f"[runtime] host {cluster.current_host} (node {cluster.node_rank} of {cluster.nnodes}), "
        f"{launch.nproc} process(es); rendezvous {launch.master_addr}:{launch.master_port}; "
        f"dataset {launch.spec.dataset_uri}; checkpoints {opt_ml.checkpoints}",
        flush=True,
    )
    print(f"[runtime] {' '.join(argv)}", flush=True)
    child = _Child(argv, child_env, opt_ml.output_data / "train.log")
    try:
        code = child.run()
    finally:
        publish(opt_ml, job)
    if child.signalled is not None:
        write_failure(opt_ml, _failure_message(job, child, code))
        return 128 + child.signalled
    if code != 0:
        write_failure(opt_ml, _failure_message(job, child, code))
        return code
    status = _read_status(job)
    if status.get("state") != "succeeded":
        write_failure(opt_ml, f"training exited with code 0 but its status is {status or 'missing'}")
        return 1
    return 0


# ---- Vertex AI -------------------------------------------------------------------------------------------------
ENV_CLUSTER_SPEC = "CLUSTER_SPEC"
ENV_AIP_MODEL_DIR = "AIP_MODEL_DIR"
ENV_AIP_CHECKPOINT_DIR = "AIP_CHECKPOINT_DIR"
ENV_SPEC = "LLMOPS_SPEC"
ENV_DATASET_URI = "LLMOPS_DATASET_URI"
#: Where the chief writes the job's result as JSON at the end (optional): a path, ``file://`` or ``gs://`` URI.
ENV_RESULT_URI = "LLMOPS_RESULT_URI"
#: Local working folder of a Vertex AI replica (default: ``<tmp>/llmops-runtime/<job id>``); each replica uses
#: ``<it>/<pool>-<index>`` for its job folder, downloaded dataset and log.
ENV_WORK_DIR = "LLMOPS_WORK_DIR"
#: Seconds between uploads of new checkpoints to a remote ``$AIP_CHECKPOINT_DIR`` while training runs (0: only at
#: the end and when stopped).
ENV_CHECKPOINT_SYNC_S = "LLMOPS_CHECKPOINT_SYNC_S"
DEFAULT_CHECKPOINT_SYNC_S = 300.0
#: Prefix of the last stderr line of a failed Vertex AI replica: the reason (Vertex AI keeps no failure file).
FAILURE_PREFIX = "[llmops-failure] "
VERTEX_FAILURE_MAX_CHARS = 2000
#: The pools whose replicas run the training; workerpool2 and 3 hold reduction or parameter servers (other images).
VERTEX_POOLS = ("workerpool0", "workerpool1")
_POOL_ALIASES = {"chief": "workerpool0", "master": "workerpool0", "worker": "workerpool1"}
_VERTEX_STOP = (
    "Vertex AI stops a job, or preempts a replica, this way",
    f"the newest complete checkpoint in ${ENV_AIP_CHECKPOINT_DIR}",
)


def is_vertex(env: Mapping[str, str]) -> bool:
    """Vertex AI starts a CustomJob's replicas with ``$CLUSTER_SPEC`` and ``$AIP_MODEL_DIR``: either one means its
    contract, else SageMaker's."""
    return bool(env.get(ENV_CLUSTER_SPEC) or env.get(ENV_AIP_MODEL_DIR))


def _host_name(address: str) -> str:
    """``host:2222`` → ``host``, ``[fd00::1]:2222`` → ``fd00::1``: the port in ``$CLUSTER_SPEC`` is Vertex's own."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    host, sep, port = address.rpartition(":")
    return host if sep and host and port.isdigit() and ":" not in host else address


@dataclass(frozen=True)
class VertexCluster(Cluster):
    """The replicas of ``workerpool0`` (the chief first) then ``workerpool1``, in ``$CLUSTER_SPEC`` order; this
    replica's global index is its node rank. Hosts are ``host:port`` entries, so one host may run two replicas."""

    rank: int = 0
    pool: str = VERTEX_POOLS[0]
    index: int = 0

    @property
    def node_rank(self) -> int:
        return self.rank

    @property
    def master_host(self) -> str:
        return _host_name(self.hosts[0])


def parse_cluster_spec(text: str | None) -> VertexCluster:
    """``$CLUSTER_SPEC`` → the replicas and this one's place among them; unset (a job of one replica): one host."""
    if not text:
        return VertexCluster(("localhost",), "localhost")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ContractError(f"{ENV_CLUSTER_SPEC} is not JSON ({err}): {text[:300]!r}") from None
    cluster = data.get("cluster") if isinstance(data, dict) else None
    task = data.get("task") if isinstance(data, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ContractError(f"{ENV_CLUSTER_SPEC} must hold the objects 'cluster' and 'task', got {text[:300]!r}")
    pools: dict[str, Any] = {_POOL_ALIASES.get(str(k), str(k)): v for k, v in cluster.items()}
    hosts: list[str] = []
    first: dict[str, int] = {}
    for pool in VERTEX_POOLS:
        entries = pools.get(pool) or []
        if not isinstance(entries, list) or not all(isinstance(h, str) and h for h in entries):
            raise ContractError(f"{ENV_CLUSTER_SPEC}: cluster.{pool} must be a list of 'host:port', got {entries!r}")
        first[pool] = len(hosts)
        hosts += entries
    if not pools.get(VERTEX_POOLS[0]):
        raise ContractError(f"{ENV_CLUSTER_SPEC} has no replica in workerpool0 (the chief): {text[:300]!r}")
    kind = _POOL_ALIASES.get(str(task.get("type")), str(task.get("type")))
    if kind not in VERTEX_POOLS:
        raise ContractError(
            f"this replica is in {task.get('type')!r}: the runtime trains in workerpool0 and workerpool1 only "
            "(workerpool2 and workerpool3 hold reduction or parameter servers, which run their own images)"
        )
    index = task.get("index", 0)
    size = len(pools.get(kind) or [])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
        raise ContractError(f"{ENV_CLUSTER_SPEC}: task.index {index!r} is not a replica of {kind} ({size} there)")
    rank = first[kind] + index
    return VertexCluster(tuple(hosts), hosts[rank], None, rank=rank, pool=kind, index=index)


def parse_tuned_args(args: Sequence[str]) -> dict[str, str]:
    """A tuning trial's values as Vertex AI passes them: ``--learning_rate=0.0003`` (``--name value`` too; ``-``
    in a name reads as ``_``) → ``{"learning_rate": "0.0003"}``, for :func:`apply_tuned`."""
    tuned: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        name, sep, value = arg[2:].partition("=")
        if not arg.startswith("--") or not name:
            raise ContractError(f"train takes a tuning trial's values as --name=value, got {arg!r} in {items}")
        if not sep:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ContractError(f"{arg} has no value: pass it as {arg}=VALUE")
            i += 1
            value = items[i]
        tuned[name.replace("-", "_")] = value
        i += 1
    return tuned


def load_vertex_spec(env: Mapping[str, str], args: Sequence[str] = ()) -> TrainingSpec:
    """``$LLMOPS_SPEC`` (the TrainingSpec JSON, or a JSON-encoded string of it) with the trial's ``args`` applied."""
    text = env.get(ENV_SPEC) or ""
    if not text.strip():
        raise ContractError(
            f"{ENV_SPEC} is not set: give the job's container the environment variable {ENV_SPEC} holding "
            "TrainingSpec.to_json()"
        )
    if text.lstrip().startswith('"'):
        with contextlib.suppress(ValueError):
            text = str(json.loads(text))
    try:
        spec = TrainingSpec.from_json(text)
    except SpecValidationError as err:
        raise ContractError(f"{ENV_SPEC} is not a valid TrainingSpec: {err}") from None
    tuned = parse_tuned_args(args)
    return apply_tuned(spec, tuned) if tuned else spec


def _local_uri(uri: str) -> Path | None:
    """``file:///a/b`` or ``/a/b`` → the path; ``None`` for a remote URI (``gs://``...)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if not parsed.scheme or len(parsed.scheme) == 1:  # a one-letter "scheme" is a Windows drive
        return Path(uri).expanduser().absolute()
    return None


def download_tree(uri: str, dest: Path) -> int:
    """Copy every file under the remote folder ``uri`` into ``dest`` (emptied first) with fsspec; returns how many.
    fsspec's and its backends' errors (a missing ``gcsfs``, no access) come out as they are."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    count = 0
    for path in sorted(fs.find(root)):
        rel = str(path)[len(root) :].lstrip("/")
        if not rel or ".." in rel.split("/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
        count += 1
    return count


def stage_dataset(uri: str, dest: Path) -> str:
    """The prepared dataset as a local folder: a path or ``file://`` as it is, a remote URI downloaded to ``dest``."""
    local = _local_uri(uri)
    if local is not None:
        if not local.is_dir():
            raise ContractError(
                f"the dataset {uri} does not exist ({local} is not a folder): set {ENV_DATASET_URI} to the prepared "
                "dataset's folder (gs://, file:// or a path)"
            )
        return str(local)
    print(f"[runtime] downloading the dataset {uri} to {dest}", flush=True)
    try:
        count = download_tree(uri, dest)
    except Exception as err:  # fsspec backends raise their own types
        raise ContractError(f"cannot download the dataset {uri}: {type(err).__name__}: {err}") from None
    if count == 0:
        raise ContractError(
            f"the dataset {uri} is missing or empty: set {ENV_DATASET_URI} to the prepared dataset's folder"
        )
    return str(dest)


def _checkpoint_step(name: str) -> int:
    match = CHECKPOINT_PATTERN.match(name)
    return int(match.group(1)) if match else -1


class CheckpointSync:
    """The local checkpoints mirrored in a remote ``$AIP_CHECKPOINT_DIR`` (``gs://``...), with fsspec.

    :meth:`restore` fetches the newest complete remote checkpoint before training (a preempted replica restarts on
    a fresh machine). :meth:`push` uploads: the chief (node 0, where the Trainer saves) its complete checkpoints,
    ``trainer_state.json`` last, so a remote checkpoint holding it is whole, then removes the older remote ones the
    Trainer rotated away; another replica its own files (RNG states) in checkpoints the chief has uploaded.
    """

    def __init__(self, job: JobDir, remote: str, *, chief: bool) -> None:
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(remote)
        except (ImportError, ValueError) as err:
            raise ContractError(
                f"{ENV_AIP_CHECKPOINT_DIR}={remote}: no filesystem for it ({err}); install its fsspec implementation"
            ) from None
        self.root = str(root).rstrip("/")
        self.remote = remote
        self.job = job
        self.chief = chief
        self._lock = threading.Lock()

    def _remote(self) -> dict[str, dict[str, int]]:
        """checkpoint name → {path inside it: size}."""
        found: dict[str, dict[str, int]] = {}
        try:
            listing = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return found
        for path, info in listing.items():
            name, _, inner = str(path)[len(self.root) :].lstrip("/").partition("/")
            if CHECKPOINT_PATTERN.match(name) and inner and info.get("type", "file") != "directory":
                found.setdefault(name, {})[inner] = int(info.get("size") or 0)
        return found

    @staticmethod
    def _complete(files: Mapping[str, int]) -> bool:
        return STATE_FILE in files and any(name in files for name in WEIGHT_FILES)

    def restore(self) -> str | None:
        """Download the newest complete remote checkpoint unless a local one is as new; returns its name."""
        try:
            remote = {name: files for name, files in self._remote().items() if self._complete(files)}
            if not remote:
                return None
            name = max(remote, key=_checkpoint_step)
            local = self.job.latest_checkpoint()
            if local is not None and local.step >= _checkpoint_step(name):
                return None
            target = self.job.checkpoints / name
            print(f"[runtime] downloading checkpoint {self.remote.rstrip('/')}/{name} to {target}", flush=True)
            if target.exists():
                shutil.rmtree(target)
            for inner in sorted(remote[name], key=lambda p: p == STATE_FILE):  # the state last: complete or not
                (target / inner).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{self.root}/{name}/{inner}", str(target / inner))
            return name
        except Exception as err:  # fsspec backends raise their own types
            raise ContractError(
                f"cannot read the checkpoints in {ENV_AIP_CHECKPOINT_DIR}={self.remote}: {type(err).__name__}: {err}"
            ) from None

    def push(self) -> list[str]:
        """Upload what the remote folder lacks (see the class); returns the checkpoints written to."""
        with self._lock:
            remote = self._remote()
            if self.chief:
                names = [c.path.name for c in self.job.complete_checkpoints()]
                todo = [n for n in names if not self._complete(remote.get(n, {}))]
            else:
                names = todo = [
                    n for n in sorted(remote, key=_checkpoint_step)
                    if self._complete(remote[n]) and (self.job.checkpoints / n).is_dir()
                ]  # fmt: skip
            written = [name for name in todo if self._upload(name, remote.get(name, {}))]
            if self.chief and names:
                newest = max(_checkpoint_step(n) for n in names)
                for name in remote:
                    if name not in names and _checkpoint_step(name) < newest:
                        self.fs.rm(f"{self.root}/{name}", recursive=True)
            return written

    def _upload(self, name: str, present: Mapping[str, int]) -> bool:
        folder = self.job.checkpoints / name
        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name == STATE_FILE, str(p)))
        sent = False
        for path in files:
            inner = path.relative_to(folder).as_posix()
            if not self.chief and inner in present:
                continue  # another replica adds its own files only
            self.fs.put_file(str(path), f"{self.root}/{name}/{inner}")
            sent = True
        return sent

    def push_quietly(self) -> None:
        """:meth:`push`, best effort: a failure is reported on stdout and training goes on."""
        try:
            written = self.push()
        except Exception as err:  # fsspec backends raise their own types; a checkpoint may be rotated away meanwhile
            print(f"[runtime] checkpoint upload to {self.remote} failed: {type(err).__name__}: {err}", flush=True)
            return
        if written:
            print(f"[runtime] uploaded {', '.join(written)} to {self.remote}", flush=True)


class _PeriodicSync:
    """:meth:`CheckpointSync.push_quietly` every ``interval`` seconds in a daemon thread, until :meth:`stop`."""

    def __init__(self, sync: CheckpointSync, interval: float) -> None:
        self.sync = sync
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-sync", daemon=True)

    def start(self) -> _PeriodicSync:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync.push_quietly()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class VertexJob:
    """A Vertex AI replica's folders: ``work`` (local: job folder, downloaded dataset, log), ``model_dir``
    (``$AIP_MODEL_DIR``) and ``checkpoint_dir`` (``$AIP_CHECKPOINT_DIR``) as given."""

    work: Path
    model_dir: str | None = None
    checkpoint_dir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], cluster: VertexCluster) -> VertexJob:
        job_id = re.sub(r"[^A-Za-z0-9._-]", "_", env.get("CLOUD_ML_JOB_ID") or "job")
        base = Path(env.get(ENV_WORK_DIR) or Path(tempfile.gettempdir()) / "llmops-runtime" / job_id)
        return cls(
            base / f"{cluster.pool}-{cluster.index}",
            env.get(ENV_AIP_MODEL_DIR) or None,
            env.get(ENV_AIP_CHECKPOINT_DIR) or None,
        )

    @property
    def job(self) -> JobDir:
        return JobDir(self.work / JOB_FOLDER)

    @property
    def dataset(self) -> Path:
        return self.work / "dataset"

    @property
    def log(self) -> Path:
        return self.work / "train.log"

    @property
    def checkpoints_remote(self) -> bool:
        return self.checkpoint_dir is not None and _local_uri(self.checkpoint_dir) is None

    def prepare(self) -> JobDir:
        """The job folder; its ``checkpoints`` is a link to a local ``$AIP_CHECKPOINT_DIR``, else a folder of its
        own (mirrored to a remote one by :class:`CheckpointSync`)."""
        job = self.job
        job.root.mkdir(parents=True, exist_ok=True)
        link = job.checkpoints
        local = _local_uri(self.checkpoint_dir) if self.checkpoint_dir else None
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                raise ContractError(f"{link} exists and is not a link to {local}; remove it")
            link.symlink_to(local.resolve(), target_is_directory=True)
        else:
            if link.is_symlink():
                link.unlink()
            link.mkdir(exist_ok=True)
        return job


def plan_vertex_launch(
    spec: TrainingSpec,
    cluster: Cluster,
    env: Mapping[str, str],
    *,
    dataset: str,
    output: str | None,
    rendezvous: tuple[str, int] | None = None,
) -> Launch:
    """The spec with this replica's place in it: the local dataset, the model's destination (``$AIP_MODEL_DIR``),
    nodes and rendezvous (``rendezvous`` when already chosen, else from ``env``)."""
    where = rendezvous if rendezvous is not None else _rendezvous(cluster, env)
    return _launch(spec, cluster, where, dataset=dataset, output=output)


def _sync_interval(env: Mapping[str, str]) -> float:
    text = env.get(ENV_CHECKPOINT_SYNC_S) or ""
    try:
        value = float(text) if text else DEFAULT_CHECKPOINT_SYNC_S
    except ValueError:
        raise ContractError(f"{ENV_CHECKPOINT_SYNC_S} must be a number of seconds, got {text!r}") from None
    return max(value, 0.0)


def vertex_failure(message: str, code: int) -> int:
    """Print the reason as the last stderr line, ``[llmops-failure] ...`` on one line; returns ``code``."""
    text = " ".join(message.split())
    if len(text) > VERTEX_FAILURE_MAX_CHARS:
        text = text[: VERTEX_FAILURE_MAX_CHARS - 3] + "..."
    sys.stdout.flush()
    print(FAILURE_PREFIX + text, file=sys.stderr, flush=True)
    return code


def write_result(uri: str, payload: Mapping[str, Any]) -> None:
    """``payload`` as JSON at ``uri`` (a path, ``file://`` or a remote URI written with fsspec); best effort: a
    failure is reported on stdout."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    try:
        local = _local_uri(uri)
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, local)
        else:
            import fsspec

            with fsspec.open(uri, "w", encoding="utf-8") as handle:
                handle.write(text)
    except Exception as err:  # fsspec backends raise their own types
        print(f"[runtime] cannot write the result {uri}: {type(err).__name__}: {err}", flush=True)


class _VertexOutcome:
    """How a replica ends: the ``[llmops-failure]`` line, and on the chief the ``$LLMOPS_RESULT_URI`` record
    (``{"state": "succeeded", "metrics", "mlflow_run_id", ...}`` or ``{"state": "failed", "message", "exit_code",
    "log_tail"}``) for whoever started the job."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.uri = env.get(ENV_RESULT_URI) or None
        self.chief = True  # until the cluster is known: a broken CLUSTER_SPEC breaks every replica alike
        self.tuned: dict[str, str] = {}  # a tuning trial's values, as the service passed them

    def _record(self, payload: dict[str, Any]) -> None:
        if self.uri is not None and self.chief:
            write_result(self.uri, {**payload, **({"tuned": self.tuned} if self.tuned else {})})

    def failed(self, message: str, code: int, tail: Sequence[str] = ()) -> int:
        lines = [line for line in tail if line.strip()]
        self._record({"state": "failed", "message": message, "exit_code": code, "log_tail": lines})
        return vertex_failure(message, code)

    def succeeded(self, status: Mapping[str, Any], env: Mapping[str, str]) -> int:
        if self.chief and env.get(hypertune.ENV_METRIC):  # a tuning trial: its final measurement
            metrics = status.get("metrics") or {}
            try:
                line = hypertune.report(metrics, int(status.get("global_step") or 0), env)
            except Exception as err:  # the service cannot score the trial: it failed
                return self.failed(
                    f"the trial could not report {env[hypertune.ENV_METRIC]} to the tuning service: "
                    f"{type(err).__name__}: {err}",
                    1,
                )
            if line is None:
                print(
                    f"[runtime] the tuned metric {env[hypertune.ENV_METRIC]!r} is not among the training's metrics "
                    f"{sorted(metrics)}: this trial reports no measurement",
                    flush=True,
                )
            else:
                print(f"[runtime] hypertune: {line}", flush=True)
        keys = ("metrics", "mlflow_run_id", "resumed_from_step", "world_size", "global_step", "model_uri")
        self._record({"state": "succeeded", **{k: status.get(k) for k in keys}})
        return 0


def _run_node(
    argv: list[str],
    child_env: Mapping[str, str],
    *,
    log: Path,
    job: JobDir,
    sync: CheckpointSync | None,
    interval: float,
    outcome: _VertexOutcome,
    stop: tuple[str, str],
    env: Mapping[str, str],
) -> int:
    """Run this node's torchrun (Vertex AI, Azure ML): checkpoints synced while it runs and after it ends (failed
    or stopped too: a restart resumes from what is uploaded), then the outcome recorded."""
    print(f"[runtime] {' '.join(argv)}", flush=True)
    child = _Child(argv, child_env, log)
    periodic = _PeriodicSync(sync, interval).start() if sync is not None and interval > 0 else None
    try:
        code = child.run()
    finally:
        if periodic is not None:
            periodic.stop()
        if sync is not None:
            sync.push_quietly()
    if child.signalled is not None:
        return outcome.failed(_failure_message(job, child, code, stop), 128 + child.signalled, child.tail)
    if code != 0:
        return outcome.failed(_failure_message(job, child, code, stop), code, child.tail)
    status = _read_status(job)
    if status.get("state") != "succeeded":
        return outcome.failed(f"training exited with code 0 but its status is {status or 'missing'}", 1, child.tail)
    return outcome.succeeded(status, env)


def train_vertex(env: Mapping[str, str] | None = None, args: Sequence[str] = ()) -> int:
    """This replica's share of a Vertex AI CustomJob; returns the exit code (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    outcome = _VertexOutcome(env)
    try:
        cluster = parse_cluster_spec(env.get(ENV_CLUSTER_SPEC))
        outcome.chief = cluster.node_rank == 0
        spec = load_vertex_spec(env, args)
        outcome.tuned = parse_tuned_args(args)
        rendezvous = _rendezvous(cluster, env)
        interval = _sync_interval(env)
        vjob = VertexJob.from_env(env, cluster)
        dataset_uri = env.get(ENV_DATASET_URI) or spec.dataset_uri
        if not dataset_uri:
            raise ContractError(
                f"no dataset: set {ENV_DATASET_URI} to the prepared dataset's folder (gs://, file:// or a path)"
            )
        dataset = stage_dataset(dataset_uri, vjob.dataset)
        job = vjob.prepare()
        sync = None
        if vjob.checkpoints_remote:
            assert vjob.checkpoint_dir is not None
            sync = CheckpointSync(job, vjob.checkpoint_dir, chief=cluster.node_rank == 0)
            sync.restore()
        output = vjob.model_dir or spec.output_uri
        launch = plan_vertex_launch(spec, cluster, env, dataset=dataset, output=output, rendezvous=rendezvous)
        spec_file = job.root / "spec.json"
        spec_file.write_text(launch.spec.to_json(indent=2), encoding="utf-8")
    except (ContractError, OSError) as err:
        return outcome.failed(str(err), EXIT_BAD_INPUT)
    argv = torchrun_command(launch, cluster, spec_file, job.root)
    child_env = {**env, "PYTHONUNBUFFERED": "1"}
    if env.get("CLOUD_ML_JOB_ID"):  # a restarted replica, and each trial of a tuning job, keep one MLflow run
        trial = env.get("CLOUD_ML_TRIAL_ID")
        child_env.setdefault("LLMOPS_RUN_KEY", env["CLOUD_ML_JOB_ID"] + (f"-trial-{trial}" if trial else ""))
    print(
        f"[runtime] Vertex AI replica {cluster.pool}[{cluster.index}] (node {cluster.node_rank} of {cluster.nnodes}), "
        f"{launch.nproc} process(es); rendezvous {launch.master_addr}:{launch.master_port}; "
        f"dataset {launch.spec.dataset_uri}; checkpoints {vjob.checkpoint_dir or job.checkpoints}; "
        f"model {launch.spec.output_uri or job.model}",
        flush=True,
    )
    return _run_node(
        argv,
        child_env,
        log=vjob.log,
        job=job,
        sync=sync,
        interval=interval,
        outcome=outcome,
        stop=_VERTEX_STOP,
        env=env,
    )


# ---- Azure ML --------------------------------------------------------------------------------------------------
#: Azure ML sets these in every job; either one means its contract (a command job's node).
AZUREML_MARKERS = ("AZUREML_RUN_ID", "AZUREML_JOB_ID")
#: Where the model and the checkpoints go (fsspec URIs: abfs://, file://, a path); Azure ML's own variables for
#: mounted outputs named ``model`` / ``checkpoints`` (``$AZURE_ML_OUTPUT_model``) are read when these are unset.
ENV_MODEL_DIR = "LLMOPS_MODEL_DIR"
ENV_CHECKPOINT_DIR = "LLMOPS_CHECKPOINT_DIR"
_AZUREML_STOP = (
    "Azure ML stops a job, or preempts a low-priority node, this way",
    f"the newest complete checkpoint in ${ENV_CHECKPOINT_DIR}",
)


#: A sweep trial's outputs: ``<uri>/<$AZUREML_RUN_ID>/model``, ``.../checkpoints``, ``.../llmops/result.json``
#: (each trial of one sweep job gets its own folder; the adapter finds the best trial's model there).
ENV_TRIAL_OUTPUT_URI = "LLMOPS_TRIAL_OUTPUT_URI"
#: The pipeline's MLflow server (empty: no tracking). Azure ML sets ``$MLFLOW_TRACKING_URI`` / ``$MLFLOW_RUN_ID``
#: to the workspace's own tracking server in every job, over what the job asked for, so the adapter passes the
#: pipeline's under this name.
ENV_PIPELINE_TRACKING_URI = "LLMOPS_MLFLOW_TRACKING_URI"
#: What Azure ML injects for its own MLflow server (and must not reach the pipeline's: the token is a credential).
_AZUREML_MLFLOW = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_TOKEN")


def is_azureml(env: Mapping[str, str]) -> bool:
    return any(env.get(name) for name in AZUREML_MARKERS)


def azureml_env(env: Mapping[str, str]) -> dict[str, str]:
    """Azure ML's job environment as the training needs it:

    - a sweep trial (``$LLMOPS_TRIAL_OUTPUT_URI``): its model, checkpoints and result under its own run's folder;
    - a sweep trial (``$LLMOPS_HP_METRIC``): the workspace's MLflow run that Azure ML created for the trial kept as
      ``$LLMOPS_HP_MLFLOW_URI`` / ``$LLMOPS_HP_MLFLOW_RUN_ID``, where the trial reports the tuned metric;
    - ``$LLMOPS_MLFLOW_TRACKING_URI`` set: the training logs there (Azure ML's MLflow variables removed, its token
      included); unset: Azure ML's own MLflow stays, as in any Azure ML job."""
    out = dict(env)
    run = next((env[m] for m in AZUREML_MARKERS if env.get(m)), "")
    base = env.get(ENV_TRIAL_OUTPUT_URI, "").rstrip("/")
    if base:
        if not run:
            raise ContractError(f"{ENV_TRIAL_OUTPUT_URI} is set but Azure ML gave the trial no AZUREML_RUN_ID")
        out[ENV_MODEL_DIR] = f"{base}/{run}/model"
        out[ENV_CHECKPOINT_DIR] = f"{base}/{run}/checkpoints"
        out[ENV_RESULT_URI] = f"{base}/{run}/llmops/result.json"
    if env.get(hypertune.ENV_METRIC) and not env.get(hypertune.ENV_MLFLOW_RUN):
        if not (env.get("MLFLOW_TRACKING_URI") and env.get("MLFLOW_RUN_ID")):
            raise ContractError(
                "a sweep trial reports its metric to the MLflow run Azure ML creates for it, but MLFLOW_TRACKING_URI "
                "/ MLFLOW_RUN_ID are not set (is this a sweep job's trial?)"
            )
        out[hypertune.ENV_MLFLOW_URI] = env["MLFLOW_TRACKING_URI"]
        out[hypertune.ENV_MLFLOW_RUN] = env["MLFLOW_RUN_ID"]
        if env.get("MLFLOW_TRACKING_TOKEN"):  # for Azure's server only (hypertune.report), never the pipeline's
            out[hypertune.ENV_MLFLOW_TOKEN] = env["MLFLOW_TRACKING_TOKEN"]
    if ENV_PIPELINE_TRACKING_URI in env:
        for name in _AZUREML_MLFLOW:
            out.pop(name, None)
        pipeline = out.pop(ENV_PIPELINE_TRACKING_URI)
        if pipeline:
            out["MLFLOW_TRACKING_URI"] = pipeline
        else:
            out.pop("MLFLOW_TRACKING_URI", None)
    return out


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name) or ""
    try:
        return int(text) if text else default
    except ValueError:
        raise ContractError(f"{name} must be a whole number, got {text!r}") from None


def azureml_cluster(env: Mapping[str, str]) -> Cluster:
    """The nodes of an Azure ML command job with a PyTorch distribution of one process per instance: node rank
    ``$NODE_RANK``, nodes ``$AZUREML_NODE_COUNT`` (else ``$WORLD_SIZE``, which one process per node makes equal),
    the rendezvous host ``$MASTER_ADDR`` (the node of rank 0)."""
    nnodes = _int_env(env, "AZUREML_NODE_COUNT", _int_env(env, "WORLD_SIZE", 1))
    rank = _int_env(env, "NODE_RANK", 0)
    if nnodes < 1 or not 0 <= rank < nnodes:
        raise ContractError(f"NODE_RANK {rank} is not a node of the job's {nnodes} (AZUREML_NODE_COUNT/WORLD_SIZE)")
    master = env.get("MASTER_ADDR") or "127.0.0.1"
    hosts = (master, *(f"node-{i}" for i in range(1, nnodes)))
    return Cluster(hosts, hosts[rank])


def train_azureml(env: Mapping[str, str] | None = None, args: Sequence[str] = ()) -> int:
    """This node's share of an Azure ML command job; returns the exit code.

    The spec from ``$LLMOPS_SPEC`` (a sweep trial's ``--name=value`` arguments applied), the dataset from
    ``$LLMOPS_DATASET_URI`` (or the mounted input ``$AZURE_ML_INPUT_dataset``), the nodes from Azure ML's PyTorch
    variables (:func:`azureml_cluster`); torchrun runs the spec's ``nproc_per_node`` processes per node with the
    rendezvous at ``$MASTER_ADDR``:``$MASTER_PORT`` (``$LLMOPS_MASTER_*`` win). The model goes to
    ``$LLMOPS_MODEL_DIR`` from global rank 0, checkpoints to ``$LLMOPS_CHECKPOINT_DIR`` (remote: synced as on
    Vertex AI, so a preempted low-priority job resumes), the outcome to ``$LLMOPS_RESULT_URI``; the local working
    folder is ``$LLMOPS_WORK_DIR/node-<rank>`` (default ``<tmp>/llmops-runtime/<$AZUREML_RUN_ID>``)."""
    env = dict(os.environ if env is None else env)
    try:
        env = azureml_env(env)
    except ContractError as err:
        return _VertexOutcome(env).failed(str(err), EXIT_BAD_INPUT)
    outcome = _VertexOutcome(env)
    try:
        cluster = azureml_cluster(env)
        outcome.chief = cluster.node_rank == 0
        spec = load_vertex_spec(env, args)
        outcome.tuned = parse_tuned_args(args)
        where = (
            env.get(ENV_MASTER_ADDR) or cluster.master_host,
            _int_env(env, ENV_MASTER_PORT, _int_env(env, "MASTER_PORT", DEFAULT_MASTER_PORT)),
        )
        if cluster.nnodes == 1 and not (env.get(ENV_MASTER_PORT) or env.get("MASTER_PORT")):
            where = ("127.0.0.1", _free_port())
        interval = _sync_interval(env)
        run_id = re.sub(r"[^A-Za-z0-9._-]", "_", next((env[m] for m in AZUREML_MARKERS if env.get(m)), "job"))
        base = Path(env.get(ENV_WORK_DIR) or Path(tempfile.gettempdir()) / "llmops-runtime" / run_id)
        vjob = VertexJob(
            base / f"node-{cluster.node_rank}",
            env.get(ENV_MODEL_DIR) or env.get("AZURE_ML_OUTPUT_model") or None,
            env.get(ENV_CHECKPOINT_DIR) or env.get("AZURE_ML_OUTPUT_checkpoints") or None,
        )
        dataset_uri = env.get(ENV_DATASET_URI) or env.get("AZURE_ML_INPUT_dataset") or spec.dataset_uri
        if not dataset_uri:
            raise ContractError(
                f"no dataset: set {ENV_DATASET_URI} to the prepared dataset's folder (abfs://, file:// or a path)"
            )
        dataset = stage_dataset(dataset_uri, vjob.dataset)
        job = vjob.prepare()
        sync = None
        if vjob.checkpoints_remote:
            assert vjob.checkpoint_dir is not None
            sync = CheckpointSync(job, vjob.checkpoint_dir, chief=outcome.chief)
            sync.restore()
        output = vjob.model_dir or spec.output_uri
        launch = plan_vertex_launch(spec, cluster, env, dataset=dataset, output=output, rendezvous=where)
        spec_file = job.root / "spec.json"
        spec_file.write_text(launch.spec.to_json(indent=2), encoding="utf-8")
    except (ContractError, OSError) as err:
        return outcome.failed(str(err), EXIT_BAD_INPUT)
    argv = torchrun_command(launch, cluster, spec_file, job.root)
    child_env = {**env, "PYTHONUNBUFFERED": "1"}
    child_env.setdefault("LLMOPS_RUN_KEY", run_id)  # a resumed job keeps its MLflow run
    print(
        f"[runtime] Azure ML node {cluster.node_rank} of {cluster.nnodes}, {launch.nproc} process(es); rendezvous "
        f"{launch.master_addr}:{launch.master_port}; dataset {launch.spec.dataset_uri}; checkpoints "
        f"{vjob.checkpoint_dir or job.checkpoints}; model {launch.spec.output_uri or job.model}",
        flush=True,
    )
    return _run_node(
        argv,
        child_env,
        log=vjob.log,
        job=job,
        sync=sync,
        interval=interval,
        outcome=outcome,
        stop=_AZUREML_STOP,
        env=env,
    )


# ---- serve ----------------------------------------------------------------------------------------------------
#: A registry URI the server loads at start when the platform put no model files in model/ (SageMaker: a Model
#: whose container has no ModelDataUrl).
ENV_MODEL_URI = "LLMOPS_MODEL_URI"
#: Vertex AI: where it copied the Model's artifactUri (a ``gs://`` folder).
ENV_AIP_STORAGE_URI = "AIP_STORAGE_URI"
#: Azure ML: the model folder a deployment serves (``abfs://``, ``file://``; downloaded first when remote).
ENV_MODEL_STORAGE_URI = "LLMOPS_MODEL_STORAGE_URI"


def serve_port(env: Mapping[str, str]) -> str:
    """``$AIP_HTTP_PORT`` > ``$SAGEMAKER_BIND_TO_PORT`` > ``$LLMOPS_SERVE_PORT`` > 8080."""
    for name in ("AIP_HTTP_PORT", "SAGEMAKER_BIND_TO_PORT", "LLMOPS_SERVE_PORT"):
        if env.get(name):
            return env[name]
    return str(DEFAULT_SERVE_PORT)


def _names_variants(args: Sequence[str]) -> bool:
    flags = ("--model", "--state-file")
    return any(a in flags or a.startswith(tuple(f"{f}=" for f in flags)) for a in args)


def vertex_model(env: Mapping[str, str]) -> Path:
    """The model folder of ``$AIP_STORAGE_URI`` (Vertex AI copies the Model's ``artifactUri`` there): a path or
    ``file://`` as it is, a remote folder (``gs://``) downloaded with fsspec under ``$LLMOPS_WORK_DIR`` (default
    ``<tmp>/llmops-runtime``) first."""
    uri = env[ENV_AIP_STORAGE_URI]
    local = _local_uri(uri)
    if local is not None:
        if not local.is_dir() or not any(local.iterdir()):
            raise ContractError(
                f"no model to serve: {ENV_AIP_STORAGE_URI}={uri} ({local}) is "
                f"{'empty' if local.is_dir() else 'missing'}. Vertex AI copies the Model's artifactUri there; give "
                "the model one, or pass --model NAME=SOURCE"
            )
        return local
    dest = Path(env.get(ENV_WORK_DIR) or Path(tempfile.gettempdir()) / "llmops-runtime") / "serving-model"
    print(f"[runtime] downloading the model {uri} to {dest}", flush=True)
    try:
        count = download_tree(uri, dest)
    except Exception as err:  # fsspec backends raise their own types
        raise ContractError(
            f"cannot download the model {ENV_AIP_STORAGE_URI}={uri}: {type(err).__name__}: {err}"
        ) from None
    if count == 0:
        raise ContractError(f"no model to serve: {ENV_AIP_STORAGE_URI}={uri} is empty or missing")
    return dest


def serve_argv(args: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The ``airflow-llmops serve`` arguments: host and port from the environment, then ``--model`` unless
    ``args`` name variants, then ``args`` (which win: argparse keeps the last value). The model: Vertex AI's
    ``$AIP_STORAGE_URI`` when set (downloaded when remote, see :func:`vertex_model`), else ``model/``, or
    ``$LLMOPS_MODEL_URI`` when ``model/`` is empty."""
    env = os.environ if env is None else env
    argv = ["--host", env.get("LLMOPS_SERVE_HOST") or "0.0.0.0", "--port", serve_port(env)]
    if not _names_variants(args) and env.get(ENV_AIP_STORAGE_URI):
        name = env.get(ENV_VARIANT_NAME) or DEFAULT_VARIANT_NAME
        return [*argv, "--model", f"{name}={vertex_model(env)}", *args]
    if not _names_variants(args) and env.get(ENV_MODEL_STORAGE_URI):  # Azure ML: the deployment's model folder
        name = env.get(ENV_VARIANT_NAME) or DEFAULT_VARIANT_NAME
        folder = vertex_model({**env, ENV_AIP_STORAGE_URI: env[ENV_MODEL_STORAGE_URI]})
        return [*argv, "--model", f"{name}={folder}", *args]
    if not _names_variants(args):
        model = OptMl.from_env(env).model
        registry = env.get(ENV_MODEL_URI, "")
        if registry and (not model.is_dir() or not any(model.iterdir())):
            # A registry version (models:/name/3): the server loads it from MLflow ($MLFLOW_TRACKING_URI).
            name = env.get(ENV_VARIANT_NAME) or DEFAULT_VARIANT_NAME
            return [*argv, "--model", f"{name}={registry}", *args]
        if not model.is_dir() or not any(model.iterdir()):
            raise ContractError(
                f"no model to serve: {model} is {'empty' if model.is_dir() else 'missing'}. SageMaker extracts the "
                "model's ModelDataUrl (model.tar.gz) there; give the model one, or pass --model NAME=SOURCE"
            )
        argv += ["--model", f"{env.get(ENV_VARIANT_NAME) or DEFAULT_VARIANT_NAME}={model}"]
    return argv + list(args)


def serve(args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    try:
        argv = serve_argv(args, env)
    except (ContractError, OSError) as err:
        print(f"[runtime] cannot serve: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    from airflow_llmops.serving.server import main as serve_main

    return serve_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_llmops.ml.runtime",
        description="SageMaker's and Vertex AI's container contracts: `train` runs this host's share of a training "
        f"job, `serve` the model server. ${ENV_OPT_ML} replaces /opt/ml.",
    )
    parser.add_argument("command", choices=["train", "serve"])
    parser.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="serve: more `airflow-llmops serve` arguments; train on Vertex AI: a tuning trial's --name=value",
    )
    parsed = parser.parse_args(argv)
    if parsed.command == "train":
        if is_vertex(os.environ) or is_azureml(os.environ):
            return train(args=parsed.args)
        if parsed.args:
            parser.error(f"train takes no arguments (the spec is the hyperparameter {SPEC_HYPERPARAMETER!r})")
        return train()
    return serve(parsed.args)


if __name__ == "__main__":
    sys.exit(main())
