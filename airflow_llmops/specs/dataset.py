"""Dataset spec: where the data comes from, how it is prepared and split, and what it must satisfy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec

TaskType = Literal["classification", "causal_lm", "chat"]
# What a dataset can be prepared for: the training tasks (conversations in the OpenAI messages format for "chat").
DatasetTaskType = TaskType
SUPPORTED_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "az", "chatterbot")


class SplitSpec(Spec):
    """Train/validation/test fractions; a record's split is fixed by a stable hash of its content."""

    train: float = Field(default=0.8, gt=0, lt=1)
    validation: float = Field(default=0.1, ge=0, lt=1)
    test: float = Field(default=0.1, ge=0, lt=1)
    salt: str = Field(default="llmops", min_length=1, description="changes every record's split when changed")

    @model_validator(mode="after")
    def _sums_to_one(self) -> Self:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + validation + test must sum to 1, got {self.train} + {self.validation} + "
                f"{self.test} = {total:g}"
            )
        return self


class DatasetSpec(Spec):
    """A dataset to prepare and validate.

    ``source`` is an object-storage URI (``file://``, ``s3://``, ``gs://``, ``abfs://``) of a JSONL, CSV or
    Parquet file or folder, or ``chatterbot://<language>`` for the dialog corpus shipped by the
    ``chatterbot-corpus`` package (``chatterbot://english``).

    ``task="chat"`` reads conversations: each record's ``messages_field`` holds a list of
    ``{"role": "system"|"user"|"assistant", "content": "..."}`` objects (a JSON list in JSONL, a list or a JSON
    string in Parquet/CSV); ``chatterbot://`` gives each corpus dialog as alternating user/assistant turns.
    """

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    source: str = Field(min_length=1)
    format: Literal["auto", "jsonl", "csv", "parquet", "chatterbot"] = "auto"
    conn_id: str | None = Field(default=None, description="Airflow connection for the source's object store")
    task: DatasetTaskType = "classification"
    text_field: str = Field(default="text", min_length=1)
    label_field: str | None = "label"
    prompt_field: str = Field(default="prompt", min_length=1)
    response_field: str = Field(default="response", min_length=1)
    messages_field: str = Field(default="messages", min_length=1, description="task 'chat': the conversation field")
    split: SplitSpec = Field(default_factory=SplitSpec)
    near_duplicate_threshold: float = Field(
        default=0.9, gt=0, le=1, description="Jaccard similarity at or above which two records are near-duplicates"
    )
    min_rows_per_label: int = Field(default=5, ge=1)
    max_tokens: int = Field(default=512, ge=1)
    max_record_bytes: int = Field(
        default=1_000_000, ge=1, description="records larger than this are quarantined, not tokenized"
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if "://" not in value:
            if value.startswith("/"):
                return f"file://{value}"
            raise ValueError("must be a URI such as file:///data/x.jsonl, s3://bucket/key or chatterbot://english")
        scheme = value.split("://", 1)[0].lower()
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r}; use one of {', '.join(SUPPORTED_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _fields_fit_task(self) -> Self:
        if self.task == "classification" and not self.label_field:
            raise ValueError("task 'classification' needs label_field")
        if self.source.startswith("chatterbot://") and self.format not in ("auto", "chatterbot"):
            raise ValueError(f"source {self.source!r} is the chatterbot corpus; format must be 'auto' or 'chatterbot'")
        return self

    @property
    def resolved_format(self) -> str:
        """The file format, inferred from the source's suffix when ``format='auto'``."""
        if self.format != "auto":
            return self.format
        if self.source.startswith("chatterbot://"):
            return "chatterbot"
        lowered = self.source.lower().rstrip("/")
        for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
            if lowered.endswith(suffix):
                return fmt
        raise ValueError(
            f"cannot infer the format of {self.source!r} from its suffix; set format to jsonl, csv or parquet"
        )
