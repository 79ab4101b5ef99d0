"""Run one request on a variant: failure injection, metrics, the request log, and shadow copies afterwards."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from airflow_llmops.serving.errors import InjectedFault, InternalError, ServingError, Unavailable
from airflow_llmops.serving.models import (
    BatchedGenerator,
    Classification,
    Generation,
    GenerationParams,
    Task,
    TextCallback,
)
from airflow_llmops.serving.redaction import StreamRedactor, redacting_future
from airflow_llmops.serving.request_log import RequestLogWriter
from airflow_llmops.serving.telemetry import Telemetry
from airflow_llmops.serving.variants import Variant, VariantRegistry

T = TypeVar("T")
log = logging.getLogger(__name__)
CLIENT_GONE = 499  # nginx's code for "the client closed the connection"


@dataclass
class Answer(Generic[T]):
    """A variant's result plus what the log and metrics need: per-input outputs and token counts."""

    value: T
    outputs: list[dict[str, Any]] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0


Work = Callable[[Variant], Awaitable[Answer[T]]]


def classify_work(texts: list[str]) -> Work[list[Classification]]:
    async def work(variant: Variant) -> Answer[list[Classification]]:
        if variant.classifier is None:
            raise Unavailable(f"variant {variant.name!r} has no classifier running")
        results = await variant.classifier.submit(texts)
        outputs = [{"output": r.label, "score": round(r.score, 6), "tokens_in": r.tokens} for r in results]
        return Answer(results, outputs, tokens_in=sum(r.tokens for r in results))

    return work


async def start_generation(
    variant: Variant,
    prompt: str,
    params: GenerationParams,
    *,
    on_text: TextCallback | None,
    cancelled: threading.Event,
) -> concurrent.futures.Future[Generation]:
    """The generation's future: queued in the model's decode loop (batched with the other requests) when the model
    has one, else run whole in the variant's worker thread. Prompt errors raise here."""
    model = variant.model
    if model is None:
        raise Unavailable(f"variant {variant.name!r} is not loaded")
    count = variant.redact_output
    redactor = StreamRedactor(on_text) if count is not None else None
    if redactor is not None and on_text is not None:  # the stream gets the redacted text only
        on_text = redactor.feed
    loop = asyncio.get_running_loop()
    if isinstance(model, BatchedGenerator):  # tokenizing in the worker thread, decoding in the model's loop
        call = functools.partial(model.submit, prompt, params, on_text=on_text, cancelled=cancelled)
        future = await loop.run_in_executor(variant.executor, call)
    else:
        future = variant.executor.submit(model.generate, prompt, params, on_text=on_text, cancelled=cancelled)
    if redactor is None or count is None:
        return future
    return redacting_future(future, redactor, count)


def generate_work(prompt: str, params: GenerationParams) -> Work[Generation]:
    async def work(variant: Variant) -> Answer[Generation]:
        cancelled = threading.Event()
        try:
            future = await start_generation(variant, prompt, params, on_text=None, cancelled=cancelled)
            gen = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the caller went away: its sequence leaves the batch
            cancelled.set()
            raise
        return Answer(gen, [{"output": gen.text}], gen.prompt_tokens, gen.completion_tokens)

    return work


def _status_of(err: BaseException) -> tuple[int, str]:
    if isinstance(err, ServingError):
        return err.status_code, err.message
    if isinstance(err, asyncio.CancelledError):
        return CLIENT_GONE, "the client went away before the answer"
    return 500, f"{type(err).__name__}: {err}"


