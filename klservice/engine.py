"""The scoring engine: queues requests and runs the backend's forwards off the event loop.

Requests wait in a bounded queue. One worker task takes every request waiting (up to a
token budget), sorts their sequences by length so padded batches waste little, packs
them into forward batches of at most ``max_batch_tokens`` padded tokens, runs each batch
on the backend in a single worker thread (the event loop never blocks on the model), and
scatters the log-probs back to the requests in order. A request whose caller has gone
(cancelled) is skipped before its forward runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time

import numpy as np

from klservice.errors import NotReady, Overloaded
from klservice.validation import Batch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    batch: Batch
    temperature: float
    job: str
    future: asyncio.Future


class ScoringEngine:
    """Batches scoring work of concurrent requests onto one backend."""

    def __init__(self, backend, *, max_batch_tokens: int, max_queue: int, metrics=None):
        self._backend = backend
        self._max_batch_tokens = max_batch_tokens
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._metrics = metrics
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="klservice-forward")
        self._worker: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="klservice-engine")

    async def stop(self) -> None:
        """Stop taking work, fail what is still queued with UNAVAILABLE, and release the thread."""
        self._closing = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(NotReady("server is shutting down"))
        self._executor.shutdown(wait=True)

    async def score(self, batch: Batch, temperature: float, job: str) -> np.ndarray:
        """Reference log-probs of the batch's scored tokens (float32, flat)."""
        if self._closing:
            raise NotReady("server is shutting down")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(batch, temperature, job, future))
        except asyncio.QueueFull:
            raise Overloaded(
                f"queue full ({self._queue.maxsize} requests waiting); retry after a short backoff"
            ) from None
        self._set_depth()
        return await future

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queue.qsize())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            taken = [await self._queue.get()]
            budget = taken[0].batch.num_tokens
            while not self._queue.empty() and budget < self._max_batch_tokens:
                taken.append(self._queue.get_nowait())
                budget += taken[-1].batch.num_tokens
            self._set_depth()
            live = [p for p in taken if not p.future.done()]
            for temperature in sorted({p.temperature for p in live}):
                group = [p for p in live if p.temperature == temperature]
                try:
                    results = await loop.run_in_executor(self._executor, self._forward_group, group, temperature)
                except Exception as error:  # noqa: BLE001 - handed to every waiting request
                    log.exception("forward failed")
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    continue
                for pending, values in zip(group, results):
                    if not pending.future.done():
                        pending.future.set_result(values)

    def _forward_group(self, group: list[_Pending], temperature: float) -> list[np.ndarray]:
        """Runs in the worker thread: all sequences of the group, length-sorted, in token-budget batches."""
        items = []  # (request index, sequence index, tokens, start)
        for r, pending in enumerate(group):
            for s, (tokens, start) in enumerate(zip(pending.batch.sequences(), pending.batch.prompt_lengths)):
                items.append((r, s, tokens, int(start)))
        items.sort(key=lambda item: len(item[2]))
        outputs: dict[tuple[int, int], np.ndarray] = {}
        for chunk in _pack(items, self._max_batch_tokens):
            started = time.perf_counter()
            values = self._backend.score([item[2] for item in chunk], [item[3] for item in chunk], temperature)
            if self._metrics is not None:
                self._metrics.forward_seconds.observe(time.perf_counter() - started)
                self._metrics.batch_sequences.observe(len(chunk))
                self._metrics.batch_tokens.observe(len(chunk) * len(chunk[-1][2]))
                self._metrics.tokens_forwarded.inc(sum(len(item[2]) for item in chunk))
            for item, value in zip(chunk, values):
                outputs[item[0], item[1]] = value
        results = []
        for r, pending in enumerate(group):
            parts = [outputs[r, s] for s in range(len(pending.batch.lengths))]
            results.append(np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32))
        return results


def _pack(items: list, max_batch_tokens: int):
    """Consecutive chunks of length-sorted items whose padded size (count x longest) fits the budget.

    A single sequence longer than the budget forms a batch of its own.
    """
    chunk: list = []
    for item in items:
        longest = max(len(item[2]), len(chunk[-1][2]) if chunk else 0)
        if chunk and (len(chunk) + 1) * longest > max_batch_tokens:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk
