"""The local platform: training jobs are torchrun process groups on this machine (or several, by rendezvous).

A job lives in ``<jobs_root>/<job_name>/``: the spec, the launcher's log, the training entry point's
``progress.jsonl``, ``checkpoints/`` and ``status.json``. Everything the platform knows is on disk, so any
process (a worker, the triggerer, a retry on another worker sharing the folder) can poll, re-attach or cancel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from airflow_llmops.jsonfiles import read_json_object, write_json_atomic
from airflow_llmops.platforms.base import JobHandle, JobState, JobStatus
from airflow_llmops.processes import ProcessRecord, child_env, free_port
from airflow_llmops.specs import TrainingSpec

PID_FILE = "launcher.json"
# Set on the launcher and inherited by every process of the job. torchrun starts each worker in a session of
# its own, so the launcher's process group does not hold the workers: this marker finds them.
JOB_MARKER = "LLMOPS_LOCAL_JOB_DIR"


def job_processes(job_dir: Path) -> list[Any]:
    """Every live process of the job (launcher and workers), found by the marker in their environment."""
    import psutil

    wanted = str(job_dir)
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(JOB_MARKER) == wanted and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def terminate_job(job_dir: Path, *, grace: float = 15.0, sig: int = signal.SIGTERM) -> int:
    """Signal every process of the job, SIGKILL what is left after ``grace`` seconds; returns how many."""
    import psutil

    procs = job_processes(job_dir)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


#: A job launched on another host (another container) is judged by its files: one that wrote nothing for this
#: long is taken for dead.
HEARTBEAT_STALE_S = 300.0


def launcher_alive(launcher: dict[str, Any] | None, job_dir: Path | None = None) -> bool:
    """Whether the launcher a ``launcher.json`` names still runs (not merely its pid: pids are reused).

    Records written before the create time was kept are judged by their ``started_at``
    (see :class:`~airflow_llmops.processes.ProcessRecord`). A launcher on another host (the worker's container,
    asked from the triggerer's) cannot be seen: it is alive while the job's files keep changing."""
    if not launcher:
        return False
    try:
        record = ProcessRecord.from_dict(launcher)
    except ValueError:
        return False
    if record.host is not None and record.host != socket.gethostname() and job_dir is not None:
        return time.time() - _last_write(job_dir) < HEARTBEAT_STALE_S
    return record.alive()


def _last_write(job_dir: Path) -> float:
    """When the job last wrote its log, progress or checkpoints (the launcher's log gets torchrun's output)."""
    newest = 0.0
    for name in (PID_FILE, "launcher.log", "progress.jsonl", "checkpoints"):
        with contextlib.suppress(OSError):
            newest = max(newest, (job_dir / name).stat().st_mtime)
    return newest


def last_progress(job_dir: Path) -> dict[str, Any] | None:
    """The newest complete line of the job's progress.jsonl."""
    path = job_dir / "progress.jsonl"
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4096))
            lines = handle.read().splitlines()
    except OSError:
        return None
    for raw in reversed(lines):
        with contextlib.suppress(ValueError):
            return dict(json.loads(raw))
    return None


