"""Dynamic batching: texts from concurrent requests share forward passes, cut by a padded-token budget.

Requests hand in already-tokenized texts and get a future. One worker thread owns the model: it takes rows
from the waiting requests in turn, one row each, until the next row would push the batch past
`max_batch_tokens` (rows x longest row, the memory a padded batch really costs) or `max_batch_size`, runs one
forward pass and hands each request its vectors when its last row is done. Taking turns is what keeps a small
request quick beside a giant one: it waits for a pass or two, not for the giant's rows. The queue is bounded in texts: a submit that
would overflow it raises `QueueFull` at once (the server answers 503) rather than letting memory grow.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from allmpnet.encode import Encoder
from allmpnet.encode.batching import TokenBudget, default_batch_tokens
from allmpnet.errors import InvalidInput


class QueueFull(RuntimeError):
    """The batcher holds as many waiting texts as it may; try again after `retry_after` seconds."""

    def __init__(self, queued: int, capacity: int, retry_after: int):
        super().__init__(f"the server queue is full ({queued} of {capacity} texts waiting); retry in {retry_after}s")
        self.retry_after = retry_after


class BatcherClosed(RuntimeError):
    """The batcher was shut down; no more work is accepted."""


@dataclass
class BatchStats:
    rows: int
    padded_tokens: int
    real_tokens: int
    requests: int  # how many requests this forward pass served
    seconds: float


@dataclass(eq=False)  # found in the queue by identity (fields hold arrays)
class _Job:
    ids: list[list[int]]
    order: np.ndarray  # rows longest-first, so the rows of one big request batch with little padding
    out: torch.Tensor  # (n, dim) filled in as batches finish
    future: Future = field(default_factory=Future)
    normalize: bool | None = None  # as Encoder.embed_ids: None, the model's own last step; rows share a pass only
    # with rows of the same setting
    next: int = 0  # position in `order` of the next row to schedule
    done: int = 0

    @property
    def abandoned(self) -> bool:
        # cancelled when the client went away, done early when a batch holding its rows failed
        return self.future.done()


class DynamicBatcher:
    def __init__(self, encoder: Encoder, max_batch_tokens: int | None = None, max_batch_size: int = 256,
                 max_queue: int = 8192, merge_requests: bool = True,
                 on_batch: Callable[[BatchStats], None] | None = None):
        """max_batch_tokens None: the device's default budget (encode/batching.py)."""
        if max_batch_tokens is None:
            max_batch_tokens = default_batch_tokens(encoder.device.type)
        if max_batch_tokens < encoder.max_seq_length:
            raise InvalidInput(f"max_batch_tokens ({max_batch_tokens}) must hold one full-length text "
                               f"({encoder.max_seq_length} tokens)")
        if max_batch_size < 1 or max_queue < 1:
            raise InvalidInput("max_batch_size and max_queue must be at least 1")
        self.encoder = encoder
        self.budget = TokenBudget(max_batch_tokens, max_batch_size)
        self.capacity = max_queue
        self.merge_requests = merge_requests
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # rows submitted and not yet taken into a batch
        self._cond = threading.Condition()
        self._closed = False
        self._rows_per_s = 0.0  # moving average, for Retry-After
        self._thread: threading.Thread | None = None
        self.ready: Future = Future()  # done once the worker takes requests; holds the warm-up's error if it failed

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def start(self, warm_up: bool = False) -> "DynamicBatcher":
        """Start the worker; with warm_up it first runs `warm_up()` on its own thread (see `ready`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(warm_up,), name="allmpnet-batcher", daemon=True)
            self._thread.start()
        return self

    def warm_up(self) -> None:
        """Run the largest batch the budget allows once, before serving.

        The first passes are the slow ones (lazy initialisation) and the largest decides peak memory; doing both
        up front means the first clients are not slowed and the resident size at startup is the working size.
        """
        length = self.encoder.max_seq_length
        rows = max(1, min(self.budget.max_texts, self.budget.max_tokens // length))
        # an ordinary word piece: a special id inside a text would send the row down the exact path apart
        # (Encoder.embed_ids) and leave the planned one, which serves every other text, unbuilt
        first, *word, last = self.encoder.tokenize(["the"]).ids[0]
        self.encoder.embed_ids([[first] + word * (length - 2) + [last]] * rows)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, fail whatever still waits, stop the worker."""
        with self._cond:
            self._closed = True
            waiting, self._jobs = list(self._jobs), deque()
            self._queued = 0
            self._cond.notify_all()
        for job in waiting:
            _fail(job, BatcherClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, ids: Sequence[Sequence[int]], normalize: bool | None = None) -> Future:
        """Queue tokenized texts; the future gives their (n, dim) float32 vectors in the order given (normalize: as
        `Encoder.embed_ids`)."""
        if len(ids) == 0:
            future: Future = Future()
            future.set_result(torch.empty((0, self.encoder.dim), dtype=torch.float32))
            return future
        if len(ids) > self.capacity:
            raise InvalidInput(f"{len(ids)} texts can never fit a queue of {self.capacity}")
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        job = _Job(ids=[list(i) for i in ids], order=np.argsort(-lengths, kind="stable"),
                   out=torch.empty((len(ids), self.encoder.dim), dtype=torch.float32), normalize=normalize)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed: the server is shutting down")
            if self._queued + len(ids) > self.capacity:
                raise QueueFull(self._queued, self.capacity, self._retry_after(len(ids)))
            self._jobs.append(job)
            self._queued += len(ids)
            self._cond.notify()
        job.future.add_done_callback(lambda _: self._forget_if_cancelled(job))
        return job.future

    def _forget_if_cancelled(self, job: _Job) -> None:
        """Drop a cancelled request's rows that no forward pass has taken (its client has gone)."""
        if not job.future.cancelled():
            return
        with self._cond:
            try:
                self._jobs.remove(job)
            except ValueError:  # already taken whole, or dropped by _take
                return
            self._queued -= len(job.ids) - job.next

    def _retry_after(self, rows: int) -> int:
        # time for the queue to drain enough to take this request, from recent throughput
        if self._rows_per_s <= 0:
            return 1
        return max(1, math.ceil((self._queued + rows - self.capacity) / self._rows_per_s))

    def _take(self) -> list[tuple[_Job, int]]:
        """Rows for the next forward pass, one per request in turn; called with the lock held.

        Requests take turns row by row, and a request that got a row goes to the back of the line, so a
        one-text query waits for at most the forward pass in progress and the next one, however many rows the
        requests ahead of it still hold. Within a request, rows go longest first (little padding). A pass holds
        rows of one `normalize` setting: requests of the other wait for the next pass, keeping their place."""
        batch: list[tuple[_Job, int]] = []
        longest = 0
        i = 0
        while i < len(self._jobs):
            job = self._jobs[i]
            if job.abandoned:
                self._queued -= len(job.ids) - job.next
                del self._jobs[i]
                continue
            if batch and job is not batch[-1][0]:
                if not self.merge_requests:
                    break
                if job.normalize != batch[0][0].normalize:
                    i += 1
                    continue
            row = int(job.order[job.next])
            width = max(longest, len(job.ids[row]))
            if batch and not self.budget.fits(len(batch) + 1, width):
                break
            batch.append((job, row))
            longest = width
            job.next += 1
            self._queued -= 1
            del self._jobs[i]
            if job.next < len(job.ids):
                if self.merge_requests:
                    self._jobs.append(job)  # its next row waits for everyone else's turn
                else:
                    self._jobs.insert(i, job)  # one request per pass: it keeps its place until done
        return batch

    def _run(self, warm_up: bool) -> None:
        try:
            if warm_up:
                # on this thread, so the memory it settles is the allocator arena that serving will reuse
                self.warm_up()
        except Exception as e:
            self.ready.set_exception(RuntimeError(
                f"the warm-up pass ({self.budget.max_tokens} padded tokens) failed: {e}; lower max_batch_tokens"))
            with self._cond:
                self._closed = True
            return
        self.ready.set_result(None)
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take()
            if batch:
                self._forward(batch)

    def _forward(self, batch: list[tuple[_Job, int]]) -> None:
        start = time.perf_counter()
        seqs = [job.ids[row] for job, row in batch]
        try:
            vectors = self.encoder.embed_ids(seqs, batch[0][0].normalize)  # (B, dim)
        except Exception as e:  # a failed pass fails its requests, never the worker
            for job in {id(job): job for job, _ in batch}.values():
                _fail(job, e)
            return
        for (job, row), vector in zip(batch, vectors):
            job.out[row] = vector
            job.done += 1
            if job.done == len(job.ids) and not job.future.done():
                try:
                    job.future.set_result(job.out)
                except InvalidStateError:  # cancelled in the meantime
                    pass
        seconds = time.perf_counter() - start
        self._rows_per_s = 0.8 * self._rows_per_s + 0.2 * (len(batch) / max(seconds, 1e-6))
        if self.on_batch is not None:
            lengths = [len(seq) for seq in seqs]
            self.on_batch(BatchStats(rows=len(batch), padded_tokens=len(seqs) * max(lengths), real_tokens=sum(lengths),
                                     requests=len({id(job) for job, _ in batch}), seconds=seconds))


def _fail(job: _Job, error: BaseException) -> None:
    if not job.future.done():
        try:
            job.future.set_exception(error)
        except InvalidStateError:
            pass
