"""``--backend vllm``: causal-LM variants generate through vLLM's engine behind the same API.

On a CUDA machine with the ``vllm`` package installed, the server can hand a full-precision causal LM folder to
vLLM's ``AsyncLLMEngine`` (paged attention, its own continuous batching and CUDA kernels) instead of the built-in
decode loop (:mod:`airflow_llmops.serving.generation`). Everything around generation stays the server's: routes,
the OpenAI-compatible schemas, streaming, traffic split, shadows, canary metrics, output PII redaction, the
request log. What the variant hands vLLM per request:

- the prompt as token ids (tokenized by the server with the model's tokenizer, so the context check and the
  ``prompt_tokens`` count are the built-in backend's);
- ``max_tokens`` (cut to what the context leaves), ``temperature`` (0: greedy), ``top_p``, ``seed``, the stop
  strings, and the stop token ids of :func:`airflow_llmops.ml.predict.stop_token_ids` (EOS, and a chat model's
  role markers: the rule the built-in loop and the evaluation follow), never included in the text;
- a client that goes away aborts its request in the engine (``engine.abort``).

vLLM runs its engine on an asyncio loop; the server's variant workers are threads, so the backend keeps one event
loop in a thread of its own and hands back ``concurrent.futures.Future`` objects, as the built-in decode loop does.

Quantized artifacts (``quantization.json``), classifiers and ``echo://`` keep their own loaders; a machine without
CUDA or without vLLM is refused when the server starts, with what is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from airflow_llmops.serving.errors import BadRequest, ModelLoadError
from airflow_llmops.serving.models import (
    Classification,
    Generation,
    GenerationParams,
    Loader,
    Task,
    TextCallback,
    encode_prompt,
    register_loader,
    render_chat_prompt,
)
from airflow_llmops.serving.sources import ModelFolder

log = logging.getLogger(__name__)
BACKENDS = ("hf", "vllm")
_IDS = itertools.count()


def vllm_unavailable() -> str | None:
    """Why ``--backend vllm`` cannot run here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False)"
    try:
        importlib.import_module("vllm")
    except ImportError as err:
        return f"the vllm package is not installed ({err}); pip install vllm on the CUDA machine"
    return None


def install(engine_options: dict[str, Any] | None = None) -> None:
    """Make causal-LM folders load through vLLM in this server; refuse with the reason where it cannot run."""
    reason = vllm_unavailable()
    if reason is not None:
        raise ModelLoadError(f"--backend vllm: {reason}; use --backend hf (the built-in continuous batching)")
    options = dict(engine_options or {})
    register_loader(Loader("vllm-causal-lm", _is_plain_causal_lm, lambda f: VllmCausalLM(f, **options)))