class LocalPlatform:
    """Training half of the platform protocol on this machine, with ``torchrun``.

    :param jobs_root: folder holding one sub-folder per job (shared by workers that may retry the task).
    :param env: extra environment for the job (e.g. ``MLFLOW_TRACKING_URI``).
    """

    name = "local"

    def __init__(self, jobs_root: str | Path, *, env: dict[str, str] | None = None, python: str | None = None):
        self.jobs_root = Path(str(jobs_root).removeprefix("file://"))
        self.env = dict(env or {})
        self.python = python or sys.executable

    # -- helpers -------------------------------------------------------------------------------------------
    def job_dir(self, job_name: str) -> Path:
        return self.jobs_root / job_name

    @staticmethod
    def nproc(spec: TrainingSpec) -> int:
        if spec.distributed.nproc_per_node != "auto":
            return int(spec.distributed.nproc_per_node)
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:  # pragma: no cover - the local extra brings torch
            gpus = 0
        # No GPU: two CPU processes with gloo, which on a 2-core machine matches one process with 2 threads.
        return gpus or 2

    @staticmethod
    def rendezvous_id(spec: TrainingSpec) -> str:
        """The same on every node of a job (the spec less its node_rank), different for another job."""
        import hashlib

        shared = spec.model_copy(update={"distributed": spec.distributed.model_copy(update={"node_rank": 0})})
        return "llmops-" + hashlib.sha256(shared.to_json().encode()).hexdigest()[:16]

    def command(self, spec: TrainingSpec, job_dir: Path, *, master_port: int | None = None) -> list[str]:
        dist = spec.distributed
        argv = [self.python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc(spec))]
        if dist.nnodes > 1:
            argv += [
                "--nnodes",
                str(dist.nnodes),
                "--node_rank",
                str(dist.node_rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                str(dist.rdzv_endpoint),
                "--rdzv_id",
                dist.rdzv_id or self.rendezvous_id(spec),
            ]
        else:
            argv += ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(master_port or 0)]
        argv += ["-m", "airflow_llmops.ml.train", "--spec", str(job_dir / "spec.json"), "--job-dir", str(job_dir)]
        return argv

    def _launcher(self, job_dir: Path) -> dict[str, Any] | None:
        return read_json_object(job_dir / PID_FILE)

    # -- protocol ------------------------------------------------------------------------------------------
    def submit_training(self, spec: TrainingSpec, *, job_name: str) -> JobHandle:
        """Start the job, or re-attach to it: a running job is not started twice, a finished one is not rerun,
        and a failed or killed one restarts in the same folder, where training resumes from its checkpoints."""
        job_dir = self.job_dir(job_name)
        launcher = self._launcher(job_dir)
        status = read_json_object(job_dir / "status.json")
        if launcher and (launcher_alive(launcher, job_dir) or (status and status.get("state") == "succeeded")):
            return self._handle(job_name, launcher)
        # Workers of a crashed attempt may outlive their launcher and would race the new attempt for the
        # checkpoint folder: they go first.
        terminate_job(job_dir, grace=5)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "status.json").unlink(missing_ok=True)
        (job_dir / "spec.json").write_text(spec.to_json(indent=2))
        argv = self.command(spec, job_dir, master_port=free_port())
        # Not the worker's whole environment: it holds Airflow's secrets (see child_env).
        env = child_env({**self.env, "LLMOPS_RUN_KEY": job_name, "PYTHONUNBUFFERED": "1", JOB_MARKER: str(job_dir)})
        attempt = int(launcher.get("attempt", 0)) + 1 if launcher else 1
        with (job_dir / "launcher.log").open("ab") as log:
            log.write(f"\n=== attempt {attempt}: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        # The pid with its create time: a later reader must not take whatever process got the pid for the job.
        record = ProcessRecord.of(proc, argv=argv)
        record.write(job_dir / PID_FILE, attempt=attempt)
        return self._handle(job_name, {**record.to_dict(), "attempt": attempt})

    def _handle(self, job_name: str, launcher: dict[str, Any]) -> JobHandle:
        job_dir = self.job_dir(job_name)
        return JobHandle(
            platform=self.name,
            job_id=str(launcher["pid"]),
            job_name=job_name,
            console_url=None,
            extra={"job_dir": str(job_dir), "attempt": launcher.get("attempt", 1)},
        )

    def get_training_status(self, handle: JobHandle) -> JobStatus:
        job_dir = self.job_dir(handle.job_name)
        status = read_json_object(job_dir / "status.json")
        progress = last_progress(job_dir)
        fraction = None
        if progress and progress.get("total_steps"):
            fraction = min(1.0, float(progress["step"]) / float(progress["total_steps"]))
        if status and status.get("state") == "succeeded":
            return JobStatus(
                state=JobState.SUCCEEDED,
                message=str(status.get("message") or "training finished"),
                progress=1.0,
                metrics={k: float(v) for k, v in (status.get("metrics") or {}).items() if isinstance(v, int | float)},
                model_uri=status.get("model_uri"),
            )
        if status and status.get("state") == "failed":
            return JobStatus(state=JobState.FAILED, message=str(status.get("message", "training failed")))
        if status and status.get("state") == "cancelled":
            return JobStatus(state=JobState.CANCELLED, message=str(status.get("message", "cancelled")))
        launcher = self._launcher(job_dir)
        if launcher_alive(launcher, job_dir):
            metrics = {k: float(progress[k]) for k in ("loss", "tokens_per_s", "eta_s") if progress and progress.get(k)}
            return JobStatus(state=JobState.RUNNING, progress=fraction, metrics=metrics)
        if launcher is None:
            return JobStatus(state=JobState.PENDING, message="not started")
        return JobStatus(
            state=JobState.FAILED, message=f"the job's processes exited without a result; log:\n{self._tail(job_dir)}"
        )

    @staticmethod
    def _tail(job_dir: Path, lines: int = 30) -> str:
        try:
            return "\n".join((job_dir / "launcher.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cancel_training(self, handle: JobHandle) -> None:
        """Stop the launcher and every worker (SIGTERM, then SIGKILL after a grace period); a job that had not
        ended is recorded as cancelled (one terminal state: a later poll never turns it into a failure)."""
        job_dir = self.job_dir(handle.job_name)
        terminate_job(job_dir, grace=15)
        status = read_json_object(job_dir / "status.json")
        if not status or status.get("state") not in ("succeeded", "failed"):
            cancelled = {"state": "cancelled", "message": "cancelled", "at": time.time()}
            write_json_atomic(job_dir / "status.json", cancelled)

    def describe_training(self, handle: JobHandle) -> dict[str, Any]:
        job_dir = self.job_dir(handle.job_name)
        return {
            "job_dir": str(job_dir),
            "launcher": self._launcher(job_dir),
            "status": read_json_object(job_dir / "status.json"),
            "mlflow": read_json_object(job_dir / "mlflow.json"),
            "last_progress": last_progress(job_dir),
            "checkpoints": sorted(p.name for p in (job_dir / "checkpoints").glob("checkpoint-*")),
        }
