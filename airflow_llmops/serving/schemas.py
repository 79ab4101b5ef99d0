"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI defines the endpoint)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from airflow_llmops.serving.config import FaultSpec, VariantSpec


def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]


class _Open(BaseModel):
    """OpenAI clients send fields we do not use (``user``, ``logit_bias``...): accept and ignore them."""

    model_config = ConfigDict(extra="ignore")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Text | Annotated[list[Text], Field(min_length=1)] = Field(description="one text or a list of texts")
    model: str | None = Field(default=None, description="a variant name pins the request to it")


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    variant: str
    results: list[ClassifyResult]
    usage: dict[str, int]


class InvocationParameters(BaseModel):
    """``parameters`` of a SageMaker-style ``/invocations`` body; they apply to causal LMs (a classifier ignores
    them). ``max_new_tokens`` (Hugging Face's name) and ``max_tokens`` (OpenAI's) are the same limit."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = None


class InvocationRequest(BaseModel):
    """``POST /invocations``: ``{"inputs": "text" | ["t1", "t2"], "parameters": {...}}``, or the bare text or list."""

    model_config = ConfigDict(extra="forbid")

    inputs: Text | Annotated[list[Text], Field(min_length=1)] = Field(description="one text or a list of texts")
    parameters: InvocationParameters | None = None


class PredictRequest(BaseModel):
    """Vertex AI's prediction body, ``POST $AIP_PREDICT_ROUTE``: ``{"instances": [...], "parameters": {...}}``;
    an instance is a text, ``{"inputs": text}`` or ``{"text": text}`` (see :meth:`texts`)."""

    model_config = ConfigDict(extra="forbid")

    instances: Annotated[list[Any], Field(min_length=1)] = Field(
        description='one per prediction: "text", {"inputs": "text"} or {"text": "text"}'
    )
    parameters: InvocationParameters | None = None

    def texts(self) -> list[str]:
        """The instances' texts, in order; a ``ValueError`` names the first instance of another shape."""
        texts: list[str] = []
        for i, instance in enumerate(self.instances):
            text = instance
            if isinstance(instance, dict) and len(instance) == 1 and next(iter(instance)) in ("inputs", "text"):
                text = next(iter(instance.values()))
            if not isinstance(text, str):
                raise ValueError(
                    f'instances.{i}: expected a text, {{"inputs": text}} or {{"text": text}}, got {_shown(instance)}'
                )
            try:
                texts.append(_valid_text(text))
            except ValueError as err:
                raise ValueError(f"instances.{i}: {err}") from None
        return texts


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text[:80] + "..." if len(text) > 80 else text


class PredictResponse(BaseModel):
    """Vertex AI's prediction answer: one prediction per instance (a classifier's ``label``, ``score`` and
    ``scores``; a causal LM's ``text`` and ``finish_reason``) and the deployed model's id when Vertex set it."""

    predictions: list[dict[str, Any]]
    deployedModelId: str | None = None  # Vertex AI's name


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str | None = Field(default=None, description="a variant name pins the request; else routed by weight")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] = ""
    max_tokens: int | None = Field(default=16, ge=1)


class ContentPart(_Open):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class AddVariantRequest(VariantSpec):
    """A variant to add; ``wait`` returns once its model is loaded (201) or failed (422), else at once (202)."""

    weight: float = Field(default=0.0, ge=0.0, le=1e9)
    wait: bool = True


class UpdateVariantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float | None = Field(default=None, ge=0.0, le=1e9)
    shadow: bool | None = None
    mirror_percent: float | None = Field(default=None, ge=0.0, le=100.0)
    fault: FaultSpec | None = None
    clear_fault: bool = False


Weight = Annotated[float, Field(ge=0.0, le=1e9, allow_inf_nan=False)]


class WeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, Weight] = Field(min_length=1)
    fallback: dict[str, Weight] | None = Field(
        default=None,
        min_length=1,
        description="also record these as the weights a restarted server starts with (absent: unchanged)",
    )


class FallbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, Weight] = Field(min_length=1, description="weights a restarted server starts with")


class Fallback(BaseModel):
    weights: dict[str, float]
    set_at: float | None


class ServerInfo(BaseModel):
    """Boot facts and the fallback: a client that saw another ``boot_count`` or ``started_at`` knows the server
    restarted; ``fallback_applied_at`` says this boot started on the fallback weights."""

    boot_count: int
    started_at: float
    pid: int
    supervisor_restarts: int | None
    fallback: Fallback | None
    fallback_applied_at: float | None
    weights: dict[str, float]


class VariantInfo(BaseModel):
    name: str
    source: str
    weight: float
    traffic_percent: float
    shadow: bool
    mirror_percent: float
    status: Literal["loading", "ready", "failed"]
    kind: str | None
    error: str | None
    fault: FaultSpec | None
    loaded_at: float | None
    redact_output_pii: bool = False


class VariantsResponse(BaseModel):
    variants: list[VariantInfo]
    fallback: dict[str, float] | None = None


class ErrorBody(BaseModel):
    error: dict[str, Any]
