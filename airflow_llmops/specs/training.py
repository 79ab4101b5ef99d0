"""Training spec: model, data, hyper-parameters, distribution and checkpointing of one training job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec
from airflow_llmops.specs.dataset import TaskType

DEFAULT_CLASSIFIER = "all-MiniLM-L6-v2"
DEFAULT_CAUSAL_LM = "tiny-gpt2"


class LoraSpec(Spec):
    """Low-rank adapters (through ``peft``) instead of full fine-tuning."""

    r: int = Field(default=8, ge=1, le=512)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    merge: bool = Field(
        default=True,
        description="save the adapters merged into the base weights (a plain model folder); False: save the "
        "adapters only, with the base model's reference in adapter_config.json",
    )


class DistributedSpec(Spec):
    """How the job is spread over processes and hosts (torchrun's arguments on the local platform)."""

    nproc_per_node: int | Literal["auto"] = "auto"
    nnodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0)
    rdzv_endpoint: str | None = Field(default=None, pattern=r"^[^:\s]+:\d{1,5}$")
    rdzv_id: str | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    instance_type: str | None = Field(default=None, description="cloud platforms: machine type per node")
    use_spot: bool = False

    @model_validator(mode="after")
    def _multi_node_needs_endpoint(self) -> Self:
        if isinstance(self.nproc_per_node, int) and self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1 or 'auto', got {self.nproc_per_node}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (host:port of the rendezvous)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be < nnodes {self.nnodes}")
        return self


class TrainingSpec(Spec):
    """One training job. ``model`` is a Hugging Face model id or path, or one of the offline defaults
    (``all-MiniLM-L6-v2`` for classification, ``tiny-gpt2`` for a small causal LM built from a config).

    ``task="chat"`` fine-tunes a causal LM on conversations (a dataset prepared with ``task="chat"``), with the
    loss on the assistant's turns only."""

    task: TaskType = "classification"
    model: str = Field(default="", description="empty: the task's offline default")
    dataset_uri: str | None = Field(default=None, description="prepared dataset folder (its manifest.json)")
    output_uri: str | None = None
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1, description="-1: run for `epochs`")
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    per_device_batch_size: int = Field(default=16, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_seq_length: int = Field(default=128, ge=8, le=32768)
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lora: LoraSpec | None = None
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    checkpoint_every_steps: int = Field(default=50, ge=1)
    log_every_steps: int = Field(default=10, ge=1)
    mlflow_experiment: str = Field(default="llmops", min_length=1)

    @model_validator(mode="after")
    def _adapter_needs_a_base(self) -> Self:
        if self.lora is not None and not self.lora.merge and self.resolved_model.lower() == DEFAULT_CAUSAL_LM:
            raise ValueError(
                f"lora.merge=False saves only the adapters, but {DEFAULT_CAUSAL_LM!r} is built from a config and "
                "has no base model to refer to; keep lora.merge=True or train a local or hub model"
            )
        return self

    @property
    def resolved_model(self) -> str:
        if self.model:
            return self.model
        return DEFAULT_CLASSIFIER if self.task == "classification" else DEFAULT_CAUSAL_LM
