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

No Airflow here, and nothing heavy at import: ``torch`` is imported only to count GPUs for ``auto``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from airflow_llmops.ml.training.jobdir import JobDir
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


def plan_launch(spec: TrainingSpec, opt_ml: OptMl, cluster: Cluster, env: Mapping[str, str] | None = None) -> Launch:
    """The spec with the container's paths and hosts in it (dataset channel, model folder, nodes, rendezvous)."""
    env = os.environ if env is None else env
    port_text = env.get(ENV_MASTER_PORT) or ""
    try:
        port = int(port_text) if port_text else (DEFAULT_MASTER_PORT if cluster.nnodes > 1 else _free_port())
    except ValueError:
        raise ContractError(f"{ENV_MASTER_PORT} must be a port number, got {port_text!r}") from None
    if cluster.nnodes > 1:
        addr = env.get(ENV_MASTER_ADDR) or cluster.hosts[0]
    else:
        addr = env.get(ENV_MASTER_ADDR) or "127.0.0.1"
    nproc = nproc_per_node(spec, cluster)
    channel = opt_ml.channel(DATASET_CHANNEL)
    dataset = str(channel) if channel.is_dir() else spec.dataset_uri
    if not dataset:
        raise ContractError(
            f"no dataset: the input channel {DATASET_CHANNEL!r} ({channel}) is missing and the spec has no "
            "dataset_uri; give the training job an input channel named 'dataset' holding the prepared dataset"
        )
    distributed = spec.distributed.model_copy(
        update={
            "nproc_per_node": nproc,
            "nnodes": cluster.nnodes,
            "node_rank": cluster.node_rank,
            "rdzv_endpoint": f"{addr}:{port}" if cluster.nnodes > 1 else None,
        }
    )
    job_spec = spec.model_copy(
        update={"dataset_uri": dataset, "output_uri": str(opt_ml.model), "distributed": distributed}
    )
    return Launch(job_spec, nproc, addr, port)


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


def _failure_message(job: JobDir, child: _Child, code: int) -> str:
    if child.signalled is not None:
        name = signal.Signals(child.signalled).name
        return (
            f"training stopped by {name} (SageMaker stops a job, or reclaims a managed-spot instance, this way); "
            f"a restart resumes from the newest complete checkpoint in checkpoints/"
        )
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


def train(env: Mapping[str, str] | None = None) -> int:
    """Run this host's share of the training job; returns the exit code (see the module docstring)."""
    env = dict(os.environ if env is None else env)
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


# ---- serve ----------------------------------------------------------------------------------------------------
#: A registry URI the server loads at start when the platform put no model files in model/ (SageMaker: a Model
#: whose container has no ModelDataUrl).
ENV_MODEL_URI = "LLMOPS_MODEL_URI"


def serve_port(env: Mapping[str, str]) -> str:
    """``$AIP_HTTP_PORT`` > ``$SAGEMAKER_BIND_TO_PORT`` > ``$LLMOPS_SERVE_PORT`` > 8080."""
    for name in ("AIP_HTTP_PORT", "SAGEMAKER_BIND_TO_PORT", "LLMOPS_SERVE_PORT"):
        if env.get(name):
            return env[name]
    return str(DEFAULT_SERVE_PORT)


def _names_variants(args: Sequence[str]) -> bool:
    flags = ("--model", "--state-file")
    return any(a in flags or a.startswith(tuple(f"{f}=" for f in flags)) for a in args)


def serve_argv(args: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The ``airflow-llmops serve`` arguments: host and port from the environment, then ``--model`` for
    ``model/`` unless ``args`` name variants, then ``args`` (which win: argparse keeps the last value)."""
    env = os.environ if env is None else env
    argv = ["--host", env.get("LLMOPS_SERVE_HOST") or "0.0.0.0", "--port", serve_port(env)]
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
        description="SageMaker's container contract: `train` runs this host's share of a training job, `serve` "
        f"the model server. ${ENV_OPT_ML} replaces /opt/ml.",
    )
    parser.add_argument("command", choices=["train", "serve"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="serve: more `airflow-llmops serve` arguments")
    parsed = parser.parse_args(argv)
    if parsed.command == "train":
        if parsed.args:
            parser.error(f"train takes no arguments (the spec is the hyperparameter {SPEC_HYPERPARAMETER!r})")
        return train()
    return serve(parsed.args)


if __name__ == "__main__":
    sys.exit(main())
