"""Dynamic batching across requests: one queue per route, drained in arrival order (FIFO) into model calls of up to
``max_batch_size`` inputs. All routes share one model thread, so the model runs one call at a time; inputs that
arrive while it is busy form the next, larger batch.

A batch waits at most ``timeout_s`` to fill, and only while a request that can join it is on its way: the server
announces each request of the route from the moment its handler starts reading it until its inputs are queued
(:meth:`Batcher.arriving`). With nothing on its way the batch runs at once: a lone client does not pay the timeout
on every request, and under load the inputs queued while the model was busy are all there already.

An input may be :class:`Deferred` (an upload still to decode): the model thread decodes the batch's inputs just
before its call (:func:`decoding`), so a request crosses threads once (event loop → model thread → event loop), not
twice through a decoding pool as well, and the decoders do not compete with the model for the GIL. An input that
does not decode fails alone; the others run.

Inputs whose ``key`` differs (other decoding options, other labels) never share a call. A call that raises is run
again input by input, so one bad input fails only its own request.

A request whose client goes away cancels its futures (:func:`mmformer.serve.app.create_app`'s routes watch for the
disconnect): a queued input is dropped before its batch runs, and work that can stop between steps (a long-form
transcription, between windows) asks :meth:`Batcher.abandoned` and raises :class:`Abandoned` once every input of
the call now running has been given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from mmformer.serve.metrics import Metrics

RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]  # (key, payloads) → one result per payload


@dataclass
class _Pending:
    key: Hashable
    payload: Any
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Abandoned(Exception):
    """Raised on the model thread by work that stopped because every request of its call went away
    (:meth:`Batcher.abandoned`); the call is not run again input by input."""


class Deferred:
    """An input to decode on the model thread: ``load(*args)`` gives the payload (raising for a bad upload)."""

    __slots__ = ("load", "args")

    def __init__(self, load: Callable[..., Any], *args: Any):
        self.load, self.args = load, args

    def __call__(self) -> Any:
        return self.load(*self.args)


def decoding(run_batch: RunBatch) -> RunBatch:
    """``run_batch`` on the batch's payloads with each :class:`Deferred` one decoded first: one result per payload,
    the exception of a payload that does not decode in its place (the others still run together)."""

    def run(key: Hashable, payloads: Sequence[Any]) -> list[Any]:
        results: list[Any] = [None] * len(payloads)
        ready: list[tuple[int, Any]] = []
        for i, payload in enumerate(payloads):
            try:
                ready.append((i, payload() if isinstance(payload, Deferred) else payload))
            except Exception as e:  # this upload's own failure
                results[i] = e
        if ready:
            for (i, _), result in zip(ready, run_batch(key, [p for _, p in ready]), strict=True):
                results[i] = result
        return results

    return run


class Batcher:
    """Collects concurrent inputs of one route into batched ``run_batch(key, payloads)`` calls on ``executor``."""

    def __init__(
        self,
        route: str,
        run_batch: RunBatch,
        executor: Executor,
        metrics: Metrics,
        max_batch_size: int = 32,
        timeout_s: float = 0.005,
    ):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected a positive int, got {max_batch_size!r}")
        if not isinstance(timeout_s, (int, float)) or timeout_s < 0:
            raise ValueError(f"batch timeout: expected seconds >= 0, got {timeout_s!r}")
        self.route, self.run_batch, self.executor, self.metrics = route, run_batch, executor, metrics
        self.max_batch_size, self.timeout_s = max_batch_size, float(timeout_s)
        self._queue: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None  # set when an input is queued or an arriving request is done arriving
        self._arriving = 0  # requests being read (inside arriving()) whose inputs are not queued yet
        self._task: asyncio.Task | None = None
        self._running: list[_Pending] = []  # the inputs of the call on the model thread now

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self.route}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request of this route while it is read and decoded: a batch that is filling waits for it
        (up to the timeout). Leave the block before awaiting its results."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._wake is not None:
                self._wake.set()

    def abandoned(self) -> bool:
        """Whether every input of the call now running was given up (its request cancelled: the client went away).
        Called on the model thread by work that can stop between steps; reading a future's state there is safe."""
        running = self._running
        return bool(running) and all(p.future.cancelled() for p in running)

    async def submit(self, payload: Any, key: Hashable = None) -> Any:
        """The result of ``payload`` once its batch has run (its own exception, if it failed)."""
        if self._wake is None:
            raise RuntimeError(f"batcher {self.route}: start() it inside the server's event loop first")
        pending = _Pending(key, payload, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wake.set()
        return await pending.future

    async def _wait(self, timeout: float | None) -> None:
        """Until an input is queued or an arriving request is done arriving (or ``timeout`` seconds pass)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _collect(self) -> list[_Pending]:
        """The oldest inputs, up to ``max_batch_size``: all that are queued, and those of requests on their way
        that are queued before the timeout."""
        while not self._queue:
            await self._wait(None)
        batch = [self._queue.popleft()]
        deadline = time.perf_counter() + self.timeout_s
        while len(batch) < self.max_batch_size:
            if self._queue:
                batch.append(self._queue.popleft())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not self._arriving:
                break
            await self._wait(remaining)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(pending.key, []).append(pending)
            for key, group in groups.items():
                live = [p for p in group if not p.future.cancelled()]  # a client that went away
                if not live:
                    continue
                started = time.perf_counter()
                self._running = live
                try:
                    results = await loop.run_in_executor(self.executor, self._run, key, [p.payload for p in live])
                finally:
                    self._running = []
                self.metrics.batch_ran(self.route, len(live), [started - p.queued for p in live])
                for pending, result in zip(live, results):
                    if pending.future.done():
                        continue
                    if isinstance(result, BaseException):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)

    def _run(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        """One result (or exception) per payload: the batch at once, or input by input when the batch fails."""
        try:
            results = list(self.run_batch(key, payloads))
            if len(results) != len(payloads):
                raise RuntimeError(f"{self.route}: {len(results)} results for {len(payloads)} inputs")
            return results
        except Exception as batch_error:
            if len(payloads) == 1 or isinstance(batch_error, Abandoned):
                return [batch_error] * len(payloads)
        results = []
        for payload in payloads:
            try:
                results.append(self.run_batch(key, [payload])[0])
            except Exception as e:  # this input's own failure, answered to its own request only
                results.append(e)
        return results