def _is_plain_causal_lm(folder: ModelFolder) -> bool:
    from airflow_llmops.ml.predict import is_causal_lm

    if (folder.path / "quantization.json").is_file():
        return False
    try:
        config = json.loads((folder.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(is_causal_lm(config))


class _Loop:
    """One asyncio event loop in a daemon thread: where the engine lives and every request's coroutine runs."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10.0)


class VllmCausalLM:
    """A causal LM folder served by vLLM's ``AsyncLLMEngine`` (see the module docstring)."""

    kind = "causal_lm"
    tasks: frozenset[Task] = frozenset({"generate"})

    def __init__(self, folder: ModelFolder, *, vllm: Any = None, **engine_options: Any) -> None:
        """``vllm``: the module (the installed package by default); ``engine_options``: more ``AsyncEngineArgs``
        (``gpu_memory_utilization``, ``max_model_len``, ``dtype``...)."""
        from transformers import AutoConfig, AutoTokenizer

        from airflow_llmops.ml.predict import stop_token_ids

        self._vllm = vllm if vllm is not None else importlib.import_module("vllm")
        self.name = folder.path.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer_path), local_files_only=True)
        config = AutoConfig.from_pretrained(str(folder.path), local_files_only=True)
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.context = int(engine_options.get("max_model_len") or context or 1024)
        self.stop_ids = frozenset(stop_token_ids(self.tokenizer, config))
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else config.eos_token_id
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else config.bos_token_id
        start = bos if isinstance(bos, int) else eos
        self.start_id: int | None = int(start) if isinstance(start, int) else None
        self.observer: Any = None
        self._running = 0
        self._lock = threading.Lock()
        self._loop = _Loop(f"vllm-{self.name}")
        args = self._vllm.AsyncEngineArgs(
            model=str(folder.path), tokenizer=str(folder.tokenizer_path), max_model_len=self.context, **engine_options
        )
        try:
            self.engine = self._loop.run(self._create(args)).result()
        except Exception as err:
            self._loop.stop()
            reason = f"{type(err).__name__}: {err}"
            raise ModelLoadError(f"{folder.path}: vLLM could not load the model ({reason})") from None

    async def _create(self, args: Any) -> Any:
        return self._vllm.AsyncLLMEngine.from_engine_args(args)

    # ---- ServedModel -----------------------------------------------------------------------------------------
    def classify(self, texts: Sequence[str]) -> list[Classification]:
        raise BadRequest("this variant's model is a causal_lm; it cannot classify")

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        return render_chat_prompt(self.tokenizer, messages)

    def generate(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> Generation:
        return self.submit(prompt, params, on_text=on_text, cancelled=cancelled).result()

    def submit(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> concurrent.futures.Future[Generation]:
        """Queue the request in vLLM's engine; a bad prompt raises here. ``on_text`` runs on the engine's loop."""
        ids = encode_prompt(
            self.tokenizer, prompt, context=self.context, start_id=self.start_id, max_tokens=params.max_tokens
        )
        budget = min(params.max_tokens, self.context - len(ids))
        if budget <= 0 or cancelled.is_set():
            done: concurrent.futures.Future[Generation] = concurrent.futures.Future()
            done.set_result(Generation("", "length", len(ids), 0))
            return done
        return self._loop.run(self._generate(ids, self.sampling(params, budget), on_text, cancelled))

    def sampling(self, params: GenerationParams, budget: int) -> Any:
        """The request's ``SamplingParams``."""
        return self._vllm.SamplingParams(
            max_tokens=budget,
            temperature=max(0.0, params.temperature),
            top_p=params.top_p,
            seed=params.seed,
            stop=[s for s in params.stop if s],
            stop_token_ids=sorted(self.stop_ids),
            include_stop_str_in_output=False,
            skip_special_tokens=True,
        )

    async def _generate(
        self, ids: list[int], sampling: Any, on_text: TextCallback | None, cancelled: threading.Event
    ) -> Generation:
        request_id = f"{self.name}-{next(_IDS)}"
        text, tokens, finish = "", 0, "length"
        started = last = time.perf_counter()
        with self._lock:
            self._running += 1
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, sampling, request_id):
                if cancelled.is_set():
                    await self.engine.abort(request_id)
                    finish = "stop"
                    break
                completion = out.outputs[0]
                now = time.perf_counter()
                grown = len(completion.token_ids) - tokens
                if grown > 0 and self.observer is not None:
                    if tokens == 0:
                        self.observer.first_token(now - started)
                    else:
                        self.observer.next_token((now - last) / grown)
                last = now if grown > 0 else last
                tokens = len(completion.token_ids)
                delta = completion.text[len(text) :]
                if delta and on_text is not None:
                    on_text(delta)
                text = completion.text
                if out.finished:
                    finish = "length" if completion.finish_reason == "length" else "stop"
        finally:
            with self._lock:
                self._running -= 1
        if self.observer is not None:
            self.observer.generated(tokens)
        reason: Literal["stop", "length"] = "length" if finish == "length" else "stop"
        return Generation(text, reason, len(ids), tokens)

    @property
    def busy(self) -> int:
        with self._lock:
            return self._running

    def configure_batching(
        self, *, max_batch_size: int | None = None, observer: Any = None, name: str | None = None
    ) -> None:
        """vLLM schedules its own batches (``max_num_seqs`` among the engine options); metrics still reach the
        server's observer."""
        if observer is not None:
            self.observer = observer
        if name is not None:
            self.name = name

    def close(self, drain_s: float = 30.0) -> None:
        deadline = time.monotonic() + drain_s
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # best effort: the process is going away or the variant is removed
                log.warning("vLLM engine of %s did not shut down cleanly", self.name, exc_info=True)
        self._loop.stop()
