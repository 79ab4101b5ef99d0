"""Inference routes: ``/v1/classify`` and the OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions``;
SageMaker's container contract, ``GET /ping`` and ``POST /invocations`` (:data:`sagemaker_router`); and Vertex AI's,
``GET $AIP_HEALTH_ROUTE`` and ``POST $AIP_PREDICT_ROUTE`` (:func:`vertex_router`)."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError

from airflow_llmops.serving.deps import (
    REQUEST_ID_HEADER,
    VARIANT_HEADER,
    ServerState,
    bearer,
    check_api_key,
    request_id,
    server_state,
)
from airflow_llmops.serving.errors import BadRequest, NotFound, ServingError
from airflow_llmops.serving.gateway import classify_work, generate_work
from airflow_llmops.serving.models import Generation, GenerationParams, Task
from airflow_llmops.serving.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    CompletionRequest,
    InvocationParameters,
    InvocationRequest,
    PredictRequest,
    PredictResponse,
)
from airflow_llmops.serving.variants import Variant

CHAT_DEFAULT_MAX_TOKENS = 256


def _api_key(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    check_api_key(request, credentials)


router = APIRouter(prefix="/v1", dependencies=[Depends(_api_key)], tags=["inference"])
State = Annotated[ServerState, Depends(server_state)]
RequestId = Annotated[str, Depends(request_id)]


def _pick(state: ServerState, request: Request, task: Task, model: str | None) -> Variant:
    """The ``X-LLMOps-Variant`` header, else a ``model`` naming a variant, pins the request; else route by weight."""
    pinned = request.headers.get(VARIANT_HEADER) or None
    registry = state.registry
    if pinned is None and model and model != state.config.served_model_name:
        if model not in registry.variants:
            raise NotFound(
                f"model {model!r} is not served here; use {state.config.served_model_name!r} (routed by weight) "
                f"or a variant name: {sorted(registry.variants)}"
            )
        pinned = model
    return registry.pick(task, pinned)


def _check_texts(state: ServerState, texts: list[str], what: str) -> None:
    limit = state.config.max_inputs
    if len(texts) > limit:
        raise BadRequest(f"{len(texts)} {what}s in one request; this server takes at most {limit} (--max-inputs)")
    chars = state.config.max_prompt_chars
    for i, text in enumerate(texts):
        if len(text) > chars:
            raise BadRequest(
                f"{what} {i} is {len(text)} characters; this server takes at most {chars} (--max-prompt-chars)"
            )


def _max_tokens(state: ServerState, asked: int | None, default: int) -> int:
    limit = state.config.max_tokens_limit
    value = default if asked is None else asked
    if value > limit:
        raise BadRequest(f"max_tokens={value} is above this server's limit of {limit} (--max-tokens-limit)")
    return min(value, limit)


def _params(
    body: CompletionRequest | ChatCompletionRequest | InvocationParameters, max_tokens: int
) -> GenerationParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return GenerationParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop, seed=body.seed
    )


def _headers(response: Response, rid: str, variant: Variant) -> None:
    response.headers[REQUEST_ID_HEADER] = rid
    response.headers[VARIANT_HEADER] = variant.name


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, response: Response, state: State, rid: RequestId) -> Any:
    """Labels and scores for one text or a list of texts; concurrent requests share forward passes."""
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    _check_texts(state, texts, "input")
    variant = _pick(state, request, "classify", body.model)
    return await _classify(state, variant, response, rid=rid, texts=texts, endpoint="/v1/classify")


async def _classify(
    state: ServerState, variant: Variant, response: Response, *, rid: str, texts: list[str], endpoint: str
) -> ClassifyResponse:
    work = classify_work(texts)
    answer = await state.gateway.run(variant, endpoint, rid, texts, work)
    state.gateway.mirror("classify", endpoint, rid, texts, work)
    _headers(response, rid, variant)
    results = [ClassifyResult(label=r.label, score=r.score, scores=r.scores) for r in answer.value]
    return ClassifyResponse(variant=variant.name, results=results, usage={"prompt_tokens": answer.tokens_in})


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream_response(
    state: ServerState,
    variant: Variant,
    *,
    rid: str,
    endpoint: str,
    log_input: str,
    prompt: str,
    params: GenerationParams,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    usage_chunk: Callable[[Generation], dict[str, Any]] | None,
    opening: dict[str, Any] | None = None,
) -> StreamingResponse:
    events = state.gateway.stream(
        variant, endpoint=endpoint, request_id=rid, log_input=log_input, prompt=prompt, params=params
    )
    first = await events.__anext__()  # fault injection and prompt errors still become a JSON error here

    async def body() -> AsyncIterator[str]:
        if opening is not None:
            yield _sse(opening)
        item: str | Generation = first
        try:
            while True:
                if isinstance(item, Generation):
                    yield _sse(chunk(None, item.finish_reason))
                    if usage_chunk is not None:
                        yield _sse(usage_chunk(item))
                    break
                yield _sse(chunk(item, None))
                item = await events.__anext__()
        except ServingError as err:
            yield _sse({"error": {"message": err.message, "type": err.error_type, "code": err.status_code}})
        finally:
            await events.aclose()
        yield _sse("[DONE]")

    headers = {REQUEST_ID_HEADER: rid, VARIANT_HEADER: variant.name, "Cache-Control": "no-cache"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@router.post("/completions")
async def completions(
    body: CompletionRequest, request: Request, response: Response, state: State, rid: RequestId
) -> Any:
    """OpenAI ``completions``: ``prompt`` (a string or a list), ``max_tokens``, ``temperature``, ``top_p``,
    ``stop``, ``seed``, ``stream``."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    _check_texts(state, prompts, "prompt")
    params = _params(body, _max_tokens(state, body.max_tokens, 16))
    variant = _pick(state, request, "generate", body.model)
    created, cid = int(time.time()), f"cmpl-{rid}"
    if body.stream:
        if len(prompts) != 1:
            raise BadRequest(f"stream=true takes one prompt, got {len(prompts)}")

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": variant.name,
                "choices": [choice],
            }

        def usage(gen: Generation) -> dict[str, Any]:
            return {**chunk(None, None), "choices": [], "usage": _usage(gen.prompt_tokens, gen.completion_tokens)}

        return await _stream_response(
            state,
            variant,
            rid=rid,
            endpoint="/v1/completions",
            log_input=prompts[0],
            prompt=prompts[0],
            params=params,
            chunk=chunk,
            usage_chunk=usage if _include_usage(body) else None,
        )
    return await _complete(
        state, variant, response, rid=rid, prompts=prompts, params=params, endpoint="/v1/completions"
    )


async def _complete(
    state: ServerState,
    variant: Variant,
    response: Response,
    *,
    rid: str,
    prompts: list[str],
    params: GenerationParams,
    endpoint: str,
) -> dict[str, Any]:
    """The non-streaming ``completions`` answer: one choice per prompt, in order."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, prompt in enumerate(prompts):
        work = generate_work(prompt, params)
        answer = await state.gateway.run(variant, endpoint, rid, [prompt], work)
        state.gateway.mirror("generate", endpoint, rid, [prompt], work)
        gen = answer.value
        choices.append({"index": i, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason})
        prompt_tokens += gen.prompt_tokens
        completion_tokens += gen.completion_tokens
    _headers(response, rid, variant)
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": variant.name,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, response: Response, state: State, rid: RequestId
) -> Any:
    """OpenAI ``chat.completions``; the prompt is the tokenizer's chat template, or ``role: content`` lines."""
    messages = [(m.role, m.text()) for m in body.messages]
    _check_texts(state, [content for _, content in messages], "message")
    if sum(len(c) for _, c in messages) > state.config.max_prompt_chars:
        raise BadRequest(
            f"the messages hold {sum(len(c) for _, c in messages)} characters together; this server takes at most "
            f"{state.config.max_prompt_chars} (--max-prompt-chars)"
        )
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(body, _max_tokens(state, asked, min(CHAT_DEFAULT_MAX_TOKENS, state.config.max_tokens_limit)))
    variant = _pick(state, request, "generate", body.model)
    assert variant.model is not None  # pick() returns loaded variants only
    prompt = variant.model.chat_prompt(messages)
    log_input = next((c for r, c in reversed(messages) if r == "user"), messages[-1][1])
    created, cid = int(time.time()), f"chatcmpl-{rid}"
    if body.stream:

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {}
            if text is None and finish is None:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": variant.name,
                "choices": [choice],
            }

        def usage(gen: Generation) -> dict[str, Any]:
            return {**chunk(None, None), "choices": [], "usage": _usage(gen.prompt_tokens, gen.completion_tokens)}

        return await _stream_response(
            state,
            variant,
            rid=rid,
            endpoint="/v1/chat/completions",
            log_input=log_input,
            prompt=prompt,
            params=params,
            chunk=chunk,
            usage_chunk=usage if _include_usage(body) else None,
            opening=chunk(None, None),
        )
    work = generate_work(prompt, params)
    answer = await state.gateway.run(variant, "/v1/chat/completions", rid, [log_input], work)
    state.gateway.mirror("generate", "/v1/chat/completions", rid, [log_input], work)
    gen = answer.value
    _headers(response, rid, variant)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": variant.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "logprobs": None,
                "finish_reason": gen.finish_reason,
            }
        ],
        "usage": _usage(gen.prompt_tokens, gen.completion_tokens),
    }


