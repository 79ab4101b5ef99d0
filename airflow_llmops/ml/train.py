"""Training entry point: ``python -m airflow_llmops.ml.train --spec SPEC.json --job-dir DIR``.

Runs as a plain process or under ``torchrun`` (one process per device; gloo on CPU, nccl on GPU). ``SPEC.json`` is
``TrainingSpec.to_json()``. Rank 0 writes, under ``DIR``: ``progress.jsonl`` (one JSON line every
``log_every_steps`` optimizer steps and at the end), ``checkpoints/checkpoint-<step>/`` (newest 2; a re-run resumes
from the newest complete one), ``model/`` (unless ``output_uri`` is set) and, at the end, ``status.json``.

Exit codes: 0 succeeded; 2 bad input (spec, data, model, memory: the message says what to change); 1 any other
failure. Either way rank 0 leaves ``{"state": "failed", "message": ...}`` in ``status.json``.

Several nodes (``torchrun --nnodes N``): each node's first process writes that node's ``status.json``; the node
holding global rank 0 has the model and the metrics, the others record ``"role": "worker-node"``. Resuming a
multi-node job needs the checkpoints on a filesystem every node reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from airflow_llmops.ml.training.errors import TrainingInputError
from airflow_llmops.ml.training.jobdir import JobDir
from airflow_llmops.specs.base import SpecValidationError
from airflow_llmops.specs.training import TrainingSpec

#: Prefix of the line that carries the final metrics and the MLflow run id in the job's log.
RESULT_PREFIX = "[llmops-result] "


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m airflow_llmops.ml.train", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="TrainingSpec JSON file (or the JSON text itself)")
    parser.add_argument("--job-dir", required=True, help="folder for progress, checkpoints, model and status")
    return parser.parse_args(argv)


def load_spec(value: str) -> TrainingSpec:
    text = value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8")
    return TrainingSpec.from_json(text)


def configure_threads() -> None:
    """Split the host's cores between the processes of this node, unless OMP_NUM_THREADS already decides
    (torchrun sets it to 1): oversubscribed cores make DDP on CPU slower than one process."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork after tokenizing would warn on every rank
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _report_failure(job: JobDir, local_rank: int, message: str) -> None:
    print(f"[train] failed: {message}", file=sys.stderr, flush=True)
    if local_rank != 0:
        return
    try:
        job.write_status({"state": "failed", "message": message})
    except OSError as err:  # the job dir itself may be the problem; the message is on stderr anyway
        print(f"[train] cannot write {job.status}: {err}", file=sys.stderr, flush=True)


def _finish_distributed() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except (ImportError, RuntimeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = JobDir(Path(args.job_dir).resolve())
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        spec = load_spec(args.spec)
    except (OSError, SpecValidationError) as err:
        _report_failure(job, local_rank, f"cannot read the training spec {args.spec!r}: {err}")
        return TrainingInputError.exit_code
    quiet_libraries()
    configure_threads()
    status: dict[str, Any]
    try:
        # Imported in stages so that bad input is reported before the Trainer's imports (~10 s) run.
        from airflow_llmops.ml.training.plan import Placement, preflight

        where = Placement.from_env(spec)
        prepared = preflight(spec, job, where)
        from airflow_llmops.ml.training.runner import run

        status = run(spec, job, (where, prepared))
    except TrainingInputError as err:
        _report_failure(job, local_rank, str(err))
        return TrainingInputError.exit_code
    except Exception as err:
        traceback.print_exc()
        _report_failure(job, local_rank, f"{type(err).__name__}: {err} (the job's stderr has the traceback)")
        return 1
    finally:
        _finish_distributed()
    if rank == 0:
        job.write_status(status)
        print(f"[train] succeeded: model at {status['model_uri']}", flush=True)
        # One machine-readable line for platforms that only keep the job's log (SageMaker, Vertex AI, Azure ML).
        result = {k: status.get(k) for k in ("metrics", "mlflow_run_id", "resumed_from_step", "world_size")}
        print(RESULT_PREFIX + json.dumps(result, default=str, sort_keys=True), flush=True)
    elif local_rank == 0:
        node = os.environ.get("GROUP_RANK", "?")
        job.write_status(
            {
                "state": "succeeded",
                "role": "worker-node",
                "node_rank": node,
                "model_uri": None,
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "message": f"node {node} finished its share; the node with rank 0 holds the model",
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
