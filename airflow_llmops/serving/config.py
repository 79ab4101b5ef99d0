"""Typed configuration of the model server and of each variant it serves (also the admin API's payloads)."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Self

VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_NAME_RE = re.compile(VARIANT_NAME)
ENV_ADMIN_TOKEN = "LLMOPS_ADMIN_TOKEN"
ENV_API_KEY = "LLMOPS_API_KEY"
# Test-only switch (also ``--enable-fault-injection``): lets a test harness that starts servers through other code
# (the local platform passes its environment on) turn failure injection on without a flag of its own.
ENV_FAULT_INJECTION = "LLMOPS_ENABLE_FAULT_INJECTION"
# Where rotated request-log files are copied (any fsspec URI): the drift check reads them there on a cloud.
ENV_REQUEST_LOG_SHIP_URI = "LLMOPS_REQUEST_LOG_SHIP_URI"
# Vertex AI's serving contract: the routes it calls and the deployed model's id (set on its containers).
ENV_HEALTH_ROUTE = "AIP_HEALTH_ROUTE"
ENV_PREDICT_ROUTE = "AIP_PREDICT_ROUTE"
ENV_DEPLOYED_MODEL_ID = "AIP_DEPLOYED_MODEL_ID"
ROUTE_PATTERN = r"^/[^\s?#]*$"
_ROUTE_RE = re.compile(ROUTE_PATTERN)
DAY_S = 86_400.0
GIB = 1024**3


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaultSpec(_Model):
    """Failure injection, for tests only: make a variant fail or slow down on purpose (a "broken model").

    Refused (404) unless the server runs with ``--enable-fault-injection`` (or ``LLMOPS_ENABLE_FAULT_INJECTION=1``).

    :param error_rate: fraction of this variant's requests answered with HTTP 500 (``injected_fault``).
    :param extra_latency_ms: added to every request of this variant before it answers.
    """

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    extra_latency_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.extra_latency_ms > 0


class VariantSpec(_Model):
    """One model version behind the endpoint.

    :param name: the variant's name (``[A-Za-z0-9._-]``, at most 63 characters).
    :param source: where the model is: a folder, ``file://`` path, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
        ``runs:/...`` or any URI MLflow can download, ``all-MiniLM-L6-v2``, or ``echo://`` (a trivial built-in
        model for tests and benchmarks).
    :param weight: relative share of the traffic (non-negative; normalised over the non-shadow variants).
    :param shadow: a shadow gets a copy of requests after the primary answered; its answers are logged, never
        returned.
    :param mirror_percent: percent of requests copied to a shadow variant.
    :param fault: failure injection for tests (see :class:`FaultSpec`).
    :param max_batch_size: texts per forward pass of a classifier, sequences decoded together by a causal LM
        (default: the server's ``max_batch_size`` / ``max_decode_batch_size``).
    :param max_batch_delay_ms: how long the batcher waits for more requests (default: the server's).
    :param redact_output_pii: replace personal data (e-mail addresses, phone and card numbers, IBANs, IP
        addresses, secrets) in this variant's generated text with placeholders, streamed or not (default: the
        server's ``redact_output_pii``); see :mod:`airflow_llmops.serving.redaction`.
    """

    name: str = Field(pattern=VARIANT_NAME)
    source: str = Field(min_length=1, max_length=4096)
    weight: float = Field(default=1.0, ge=0.0, le=1e9)
    shadow: bool = False
    mirror_percent: float = Field(default=100.0, ge=0.0, le=100.0)
    fault: FaultSpec | None = None
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_batch_delay_ms: float | None = Field(default=None, ge=0.0, le=1000.0)
    redact_output_pii: bool | None = None

    @field_validator("weight", "mirror_percent")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value


class ServerConfig(_Model):
    """Everything ``airflow-llmops serve`` takes; ``create_app(config)`` builds the server from it.

    Variants come from ``state_file`` when it exists (the admin API rewrites it on every change), else from
    ``variants``.
    """

    variants: list[VariantSpec] = Field(default_factory=list)
    admin_token: str | None = Field(default=None, description="bearer token of /admin/*; None disables it")
    api_key: str | None = Field(default=None, description="bearer token of /v1/*; None leaves them open")
    served_model_name: str = "llmops"
    request_log: Path | None = None
    request_log_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="rotate at this file size")
    request_log_max_age_s: float = Field(default=3600.0, gt=0, description="rotate when the file is this old")
    request_log_retention_s: float = Field(
        default=7 * DAY_S, gt=0, description="delete rotated request-log files last written longer ago than this"
    )
    request_log_max_total_bytes: int = Field(
        default=GIB, ge=1024, description="delete the oldest rotated request-log files beyond this total size"
    )
    request_log_ship_uri: str | None = Field(
        default=None,
        min_length=1,
        description="copy each rotated request-log file (and the last one at shutdown) to <URI>/requests-<stamp>-"
        f"<server id>.jsonl, any fsspec URI (${ENV_REQUEST_LOG_SHIP_URI}, the default); without request_log the "
        "log is kept in a temporary folder",
    )
    state_file: Path | None = None
    model_cache: Path | None = Field(
        default=None,
        description="where models:/ and remote sources are downloaded, one folder per model version, reused "
        "across restarts; without it a private temporary folder, deleted at shutdown",
    )
    enable_fault_injection: bool = Field(
        default=False, description="tests only: allow a variant's `fault` (else requests that set one get 404)"
    )
    wait_for_models_s: float = Field(
        default=0.0,
        ge=0.0,
        description="accept no connection until the initial variants are loaded (at most this long); the "
        "supervisor sets it on restarts, so requests queued in the listen backlog meet a loaded model",
    )
    supervisor_restarts: int | None = Field(
        default=None, ge=0, description="set by the supervisor on its child: how many times it restarted it"
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(default=32_000, ge=1)
    max_inputs: int = Field(default=256, ge=1, description="texts per /v1/classify request, prompts per completion")
    max_tokens_limit: int = Field(default=1024, ge=1, description="upper bound of max_tokens")
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_delay_ms: float = Field(default=5.0, ge=0.0, le=1000.0)
    max_decode_batch_size: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="sequences a causal LM variant decodes together (continuous batching); more wait to join",
    )
    backend: Literal["hf", "vllm"] = Field(
        default="hf",
        description="how causal-LM variants generate: hf (the built-in continuous batching on torch) or vllm "
        "(vLLM's engine; a CUDA machine with vllm installed)",
    )
    metrics_retention_s: float = Field(default=3600.0, gt=0)
    redact_output_pii: bool = Field(
        default=False,
        description="redact personal data in generated text (completions, chat, streams) of every variant that "
        "does not set its own redact_output_pii; counted in llmops_output_pii_redactions_total",
    )
    shadow_max_pending: int = Field(default=64, ge=0, description="shadow copies in flight; more are dropped")
    torch_threads: int | None = Field(default=None, ge=1)
    health_route: str | None = Field(
        default=None,
        pattern=ROUTE_PATTERN,
        description=f"another GET path answering as /ping (Vertex AI: ${ENV_HEALTH_ROUTE}, the default)",
    )
    predict_route: str | None = Field(
        default=None,
        pattern=ROUTE_PATTERN,
        description='a POST path taking Vertex AI\'s {"instances": [...]} and answering {"predictions": [...]} '
        f"(${ENV_PREDICT_ROUTE}, the default)",
    )
    deployed_model_id: str | None = Field(
        default=None, max_length=256, description=f"the predictions' deployedModelId (${ENV_DEPLOYED_MODEL_ID})"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, got {dupes} more than once")
        return self

    def with_env_defaults(self) -> ServerConfig:
        """Fill ``admin_token`` and ``api_key`` from ``LLMOPS_ADMIN_TOKEN`` / ``LLMOPS_API_KEY`` when unset, turn
        failure injection on when ``LLMOPS_ENABLE_FAULT_INJECTION`` is ``1``/``true``/``yes``, and take Vertex AI's
        routes and deployed model id from ``AIP_HEALTH_ROUTE``, ``AIP_PREDICT_ROUTE`` and ``AIP_DEPLOYED_MODEL_ID``
        when unset (a route that is not a path is a ``ValueError``), and ``request_log_ship_uri`` from
        ``LLMOPS_REQUEST_LOG_SHIP_URI``."""
        update: dict[str, object] = {}
        if self.admin_token is None and os.environ.get(ENV_ADMIN_TOKEN):
            update["admin_token"] = os.environ[ENV_ADMIN_TOKEN]
        if self.api_key is None and os.environ.get(ENV_API_KEY):
            update["api_key"] = os.environ[ENV_API_KEY]
        if not self.enable_fault_injection and env_flag(ENV_FAULT_INJECTION):
            update["enable_fault_injection"] = True
        for field, env in (("health_route", ENV_HEALTH_ROUTE), ("predict_route", ENV_PREDICT_ROUTE)):
            value = os.environ.get(env, "").strip()
            if getattr(self, field) is None and value:
                if not _ROUTE_RE.match(value):
                    raise ValueError(f"{env}={value!r} is not a URL path (it must start with '/')")
                update[field] = value
        if self.request_log_ship_uri is None and os.environ.get(ENV_REQUEST_LOG_SHIP_URI, "").strip():
            update["request_log_ship_uri"] = os.environ[ENV_REQUEST_LOG_SHIP_URI].strip()
        if self.deployed_model_id is None and os.environ.get(ENV_DEPLOYED_MODEL_ID):
            update["deployed_model_id"] = os.environ[ENV_DEPLOYED_MODEL_ID][:256]
        return self.model_copy(update=update) if update else self


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_secret_file(path: Path, what: str) -> str:
    """The secret in ``path`` (surrounding whitespace stripped); read once at start.

    A file is the way to hand a token to the server without it showing in ``ps`` (argv is world-readable).
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        mode = Path(path).stat().st_mode
    except OSError as err:
        raise ValueError(f"cannot read the {what} file {path}: {err.strerror or err}") from None
    if not text:
        raise ValueError(f"the {what} file {path} is empty")
    if mode & 0o077:
        logging.getLogger(__name__).warning("the %s file %s is readable by other users (chmod 600 it)", what, path)
    return text


def parse_model_arg(value: str, *, shadow: bool = False) -> VariantSpec:
    """``NAME=SOURCE[:WEIGHT]`` → a variant. The weight is the text after the last ``:`` when it is a number, so
    ``models:/clf@champion:90`` and ``file:///m/clf`` both parse. For a shadow the number is its mirror percent."""
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"expected NAME=SOURCE[:WEIGHT], got {value!r} (e.g. champion=models:/clf@champion:90)")
    if not _NAME_RE.match(name):
        raise ValueError(f"variant name {name!r} must match {VARIANT_NAME}")
    source, number = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            number = float(tail)
        except ValueError:
            pass
        else:
            source = head
    if shadow:
        return VariantSpec(
            name=name, source=source, weight=0.0, shadow=True, mirror_percent=100.0 if number is None else number
        )
    return VariantSpec(name=name, source=source, weight=1.0 if number is None else number)
