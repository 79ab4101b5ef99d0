"""Continuous (iteration-level) batching for causal LMs: one decode loop thread per loaded model.

Every request becomes a *sequence* in a queue. The loop thread, at each iteration:

1. drops sequences whose client went away (``cancelled`` set, or their future cancelled);
2. runs one decode step for the running batch: one forward pass with each sequence's last token, its own
   position id, and an attention mask that hides the left padding of the shared KV cache;
3. admits waiting sequences (up to ``max_batch_size`` in all): their prompts are prefilled together, left-padded,
   and their KV cache is merged into the running batch's, so they decode with it from the next step on.

Each sequence keeps its own ``max_tokens``, temperature / top-p, seed (a ``torch.Generator`` of its own), stop
sequences and streaming callback, and leaves the batch (its cache rows cut out) the step it finishes. All of them
stop at the model's stop tokens (:func:`airflow_llmops.ml.predict.stop_token_ids`: EOS, and for a chat model its
turn markers, as the evaluation's answers do).

The KV cache layout: ``[batch, heads, L, head_dim]`` per layer, every sequence's tokens right-aligned (the left
columns of a shorter one are padding, masked out), so one new column per step serves the whole batch; when
sequences leave, the columns no remaining sequence uses are cut off, so ``L`` is the longest remaining sequence.
Merging needs the cache to be a plain ``DynamicCache`` of ``DynamicLayer``\\ s (full attention; what GPT-2, Llama,
Qwen... use); for any other cache (sliding windows, linear attention) the engine falls back to *static* batching:
waiting sequences are admitted together once the running batch has finished.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from airflow_llmops.serving.errors import Unavailable

if TYPE_CHECKING:
    from airflow_llmops.serving.models import Generation, GenerationParams, TextCallback

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 1.0


class GenerationObserver(Protocol):
    """Where the engine reports what it does (the server's Prometheus metrics); every method must be cheap."""

    def batch(self, running: int, waiting: int) -> None: ...

    def forward(self, sequences: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def next_token(self, seconds: float) -> None: ...

    def decode_step(self, tokens: int, seconds: float) -> None: ...

    def generated(self, tokens: int) -> None: ...


class _NoObserver:
    def batch(self, running: int, waiting: int) -> None:
        pass

    def forward(self, sequences: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def next_token(self, seconds: float) -> None:
        pass

    def decode_step(self, tokens: int, seconds: float) -> None:
        pass

    def generated(self, tokens: int) -> None:
        pass


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt_ids: list[int]
    params: GenerationParams
    budget: int
    generator: Any
    on_text: TextCallback | None
    cancelled: threading.Event
    future: concurrent.futures.Future[Generation] = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.perf_counter)
    stops: tuple[str, ...] = ()
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish: Literal["stop", "length"] = "length"
    length: int = 0  # tokens of this sequence in the KV cache
    pending: int = 0  # the last token picked: the input of its next decode step
    last_token_at: float | None = None
    done: bool = False
    hold: int = 0  # characters held back from the stream: they may still become a stop sequence

    def __post_init__(self) -> None:
        self.stops = tuple(s for s in self.params.stop if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def gone(self) -> bool:
        return self.cancelled.is_set() or self.future.cancelled()


class DecodeEngine:
    """The decode loop of one causal LM (see the module docstring). ``submit`` is thread-safe."""

    def __init__(
        self,
        model: Any,
        *,
        cache_arg: str,
        decode: Callable[[list[int]], str],
        pick: Callable[[Any, GenerationParams, Any], int],
        stop_ids: frozenset[int] | set[int] = frozenset(),
        pad_id: int,
        max_batch_size: int = 16,
        name: str = "model",
    ) -> None:
        import inspect

        import torch

        self._torch = torch
        self.model = model
        self._cache_arg = cache_arg
        self._decode = decode
        self._pick = pick
        # EOS and, for a chat model, its turn markers (airflow_llmops.ml.predict.stop_token_ids): never emitted.
        self.stop_ids = frozenset(stop_ids)
        self.pad_id = pad_id
        self.name = name
        self.observer: GenerationObserver = _NoObserver()
        params = inspect.signature(model.forward).parameters
        # Left padding needs per-sequence positions and a padding mask; without them, one sequence at a time.
        self._paddable = "position_ids" in params and "attention_mask" in params
        self._logits_to_keep = "logits_to_keep" in params
        self.max_batch_size = max_batch_size if self._paddable else 1
        self.mergeable = self._paddable  # until a prefill returns a cache that cannot be merged
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._running = 0

    # ---- the caller's side -------------------------------------------------------------------------------------
    def configure(self, *, max_batch_size: int | None = None, observer: GenerationObserver | None = None) -> None:
        if max_batch_size is not None:
            self.max_batch_size = max(1, max_batch_size) if self._paddable else 1
        if observer is not None:
            self.observer = observer

    def submit(self, seq: Sequence) -> concurrent.futures.Future[Generation]:
        with self._cond:
            if not self._accepting:
                raise Unavailable(f"{self.name} is shutting down; retry on another replica or variant")
            self._waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"decode-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return seq.future

    @property
    def busy(self) -> int:
        """Sequences running or waiting."""
        with self._cond:
            return self._running + len(self._waiting)

    def close(self, drain_s: float = 30.0) -> None:
        """Take no new sequence, let the admitted and waiting ones finish for up to ``drain_s``, then stop; what
        is left fails as unavailable. Blocks (call it from a worker thread)."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + drain_s
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10.0)
        with self._cond:  # the loop never started, or it is stuck in a forward pass
            left, self._waiting = list(self._waiting), collections.deque()
        for seq in left:
            _fail(seq, Unavailable(f"{self.name} was removed while the request waited"))

    # ---- the loop thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch = self._torch
        rows: list[Sequence] = []
        left: list[Sequence] = []
        cache: Any = None
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not rows and not self._waiting and not self._stopping:
                        self._cond.wait(_IDLE_WAIT_S)
                    if self._stopping:
                        left = rows + list(self._waiting)
                        self._waiting.clear()
                        self._running = 0
                        break
                    newcomers: list[Sequence] = []
                    if self.mergeable or not rows:
                        while self._waiting and len(rows) + len(newcomers) < self.max_batch_size:
                            seq = self._waiting.popleft()
                            if seq.gone:
                                self._finish(seq)
                            else:
                                newcomers.append(seq)
                    self._running = len(rows) + len(newcomers)
                try:
                    rows, cache = self._iterate(rows, cache, newcomers)
                except Exception as err:  # e.g. a cache merge out of memory: fail this batch, keep the loop serving
                    log.exception("%s: batching failed for %d sequence(s)", self.name, len(rows) + len(newcomers))
                    for seq in [*rows, *newcomers]:
                        if not seq.done:
                            _fail(seq, err)
                    rows, cache = [], None
                with self._cond:
                    self._running = len(rows)
                    waiting = len(self._waiting)
                self.observer.batch(len(rows), waiting)
        for seq in left:
            _fail(seq, Unavailable(f"{self.name} was removed while the request ran"))
        self.observer.batch(0, 0)

    def _iterate(self, rows: list[Sequence], cache: Any, newcomers: list[Sequence]) -> tuple[list[Sequence], Any]:
        """One decode step for the running batch, then the newcomers prefilled and merged into it."""
        rows, cache = self._drop_gone(rows, cache)
        if rows:
            try:
                rows, cache = self._step(rows, cache)
            except Exception as err:  # one forward pass for all: all of them fail
                log.exception("%s: decode step failed for %d sequence(s)", self.name, len(rows))
                for seq in rows:
                    _fail(seq, err)
                rows, cache = [], None
        for joined, joined_cache in self._prefill_isolated(newcomers):
            rows, cache = self._merge(rows, cache, joined, joined_cache)
        return rows, cache

    def _finish(self, seq: Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.on_text is not None and len(seq.text) > seq.sent and not seq.gone:
            try:
                seq.on_text(seq.text[seq.sent :])
            except Exception as err:
                _fail(seq, err)
                return
            seq.sent = len(seq.text)
        from airflow_llmops.serving.models import Generation

        result = Generation(seq.text, seq.finish, len(seq.prompt_ids), len(seq.generated))
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by the caller meanwhile
            seq.future.set_result(result)

    def _drop_gone(self, rows: list[Sequence], cache: Any) -> tuple[list[Sequence], Any]:
        gone = [i for i, seq in enumerate(rows) if not seq.done and seq.gone]
        for i in gone:
            self._finish(rows[i])
        return self._keep(rows, cache) if gone else (rows, cache)

    def _accept_all(self, rows: list[Sequence], tokens: list[int]) -> None:
        now = time.perf_counter()
        for seq, token in zip(rows, tokens, strict=True):
            self._accept(seq, token, now)
        self.observer.generated(sum(1 for token in tokens if token not in self.stop_ids))

    def _accept(self, seq: Sequence, token: int, now: float) -> None:
        """Take the token picked for ``seq``; marks it done when it finished (EOS, stop, length, client gone)."""
        if seq.last_token_at is None:
            self.observer.first_token(now - seq.submitted)
        else:
            self.observer.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        if token in self.stop_ids:
            seq.finish = "stop"
            self._finish(seq)
            return
        seq.generated.append(token)
        seq.pending = token
        text = self._decode(seq.generated)
        cut = min((i for i in (text.find(s) for s in seq.stops) if i >= 0), default=-1)
        if cut >= 0:
            seq.text, seq.finish = text[:cut], "stop"
            self._finish(seq)
            return
        seq.text = text
        ready = len(text) - seq.hold
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            ready = min(ready, len(text) - 1)
        if seq.on_text is not None and ready > seq.sent:
            try:
                seq.on_text(text[seq.sent : ready])
            except Exception as err:
                _fail(seq, err)
                return
            seq.sent = ready
        if len(seq.generated) >= seq.budget or seq.gone:
            self._finish(seq)

    def _pick_all(self, rows: list[Sequence], logits: Any) -> list[int]:
        """One token per row of ``logits`` (``[batch, vocab]``): greedy rows in one argmax, sampled ones each with
        its own generator."""
        from airflow_llmops.ml.predict import GREEDY_BELOW

        greedy = logits.argmax(dim=-1).tolist()
        return [
            int(greedy[i])
            if seq.params.temperature < GREEDY_BELOW
            else self._pick(logits[i], seq.params, seq.generator)
            for i, seq in enumerate(rows)
        ]

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any, *, last_only: bool) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True, self._cache_arg: cache}
        if self._paddable:
            kwargs.update(attention_mask=mask, position_ids=positions)
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self.observer.forward(int(input_ids.shape[0]))
        out = self.model(**kwargs)
        return out.logits[:, -1, :], getattr(out, self._cache_arg)

    def _step(self, rows: list[Sequence], cache: Any) -> tuple[list[Sequence], Any]:
        """One decode step of the running batch (finished rows of a static batch ride along, ignored)."""
        torch = self._torch
        started = time.perf_counter()
        width = _cache_length(cache) + 1
        lengths = torch.tensor([seq.length + 1 for seq in rows])
        mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
        positions = torch.tensor([[seq.length] for seq in rows])
        input_ids = torch.tensor([[seq.pending] for seq in rows])
        logits, cache = self._forward(input_ids, mask, positions, cache, last_only=False)
        live = [seq for seq in rows if not seq.done]
        tokens = self._pick_all(live, logits[[i for i, seq in enumerate(rows) if not seq.done]])
        for seq in rows:
            seq.length += 1
        self._accept_all(live, tokens)
        self.observer.decode_step(len(live), time.perf_counter() - started)
        return self._keep(rows, cache)

    def _prefill_isolated(self, seqs: list[Sequence]) -> list[tuple[list[Sequence], Any]]:
        """Prefill together; when that fails, each alone, so one bad prompt fails only itself. (A static batch
        cannot take several caches: there the first that prefills runs, the others wait for the next batch.)"""
        if not seqs:
            return []
        try:
            return [self._prefill(seqs)]
        except Exception as err:
            if len(seqs) == 1:
                log.exception("%s: prefill failed", self.name)
                _fail(seqs[0], err)
                return []
        out: list[tuple[list[Sequence], Any]] = []
        for i, seq in enumerate(seqs):
            if out and not self.mergeable:
                with self._cond:
                    self._waiting.extendleft(reversed(seqs[i:]))
                break
            out += self._prefill_isolated([seq])
        return out

    def _prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], Any]:
        torch = self._torch
        width = max(len(seq.prompt_ids) for seq in seqs)
        input_ids = torch.tensor([[self.pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs])
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        logits, cache = self._forward(input_ids, mask, positions, None, last_only=True)
        if self.mergeable and not _mergeable(cache):
            log.warning("%s: its KV cache (%s) cannot be merged; batching statically", self.name, type(cache).__name__)
            self.mergeable = False
        for seq in seqs:
            seq.length = len(seq.prompt_ids)
        self._accept_all(seqs, self._pick_all(seqs, logits))
        return self._keep(seqs, cache)

    def _keep(self, rows: list[Sequence], cache: Any) -> tuple[list[Sequence], Any]:
        """The rows still running, and the cache cut down to them (rows and the padding columns nobody uses)."""
        keep = [i for i, seq in enumerate(rows) if not seq.done]
        if len(keep) == len(rows):
            return rows, cache
        if not keep:
            return [], None
        if not self.mergeable:  # a static batch: finished rows stay until all are done (their output ignored)
            return rows, cache
        torch = self._torch
        index = torch.tensor(keep)
        cut = _cache_length(cache) - max(rows[i].length for i in keep)
        for layer in cache.layers:
            layer.keys = layer.keys[index, :, cut:, :]
            layer.values = layer.values[index, :, cut:, :]
        return [rows[i] for i in keep], cache

    def _merge(
        self, rows: list[Sequence], cache: Any, new: list[Sequence], new_cache: Any
    ) -> tuple[list[Sequence], Any]:
        """The running batch with ``new`` appended: both caches left-padded to the longer one, stacked."""
        if not new:
            return rows, cache
        if not rows:
            return new, new_cache
        functional = self._torch.nn.functional
        old_len, new_len = _cache_length(cache), _cache_length(new_cache)
        width = max(old_len, new_len)
        for layer, joined in zip(cache.layers, new_cache.layers, strict=True):
            for attr in ("keys", "values"):
                a = functional.pad(getattr(layer, attr), (0, 0, width - old_len, 0))
                b = functional.pad(getattr(joined, attr), (0, 0, width - new_len, 0))
                setattr(layer, attr, self._torch.cat([a, b], dim=0))
        return rows + new, cache


def _fail(seq: Sequence, err: BaseException) -> None:
    seq.done = True
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        seq.future.set_exception(err)


def _cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def _mergeable(cache: Any) -> bool:
    """A plain dynamic cache of full-attention layers holding ``[batch, heads, length, head_dim]`` tensors."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    if type(cache) is not DynamicCache:
        return False
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    return bool(layers) and all(
        type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None and layer.keys.dim() == 4
        for layer in layers
    )