class Gateway:
    def __init__(
        self,
        registry: VariantRegistry,
        telemetry: Telemetry,
        request_log: RequestLogWriter | None,
        *,
        shadow_max_pending: int,
    ) -> None:
        self.registry = registry
        self.telemetry = telemetry
        self.request_log = request_log
        self.shadow_max_pending = shadow_max_pending
        self._shadows: set[asyncio.Task[None]] = set()

    async def _inject_fault(self, variant: Variant) -> None:
        fault = variant.spec.fault
        if fault is None or not self.registry.config.enable_fault_injection:
            return
        if fault.extra_latency_ms > 0:
            await asyncio.sleep(fault.extra_latency_ms / 1000.0)
        if fault.error_rate > 0 and random.random() < fault.error_rate:
            raise InjectedFault(
                f"injected fault: variant {variant.name!r} fails {fault.error_rate:.0%} of requests "
                '(failure injection for tests; clear it with PATCH /admin/variants/NAME {"clear_fault": true})'
            )

    def _record(
        self,
        variant: Variant,
        endpoint: str,
        request_id: str,
        inputs: Sequence[str],
        started: float,
        *,
        shadow: bool,
        status: int,
        outputs: Sequence[dict[str, Any]] = (),
        tokens_in: int = 0,
        tokens_out: int = 0,
        error: str | None = None,
    ) -> None:
        latency = time.perf_counter() - started
        self.telemetry.observe(
            variant.name,
            endpoint,
            shadow=shadow,
            latency_s=latency,
            error=status >= 500,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
        if self.request_log is None:
            return
        now = time.time()
        base = {
            "ts": now,
            "time": dt.datetime.fromtimestamp(now, tz=dt.timezone.utc).isoformat(),
            "request_id": request_id,
            "variant": variant.name,
            "shadow": shadow,
            "endpoint": endpoint,
            "status": status,
            "latency_ms": round(latency * 1000.0, 3),
        }
        for i, text in enumerate(inputs):
            record: dict[str, Any] = {**base, "index": i, "input": text, "output": None}
            # One input carries the request's totals; several carry their own counts (in their outputs).
            one = len(inputs) == 1
            record.update(tokens_in=tokens_in if one else 0, tokens_out=tokens_out if one else 0)
            if i < len(outputs):
                record.update(outputs[i])
            if error is not None:
                record["error"] = error
            self.request_log.append(record)

    async def run(
        self,
        variant: Variant,
        endpoint: str,
        request_id: str,
        inputs: Sequence[str],
        work: Work[T],
        *,
        shadow: bool = False,
    ) -> Answer[T]:
        started = time.perf_counter()
        try:
            await self._inject_fault(variant)
            answer = await work(variant)
        except (Exception, asyncio.CancelledError) as err:
            status, message = _status_of(err)
            self._record(variant, endpoint, request_id, inputs, started, shadow=shadow, status=status, error=message)
            if isinstance(err, (ServingError, asyncio.CancelledError)):
                raise
            # The details stay in the server log: an exception's text can hold paths, inputs or library internals.
            log.exception("request %s: variant %s failed on %s", request_id, variant.name, endpoint)
            raise InternalError(request_id) from err
        self._record(
            variant,
            endpoint,
            request_id,
            inputs,
            started,
            shadow=shadow,
            status=200,
            outputs=answer.outputs,
            tokens_in=answer.tokens_in,
            tokens_out=answer.tokens_out,
        )
        return answer

    def mirror(self, task: Task, endpoint: str, request_id: str, inputs: Sequence[str], work: Work[Any]) -> None:
        """Send a copy to each shadow variant in the background; their answers are logged, never returned."""
        for variant in self.registry.shadows_for(task):
            if len(self._shadows) >= self.shadow_max_pending:
                self.telemetry.shadow_dropped.inc()
                continue
            task_ = asyncio.get_running_loop().create_task(self._shadow(variant, endpoint, request_id, inputs, work))
            self._shadows.add(task_)
            task_.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, variant: Variant, endpoint: str, request_id: str, inputs: Sequence[str], work: Work[Any]
    ) -> None:
        # Counted in the shadow's metrics and log; a shadow never touches the caller's answer.
        with contextlib.suppress(ServingError):
            await self.run(variant, endpoint, request_id, inputs, work, shadow=True)

    async def close(self) -> None:
        for task in list(self._shadows):
            task.cancel()
        await asyncio.gather(*self._shadows, return_exceptions=True)

    async def stream(
        self,
        variant: Variant,
        *,
        endpoint: str,
        request_id: str,
        log_input: str,
        prompt: str,
        params: GenerationParams,
    ) -> AsyncGenerator[str | Generation, None]:
        """Text deltas as the model makes them, then the final :class:`Generation`.

        Failure injection and prompt checks fail on the first ``__anext__``, before any byte is sent, so the
        caller can still answer with a JSON error.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | Generation | BaseException] = asyncio.Queue()
        cancelled = threading.Event()
        if variant.model is None:
            raise Unavailable(f"variant {variant.name!r} is not loaded")

        def put(item: str | Generation | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop closed (shutdown)
                cancelled.set()

        def done(future: concurrent.futures.Future[Generation]) -> None:
            if future.cancelled():
                return
            err = future.exception()
            put(err if err is not None else future.result())

        started = time.perf_counter()
        status, final = CLIENT_GONE, None
        error: str | None = "the client went away during the stream"
        try:
            await self._inject_fault(variant)
            future = await start_generation(variant, prompt, params, on_text=put, cancelled=cancelled)
            future.add_done_callback(done)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Generation):
                    status, error, final = 200, None, item
                    break
        except Exception as err:
            status, error = _status_of(err)
            if isinstance(err, ServingError):
                raise
            log.exception("request %s: variant %s failed on %s", request_id, variant.name, endpoint)
            raise InternalError(request_id) from err
        finally:
            cancelled.set()
            outputs = [{"output": final.text}] if final is not None else []
            self._record(
                variant,
                endpoint,
                request_id,
                [log_input],
                started,
                shadow=False,
                status=status,
                outputs=outputs,
                tokens_in=final.prompt_tokens if final else 0,
                tokens_out=final.completion_tokens if final else 0,
                error=error,
            )
            if final is not None:
                self.mirror("generate", endpoint, request_id, [log_input], generate_work(prompt, params))
