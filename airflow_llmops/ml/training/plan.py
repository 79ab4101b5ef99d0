"""The plan of a training job: where this process sits, and every input check that needs no weights.

Kept free of the Trainer (whose import pulls in peft and more, ~10 s) so that a bad spec, an empty split, an
unknown model or an impossible batch size is reported in seconds, and identically on every rank, before any
rank waits in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from airflow_llmops.ml.training import data as D
from airflow_llmops.ml.training import models as M
from airflow_llmops.ml.training.errors import TrainingInputError
from airflow_llmops.ml.training.jobdir import Checkpoint, JobDir
from airflow_llmops.ml.training.outputs import OutputTarget, resolve_output
from airflow_llmops.ml.training.preflight import check_batch_fits, check_precision, local_world_size
from airflow_llmops.specs.training import TrainingSpec


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the job (torchrun's environment variables; a plain process is rank 0 of 1)."""

    rank: int
    world_size: int
    cuda: bool
    backend: str
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """The first process of this host: the keeper of this node's job folder (status, when it is not rank 0)."""
        return self.local_rank == 0

    @classmethod
    def from_env(cls, spec: TrainingSpec) -> Placement:
        cuda = torch.cuda.is_available()
        backend = spec.distributed.backend
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if backend == "nccl" and not cuda:
            raise TrainingInputError("distributed.backend='nccl' needs CUDA GPUs; use 'gloo' (or 'auto') on CPU")
        env = os.environ
        return cls(
            int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), cuda, backend, int(env.get("LOCAL_RANK", "0"))
        )


@dataclass
class Prepared:
    """What the pre-flight phase found: the inputs of the Trainer, all validated."""

    splits: D.Splits
    source: M.ModelSource
    label2id: dict[str, int]
    output: OutputTarget
    resume: Checkpoint | None
    notes: list[str] = field(default_factory=list)


def preflight(spec: TrainingSpec, job: JobDir, where: Placement) -> Prepared:
    """Input checks that need no weights, in the order a user would fix them."""
    check_precision(spec.precision, cuda=where.cuda)
    splits = D.load_splits(spec.dataset_uri)
    source = M.resolve_model(spec)
    M.check_sequence_length(source, spec.max_seq_length)
    label2id: dict[str, int] = {}
    if spec.task == "classification":
        D.classification_columns(splits)
        label2id = M.classification_label2id(source, D.label_names(splits.train))
        if not splits.validation["label"].astype(str).isin(label2id).any():
            raise TrainingInputError(
                f"dataset {splits.name!r}: no row of split 'validation' has a label of split 'train' "
                f"{sorted(label2id)}, so nothing can be evaluated; prepare the dataset again"
            )
    elif spec.task == "chat":
        D.chat_columns(splits)
    check_batch_fits(
        source.config,
        batch=spec.per_device_batch_size,
        seq=spec.max_seq_length,
        precision=spec.precision,
        causal_lm=spec.task != "classification",
        lora=spec.lora is not None,
        cuda=where.cuda,
        local_processes=local_world_size(),
    )
    output = resolve_output(spec.output_uri, job.model)
    if where.is_node_main:
        job.root.mkdir(parents=True, exist_ok=True)
        job.clear_status()
        job.remove_incomplete_checkpoints()
    return Prepared(splits, source, label2id, output, job.latest_checkpoint())
