"""Dynamic batching: concurrent requests to one variant are gathered and run as one call in its worker thread."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from airflow_llmops.serving.errors import Unavailable

P = TypeVar("P")
R = TypeVar("R")


@dataclass
class _Item(Generic[P, R]):
    payload: P
    size: int
    future: asyncio.Future[R]


class Batcher(Generic[P, R]):
    """Gathers payloads for up to ``max_delay_s`` or until ``max_size`` units (texts) are waiting, then runs them.

    One batch runs at a time on ``executor`` (the variant's single worker thread): while it runs, new requests
    queue up and form the next batch, so batches grow with load. The delay applies only while the previous batch
    held more than one request, so a lone client is not slowed down.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[P]], Sequence[R | BaseException]],
        executor: concurrent.futures.Executor,
        *,
        max_size: int,
        max_delay_s: float,
        size_of: Callable[[P], int] = lambda _: 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self._executor = executor
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._size_of = size_of
        self._on_batch = on_batch
        self._pending: collections.deque[_Item[P, R]] = collections.deque()
        self._inflight: list[_Item[P, R]] = []
        self._pending_size = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_size = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self, drain_s: float = 30.0) -> None:
        """Finish what was already submitted (for up to ``drain_s``), then stop; anything left fails as unavailable.

        Draining matters when a variant is removed under traffic (a rollback): the requests routed to it before its
        weight went to 0 are answered instead of hanging or failing."""
        deadline = time.monotonic() + drain_s
        while (self._pending or self._inflight) and self._task is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        left = [*self._inflight, *self._pending]
        self._inflight, self._pending = [], collections.deque()
        for item in left:
            if not item.future.done():
                item.future.set_exception(Unavailable(f"variant {self.name!r} was removed while the request waited"))

    async def submit(self, payload: P) -> R:
        if self._task is None:
            raise Unavailable(f"variant {self.name!r} was removed before the request reached it")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        size = max(1, self._size_of(payload))
        self._pending.append(_Item(payload, size, future))
        self._pending_size += size
        self._arrived.set()
        if self._pending_size >= self.max_size:
            self._full.set()
        return await future

    def _take(self) -> list[_Item[P, R]]:
        batch: list[_Item[P, R]] = []
        size = 0
        while self._pending and (not batch or size + self._pending[0].size <= self.max_size):
            item = self._pending.popleft()
            self._pending_size -= item.size
            if item.future.cancelled():  # the client went away while it waited
                continue
            batch.append(item)
            size += item.size
        if not self._pending:
            self._arrived.clear()
        if self._pending_size < self.max_size:
            self._full.clear()
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            # Wait for company only under load (the last batch had some): a lone client pays no delay.
            if self.max_delay_s > 0 and self._pending_size < self.max_size and self._last_size > 1:
                with contextlib.suppress(asyncio.TimeoutError):  # not the builtin before 3.11
                    await asyncio.wait_for(self._full.wait(), self.max_delay_s)
            batch = self._take()
            if not batch:
                continue
            self._last_size = sum(i.size for i in batch)
            if self._on_batch is not None:
                self._on_batch(self._last_size)
            self._inflight = batch
            try:
                results = await loop.run_in_executor(self._executor, self._run_isolated, [i.payload for i in batch])
            except Exception as err:  # the executor itself failed (shut down): fail this batch, keep going
                results = [err] * len(batch)
            finally:
                self._inflight = []
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _run_isolated(self, payloads: Sequence[P]) -> Sequence[R | BaseException]:
        """Run the batch; if it fails as a whole, run each payload alone so one bad input fails only itself."""
        try:
            return self._run(payloads)
        except Exception as err:
            if len(payloads) == 1:
                return [err]
        out: list[R | BaseException] = []
        for payload in payloads:
            try:
                out.extend(self._run([payload]))
            except Exception as err:
                out.append(err)
        return out
