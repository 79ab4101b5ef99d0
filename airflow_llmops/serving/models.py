"""Served models behind one small interface, and the loader registry that picks a loader from a folder's contents.

Built in: Hugging Face sequence classifiers and causal LMs (``save_pretrained`` folders), quantized artifacts
(``quantization.json``, through :mod:`airflow_llmops.ml.quantization` when it can load them; an ONNX causal LM
through :mod:`airflow_llmops.serving.onnx_generation`) and ``echo://``, a
trivial model for tests and for measuring the router's own overhead. Add a format with :func:`register_loader`.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from airflow_llmops.ml.predict import LabelScores
from airflow_llmops.ml.predict import is_causal_lm as _is_causal_lm
from airflow_llmops.ml.predict import is_classifier as _is_classifier
from airflow_llmops.serving.errors import BadRequest, ModelLoadError
from airflow_llmops.serving.sources import ECHO_SOURCE, ModelFolder

Task = Literal["classify", "generate"]
TextCallback = Callable[[str], None]
_LOAD_LOCK = threading.Lock()
FORWARD_CHUNK = 8  # texts per forward pass inside one batch (see HFClassifier.classify)
DEFAULT_DECODE_BATCH = 16  # sequences a causal LM decodes together (the server's --max-decode-batch-size)


#: One text's prediction (label, its probability, every label's probability, tokens read): the ML core's type.
Classification = LabelScores


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class ServedModel(Protocol):
    """What the server asks of a model. Methods run in the variant's worker thread, never on the event loop."""

    kind: str
    tasks: frozenset[Task]

    def classify(self, texts: Sequence[str]) -> list[Classification]: ...

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> str: ...

    def generate(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> Generation: ...


@runtime_checkable
class BatchedGenerator(Protocol):
    """A model whose generations queue for a shared decode loop instead of holding the variant's worker thread."""

    def submit(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> concurrent.futures.Future[Generation]: ...


class _NoClassify:
    def classify(self, texts: Sequence[str]) -> list[Classification]:
        raise BadRequest(f"this variant's model is a {getattr(self, 'kind', '?')}; it cannot classify")


class _NoGenerate:
    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        raise BadRequest(f"this variant's model is a {getattr(self, 'kind', '?')}; it cannot generate")

    def generate(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> Generation:
        raise BadRequest(f"this variant's model is a {getattr(self, 'kind', '?')}; it cannot generate")


def encode_prompt(tokenizer: Any, prompt: str, *, context: int, start_id: int | None, max_tokens: int) -> list[int]:
    """A generation prompt's token ids (no special tokens added: the chat template wrote its own); an empty prompt
    starts from ``start_id``; a prompt that leaves no room in the ``context`` is a bad request."""
    ids = [int(i) for i in tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if not ids:
        if start_id is None:
            raise BadRequest("the prompt is empty and this model has no BOS/EOS token to start from")
        ids = [start_id]
    if len(ids) >= context:
        raise BadRequest(
            f"the prompt is {len(ids)} tokens; this model's context is {context} tokens "
            f"(prompt + max_tokens={max_tokens} must fit); shorten the prompt"
        )
    return ids


def render_chat_prompt(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> str:
    """The conversation through the tokenizer's chat template with the assistant's turn opened, or
    :func:`plain_chat_prompt` for a tokenizer without one."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": role, "content": content} for role, content in messages]
        return str(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    return plain_chat_prompt(messages)


def plain_chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """``role: content`` lines and an open ``assistant:`` turn, for tokenizers without a chat template."""
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


class EchoModel:
    """Answers without any model: label ``echo``; generation repeats the prompt's words (tests, benchmarks)."""

    kind = "echo"
    tasks: frozenset[Task] = frozenset({"classify", "generate"})

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        return [Classification("echo", 1.0, {"echo": 1.0}, len(t.split())) for t in texts]

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        return messages[-1][1] if messages else ""

    def generate(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> Generation:
        words = prompt.split()
        out = words[: params.max_tokens]
        for i, word in enumerate(out):
            if on_text is not None:
                on_text(word if i == 0 else " " + word)
        reason: Literal["stop", "length"] = "length" if len(words) > params.max_tokens else "stop"
        return Generation(" ".join(out), reason, len(words), len(out))


class HFClassifier(_NoGenerate):
    """A ``*ForSequenceClassification`` folder, run by :func:`airflow_llmops.ml.predict.classify`: texts sorted by
    length in chunks of :data:`FORWARD_CHUNK`, softmax scores per label, at most 512 tokens read."""

    kind = "classifier"
    tasks: frozenset[Task] = frozenset({"classify"})

    def __init__(self, folder: ModelFolder) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from airflow_llmops.ml import predict as P

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer_path), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder.path), local_files_only=True)
        self.model.eval()  # type: ignore[no-untyped-call]
        self.labels = P.class_labels(self.model.config)
        self.max_length = P.input_limit(self.model.config, self.tokenizer, 512)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        from airflow_llmops.ml import predict as P

        return P.classify(self.model, self.tokenizer, texts, max_length=self.max_length, batch_size=FORWARD_CHUNK)


class HFCausalLM(_NoClassify):
    """A ``*ForCausalLM`` / ``*LMHeadModel`` folder, decoded token by token with its KV cache (streams text).

    Generations run in the model's decode loop (:class:`~airflow_llmops.serving.generation.DecodeEngine`): requests
    that arrive together decode together, each with its own parameters."""

    kind = "causal_lm"
    tasks: frozenset[Task] = frozenset({"generate"})

    def __init__(self, folder: ModelFolder | None, *, loaded: tuple[Any, Any] | None = None) -> None:
        """From a ``save_pretrained`` folder, or ``loaded=(model, tokenizer)`` already in memory (a quantized
        artifact's model)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from airflow_llmops.ml.predict import decode, stop_token_ids

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        self._torch = torch
        if loaded is not None:
            self.model, self.tokenizer = loaded
        else:
            assert folder is not None
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer_path), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(folder.path), local_files_only=True)
        self.model.eval()
        config = self.model.config
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.context = int(context or 1024)
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else config.eos_token_id
        self.eos_id: int | None = int(eos) if isinstance(eos, int) else None
        # EOS, and for a chat model the role markers / end-of-turn tokens: the rule the evaluation uses too.
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else config.bos_token_id
        self.start_id: int | None = int(bos) if isinstance(bos, int) else self.eos_id
        # transformers 5.x renamed the KV cache argument and output `past_key_values` -> `cache`.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        from airflow_llmops.serving.generation import DecodeEngine

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.engine = DecodeEngine(
            self.model,
            cache_arg=self._cache_arg,
            decode=lambda ids: decode(self.tokenizer, ids),
            pick=self._pick,
            stop_ids=self.stop_ids,
            pad_id=int(pad) if isinstance(pad, int) else 0,
            max_batch_size=DEFAULT_DECODE_BATCH,
        )

    def chat_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        return render_chat_prompt(self.tokenizer, messages)

    def _encode(self, prompt: str, max_tokens: int) -> list[int]:
        return encode_prompt(
            self.tokenizer, prompt, context=self.context, start_id=self.start_id, max_tokens=max_tokens
        )

    def _pick(self, logits: Any, params: GenerationParams, generator: Any) -> int:
        from airflow_llmops.ml.predict import pick_token

        return pick_token(logits, params.temperature, params.top_p, generator)

    def submit(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> concurrent.futures.Future[Generation]:
        """Queue a generation for the decode loop (continuous batching with the other requests, see
        :mod:`airflow_llmops.serving.generation`); a bad prompt raises here, before anything is queued.
        ``on_text`` is called from the loop's thread."""
        from airflow_llmops.serving.generation import Sequence

        prompt_ids = self._encode(prompt, params.max_tokens)
        generator = None
        if params.seed is not None:
            generator = self._torch.Generator().manual_seed(params.seed & 0x7FFF_FFFF_FFFF_FFFF)
        seq = Sequence(
            prompt_ids,
            params,
            budget=min(params.max_tokens, self.context - len(prompt_ids)),
            generator=generator,
            on_text=on_text,
            cancelled=cancelled,
        )
        if seq.budget <= 0 or cancelled.is_set():
            seq.future.set_result(Generation("", "length", len(prompt_ids), 0))
            return seq.future
        return self.engine.submit(seq)

    def generate(
        self, prompt: str, params: GenerationParams, *, on_text: TextCallback | None, cancelled: threading.Event
    ) -> Generation:
        """:meth:`submit`, then wait for the answer (decoded in the batch with whatever else is running)."""
        return self.submit(prompt, params, on_text=on_text, cancelled=cancelled).result()

    def configure_batching(
        self, *, max_batch_size: int | None = None, observer: Any = None, name: str | None = None
    ) -> None:
        """The server's settings for this model's decode loop: batch bound, metrics, a name for its thread."""
        if name is not None:
            self.engine.name = name
        self.engine.configure(max_batch_size=max_batch_size, observer=observer)

    def close(self, drain_s: float = 30.0) -> None:
        """Stop the decode loop once what it holds is answered (at most ``drain_s``); blocks."""
        self.engine.close(drain_s)


class QuantizedClassifier(_NoGenerate):
    """A quantized classification artifact (``quantization.json``), run by the quantization stage's predictor."""

    kind = "classifier"
    tasks: frozenset[Task] = frozenset({"classify"})

    def __init__(self, folder: ModelFolder) -> None:
        from airflow_llmops.ml.quantization.predictors import load_predictor

        self._predictor: Any = load_predictor(folder.path)
        self.labels = [str(label) for label in self._predictor.labels]

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        results: list[Classification] = self._predictor.classify(list(texts))
        return results


@dataclass(frozen=True)
class Loader:
    """Loads a model folder whose contents ``matches`` recognises."""

    name: str
    matches: Callable[[ModelFolder], bool]
    load: Callable[[ModelFolder], ServedModel]


def _config(folder: ModelFolder) -> dict[str, Any]:
    """The folder's parsed ``config.json`` (empty when it has none)."""
    try:
        config = json.loads((folder.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _architectures(folder: ModelFolder) -> list[str]:
    from airflow_llmops.ml.predict import architectures

    return architectures(_config(folder))


def _quantized_task(folder: ModelFolder) -> str | None:
    try:
        meta = json.loads((folder.path / "quantization.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(meta.get("task")) if isinstance(meta, dict) else None


def _load_quantized(folder: ModelFolder) -> ServedModel:
    task = _quantized_task(folder)
    try:
        if task == "classification":
            return QuantizedClassifier(folder)
        if task == "causal_lm":
            from airflow_llmops.ml.quantization.causal import OnnxCausalPredictor
            from airflow_llmops.ml.quantization.predictors import TorchPredictor, load_predictor

            predictor = load_predictor(folder.path)
            if isinstance(predictor, TorchPredictor):  # a quantized torch module: served like the full-precision one
                return HFCausalLM(None, loaded=(predictor.model, predictor.tokenizer))
            if isinstance(predictor, OnnxCausalPredictor):  # the KV-cache graph, in the same decode loop
                from airflow_llmops.serving.onnx_generation import OnnxServedCausalLM

                return OnnxServedCausalLM(predictor)
            raise ModelLoadError(
                f"{folder.path}: a {predictor.method} causal LM cannot generate here (torch and ONNX artifacts can)"
            )
    except ModelLoadError:
        raise
    except Exception as err:  # the quantization package's errors, a missing runtime, unreadable files
        raise ModelLoadError(f"{folder.path}: cannot load the quantized {task!r} artifact ({err})") from None
    raise ModelLoadError(f"{folder.path}: serving quantized {task!r} artifacts is not supported")


_LOADERS: list[Loader] = [
    Loader("echo", lambda f: f.source == ECHO_SOURCE, lambda f: EchoModel()),
    Loader("quantized", lambda f: (f.path / "quantization.json").is_file(), _load_quantized),
    Loader(
        "hf-classifier",
        lambda f: _is_classifier(_config(f)),
        HFClassifier,
    ),
    Loader(
        "hf-causal-lm",
        lambda f: _is_causal_lm(_config(f)),
        HFCausalLM,
    ),
]


def register_loader(loader: Loader, *, first: bool = True) -> None:
    """Add a loader; ``first`` puts it before the built-in ones, so it can take over a folder they would load."""
    _LOADERS[:] = [x for x in _LOADERS if x.name != loader.name]
    _LOADERS.insert(0 if first else len(_LOADERS), loader)


def load_model(folder: ModelFolder) -> ServedModel:
    """Load ``folder`` with the first loader that recognises it."""
    for loader in _LOADERS:
        if loader.matches(folder):
            try:
                # One load at a time: transformers' lazy imports race when two threads import at once
                # ("cannot import name 'AutoModelForCausalLM'"), and two loads on a small machine gain nothing.
                with _LOAD_LOCK:
                    return loader.load(folder)
            except ModelLoadError:
                raise
            except (OSError, ValueError, KeyError, ImportError) as err:
                raise ModelLoadError(f"cannot load {folder.path} as {loader.name}: {err}") from None
    archs = _architectures(folder) or "none"
    raise ModelLoadError(
        f"no loader for {Path(folder.path)} (architectures: {archs}); the server serves *ForSequenceClassification "
        f"and *ForCausalLM/*LMHeadModel folders, quantized artifacts and echo://; known loaders: "
        f"{[x.name for x in _LOADERS]}"
    )
