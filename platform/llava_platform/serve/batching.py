"""Continuous batching over a :class:`~llava_platform.inference.engine.Decoder`, with no Ray in it.

Calls arrive in groups (``serve.batch`` forms them); between decode steps the waiting groups are
prefilled and join the running batch, up to ``max_rows`` rows, and a finished row leaves at once. So a
request never waits for another request's whole answer, and the batch never holds more than
``max_rows`` rows.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from llava_platform.inference.engine import Decoder
from llava_platform.inference.requests import DecodeRequest

Item = tuple[DecodeRequest, list[torch.Tensor]]


@dataclass
class _Group:
    queue: asyncio.Queue
    rows: int
    done: int = 0


@dataclass
class BatchCounts:
    """``batches``: prefills; ``rows``: rows admitted; ``max_batch``: the most rows that decoded
    together; ``cancelled``/``errors``: rows that left early because their caller went away / failed."""

    batches: int = 0
    rows: int = 0
    max_batch: int = 0
    cancelled: int = 0
    errors: int = 0


@dataclass
class ContinuousBatcher:
    """Decodes the groups given to :meth:`submit` together, step by step, on ``pool`` (one thread: the
    model is not re-entrant). ``metrics``: a ``LanguageModelMetrics`` (or None); ``health``: an object
    whose ``reason`` is set when the model itself fails (not when a request is refused)."""

    decoder: Decoder
    max_rows: int
    pool: Executor
    metrics: Any = None
    health: Any = None
    counts: BatchCounts = field(default_factory=BatchCounts)

    def __post_init__(self) -> None:
        self.waiting: list[tuple[list[Item], asyncio.Queue]] = []
        self.driver: asyncio.Task | None = None

    def submit(self, items: list[Item]) -> asyncio.Queue:
        """Queue a group (at most ``max_rows`` rows). Its queue then receives, per decode step, a list
        with one entry per row (a ``StepOutput``, or ``StopIteration`` for a row already finished), an
        exception if the group failed, and None when all its rows have finished."""
        if len(items) > self.max_rows:
            raise ValueError(f"a group of {len(items)} rows is over max_rows {self.max_rows}")
        queue: asyncio.Queue = asyncio.Queue()
        self.waiting.append((items, queue))
        if self.driver is None or self.driver.done():
            self.driver = asyncio.create_task(self._drive())
        return queue

    def _fail(self, reason: str) -> None:
        if self.health is not None:
            self.health.reason = reason

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        batch = None
        groups: dict[int, _Group] = {}
        next_id = 0

        def fail(ids: list[int], error: Exception) -> None:
            for gid in ids:
                groups.pop(gid).queue.put_nowait(error)

        while self.waiting or (batch is not None and batch.rows):
            room = self.max_rows - (len(batch.rows) if batch is not None else 0)
            admitted, reqs, feats, tags = [], [], [], []
            if self.waiting and room > 0:
                # A group joins only whole and only where it fits: the batch never exceeds max_rows.
                # Groups are at most max_rows, so the head always fits an empty batch and waits at
                # most until enough rows finish.
                empty = batch is None or not batch.rows
                while self.waiting and (len(self.waiting[0][0]) <= room - len(reqs) or (empty and not reqs)):
                    items, queue = self.waiting.pop(0)
                    try:  # a request the decoder refuses fails its own group, not the ones beside it
                        for req, feat in items:
                            self.decoder.check(req, feat)
                    except ValueError as e:
                        queue.put_nowait(e)
                        continue
                    gid, next_id = next_id, next_id + 1
                    groups[gid] = _Group(queue, len(items))
                    admitted.append(gid)
                    for k, (req, feat) in enumerate(items):
                        if self.metrics is not None:
                            self.metrics.queue_wait.observe(time.monotonic() - req.received)
                        reqs.append(req)
                        feats.append(feat)
                        tags.append((gid, k))
            if reqs:
                try:
                    new = await loop.run_in_executor(self.pool, self.decoder.start, reqs, feats, tags)
                    batch = new if batch is None else await loop.run_in_executor(self.pool, self.decoder.join, batch, new)
                except Exception as e:  # noqa: BLE001 - reported to the admitted groups only
                    if not isinstance(e, ValueError):
                        self._fail(f"prefill failed: {type(e).__name__}: {e}")
                    fail(admitted, e)
                    continue
                self.counts.batches += 1
                self.counts.rows += len(reqs)
                self.counts.max_batch = max(self.counts.max_batch, len(batch.rows))
            try:
                outs = await loop.run_in_executor(self.pool, self.decoder.step, batch)
            except Exception as e:
                self._fail(f"decoding failed: {type(e).__name__}: {e}")
                fail(list(groups), e)
                batch = None
                continue
            lists: dict[int, list[Any]] = {}
            if self.metrics is not None:
                self.metrics.batch_rows.observe(len(outs))
            for (gid, k), out in outs:
                if out.finish_reason == "cancelled":
                    self.counts.cancelled += 1
                    if self.metrics is not None:
                        self.metrics.cancelled.inc()
                self.counts.errors += out.finish_reason == "error"
                group = groups[gid]
                lists.setdefault(gid, [StopIteration] * group.rows)[k] = out
                group.done += out.finish_reason is not None
            for gid, entries in lists.items():
                groups[gid].queue.put_nowait(entries)
                if groups[gid].done == groups[gid].rows:
                    groups.pop(gid).queue.put_nowait(None)