@router.get("/models")
async def list_models(state: State) -> Any:
    """The served name (routed by weight) and each loaded variant, as OpenAI's model list."""
    created = int(state.started_at)
    names = [state.config.served_model_name] + [v.name for v in state.registry.variants.values() if v.status == "ready"]
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "airflow-llmops"} for name in names],
    }


# ---- SageMaker's container contract ----------------------------------------------------------------------------
#: ``GET /ping`` and ``POST /invocations``, at the root: SageMaker (and SageMaker-style hosts) call exactly these.
sagemaker_router = APIRouter(tags=["sagemaker"])
INVOCATIONS_PATH = "/invocations"
_TEXTS_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
}
_INVOCATIONS_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        _TEXTS_SCHEMA,
                        {
                            "type": "object",
                            "properties": {
                                "inputs": _TEXTS_SCHEMA,
                                "parameters": {
                                    "type": "object",
                                    "description": "causal LMs: max_new_tokens (or max_tokens), temperature, "
                                    "top_p, stop, seed",
                                },
                            },
                            "required": ["inputs"],
                            "additionalProperties": False,
                        },
                    ]
                }
            },
            "text/plain": {"schema": {"type": "string", "description": "one text"}},
        },
    }
}


class UnsupportedMediaType(ServingError):
    status_code = 415
    error_type = "invalid_request_error"


@sagemaker_router.get("/ping", responses={503: {"description": "a variant with traffic is not loaded"}})
async def ping(state: State) -> JSONResponse:
    """SageMaker's health check: 200 once every non-shadow variant with traffic is loaded, else 503 (as ``/readyz``)."""
    ready, variants = state.registry.readiness()
    return JSONResponse({"ready": ready, "variants": variants}, 200 if ready else 503)


_FIELD = re.compile(r"^(\w+|\d+)$")
_TYPE_NAMES = {"str", "list", "int", "float", "dict", "bool"}
_PARAMETERS = "parameters (causal LMs) are max_new_tokens or max_tokens, temperature, top_p, stop, seed"


def _validation_message(err: ValidationError, shapes: str) -> str:
    """The first errors as ``field: problem``, then how to fix it (union members' type names left out)."""
    parts: list[str] = []
    for error in err.errors()[:4]:
        names = [str(p) for p in error.get("loc", ())]
        loc = ".".join(p for p in names if _FIELD.match(p) and p not in _TYPE_NAMES) or "body"
        parts.append(f"{loc}: {str(error.get('msg', 'invalid value')).removeprefix('Value error, ')}")
    hint = _PARAMETERS if all(p.startswith("parameters") for p in parts) else shapes
    return "; ".join(dict.fromkeys(parts)) + f" ({hint})"


def parse_invocation(body: bytes, content_type: str | None) -> InvocationRequest:
    """The body of ``POST /invocations``: JSON ``{"inputs": ..., "parameters": {...}}``, a bare JSON string or list
    of strings, or ``text/plain`` (the whole body is one text). Anything else is a :class:`BadRequest` (415 for
    another content type) whose message shows the accepted shapes."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    shapes = 'send {"inputs": "text"}, {"inputs": ["text 1", "text 2"]}, a JSON string or a JSON list of strings'
    if media not in ("application/json", "text/plain", "*/*", "") and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media!r} is not supported: use application/json ({shapes})")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"request body is not UTF-8 text ({err})") from None
    if media == "text/plain":
        payload: Any = text
    else:
        if not text.strip():
            raise BadRequest(f"empty request body: {shapes}")
        try:
            payload = json.loads(text)
        except ValueError as err:
            raise BadRequest(f"request body is not valid JSON: {err}; {shapes}") from None
    if not isinstance(payload, dict):
        payload = {"inputs": payload}
    try:
        return InvocationRequest.model_validate(payload)
    except ValidationError as err:
        raise BadRequest(_validation_message(err, shapes)) from None


def _pick_any(state: ServerState, request: Request) -> tuple[Variant, Task]:
    """A variant for ``/invocations``, whatever its task: the ``X-LLMOps-Variant`` header pins one, else the
    loaded non-shadow variants share the requests by weight. Its model decides the answer: classifiers classify,
    causal LMs complete (a model that does both classifies)."""
    registry = state.registry
    pinned = request.headers.get(VARIANT_HEADER) or None
    if pinned is not None:
        model = registry.get(pinned).model
        task: Task = "generate" if model is not None and "classify" not in model.tasks else "classify"
        return registry.pick(task, pinned), task
    candidates = [
        v
        for v in registry.variants.values()
        if not v.spec.shadow and v.spec.weight > 0 and v.status == "ready" and v.model is not None
    ]
    if not candidates:
        return registry.pick("classify", None), "classify"  # raises the reason: still loading, or nothing to serve
    variant = random.choices(candidates, weights=[v.spec.weight for v in candidates])[0]
    assert variant.model is not None
    return variant, "classify" if "classify" in variant.model.tasks else "generate"


@sagemaker_router.post(
    INVOCATIONS_PATH,
    dependencies=[Depends(_api_key)],
    openapi_extra=_INVOCATIONS_OPENAPI,
    responses={400: {"description": "bad input; the JSON error says what to send"}},
)
async def invocations(request: Request, response: Response, state: State, rid: RequestId) -> Any:
    """SageMaker's inference call. A classifier answers what ``/v1/classify`` answers, a causal LM what
    ``/v1/completions`` answers (one choice per input); ``X-LLMOps-Variant`` names the variant that answered.
    Counted in the metrics and the request log under the endpoint ``/invocations``."""
    body = parse_invocation(await request.body(), request.headers.get("content-type"))
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    _check_texts(state, texts, "input")
    variant, task = _pick_any(state, request)
    if task == "classify":
        return await _classify(state, variant, response, rid=rid, texts=texts, endpoint=INVOCATIONS_PATH)
    options = body.parameters or InvocationParameters()
    asked = options.max_new_tokens if options.max_new_tokens is not None else options.max_tokens
    params = _params(options, _max_tokens(state, asked, 16))
    return await _complete(state, variant, response, rid=rid, prompts=texts, params=params, endpoint=INVOCATIONS_PATH)


# ---- Vertex AI's container contract ----------------------------------------------------------------------------
_PREDICT_SHAPES = (
    'send {"instances": ["text", {"inputs": "text"}, {"text": "text"}], "parameters": {...}} (one prediction per '
    "instance)"
)
_INSTANCE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "object", "properties": {"inputs": {"type": "string"}}, "required": ["inputs"]},
        {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    ]
}
_PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "instances": {"type": "array", "items": _INSTANCE_SCHEMA, "minItems": 1},
                        "parameters": {
                            "type": "object",
                            "description": "causal LMs: max_new_tokens (or max_tokens), temperature, top_p, stop, seed",
                        },
                    },
                    "required": ["instances"],
                    "additionalProperties": False,
                }
            }
        },
    }
}


def parse_prediction(body: bytes, content_type: str | None) -> PredictRequest:
    """The body of Vertex AI's prediction call (:class:`PredictRequest`); anything else is a :class:`BadRequest`
    (415 for another content type than JSON) whose message shows the accepted shape."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media not in ("application/json", "*/*", "") and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media!r} is not supported: use application/json ({_PREDICT_SHAPES})")
    try:
        payload = json.loads(body.decode("utf-8")) if body.strip() else None
    except UnicodeDecodeError as err:
        raise BadRequest(f"request body is not UTF-8 text ({err})") from None
    except ValueError as err:
        raise BadRequest(f"request body is not valid JSON: {err}; {_PREDICT_SHAPES}") from None
    if not isinstance(payload, dict):
        got = "an empty body" if payload is None else f"a JSON {type(payload).__name__}"
        raise BadRequest(f"expected a JSON object with 'instances', got {got}: {_PREDICT_SHAPES}")
    try:
        return PredictRequest.model_validate(payload)
    except ValidationError as err:
        raise BadRequest(_validation_message(err, _PREDICT_SHAPES)) from None


async def health(state: State) -> JSONResponse:
    """Vertex AI's health check (``$AIP_HEALTH_ROUTE``): 200 once every non-shadow variant with traffic is loaded,
    else 503 (as ``/ping``)."""
    return await ping(state)


async def predict(request: Request, response: Response, state: State, rid: RequestId) -> Any:
    """Vertex AI's prediction call (``$AIP_PREDICT_ROUTE``): one prediction per instance, a classifier's what
    ``/v1/classify`` answers per text, a causal LM's generated ``text`` and ``finish_reason`` (``parameters`` as
    for ``/invocations``); ``deployedModelId`` is ``$AIP_DEPLOYED_MODEL_ID``. Counted in the metrics and the
    request log under the route's path."""
    body = parse_prediction(await request.body(), request.headers.get("content-type"))
    try:
        texts = body.texts()
    except ValueError as err:
        raise BadRequest(f"{err} ({_PREDICT_SHAPES})") from None
    _check_texts(state, texts, "instance")
    endpoint = state.config.predict_route or request.url.path
    variant, task = _pick_any(state, request)
    predictions: list[dict[str, Any]]
    if task == "classify":
        classified = await _classify(state, variant, response, rid=rid, texts=texts, endpoint=endpoint)
        predictions = [result.model_dump() for result in classified.results]
    else:
        options = body.parameters or InvocationParameters()
        asked = options.max_new_tokens if options.max_new_tokens is not None else options.max_tokens
        params = _params(options, _max_tokens(state, asked, 16))
        completed = await _complete(state, variant, response, rid=rid, prompts=texts, params=params, endpoint=endpoint)
        predictions = [{"text": c["text"], "finish_reason": c["finish_reason"]} for c in completed["choices"]]
    answer: dict[str, Any] = {"predictions": predictions}
    if state.config.deployed_model_id is not None:
        answer["deployedModelId"] = state.config.deployed_model_id
    return answer


def vertex_router(health_route: str | None, predict_route: str | None) -> APIRouter:
    """Vertex AI's routes, at the paths it gives its container (``$AIP_HEALTH_ROUTE``, ``$AIP_PREDICT_ROUTE``);
    empty when neither is set."""
    vertex = APIRouter(tags=["vertex-ai"])
    if health_route:
        vertex.add_api_route(
            health_route,
            health,
            methods=["GET"],
            name="vertex_health",
            responses={503: {"description": "a variant with traffic is not loaded"}},
        )
    if predict_route:
        vertex.add_api_route(
            predict_route,
            predict,
            methods=["POST"],
            name="vertex_predict",
            dependencies=[Depends(_api_key)],
            openapi_extra=_PREDICT_OPENAPI,
            responses={
                200: {"model": PredictResponse},
                400: {"description": "bad input; the JSON error says what to send"},
            },
        )
    return vertex
