"""`EncodePool`: one machine's GPUs (or several CPU processes) encoding one list of texts together.

Workers are started with the "spawn" method, so each initialises CUDA on its own device from a fresh
interpreter (a forked child cannot use CUDA that its parent touched). Texts go out in chunks, longest first
so each chunk pads little, at most a few chunks per worker at a time; results come back out of order and are
put back in the caller's. A failure inside a worker, a worker that dies, or an interrupt stops every worker
before the error reaches the caller: no process outlives the pool.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import traceback
import warnings
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from allmpnet.encode.encoder import TruncationWarning, check_texts
from allmpnet.errors import InvalidInput
from allmpnet.settings import precision_or_default
from allmpnet.weights import DEFAULT_MODEL

POLL_SECONDS = 0.5  # how often a waiting caller checks that every worker is still alive
STOP = None


class PoolWorkerError(RuntimeError):
    """A worker failed (or died); the message names the worker, its device and the original error."""


def default_devices() -> list[str]:
    import torch
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def load_encoder(model: str, device: str, precision: str, max_seq_length: int | None):
    from allmpnet.encode import Encoder
    return Encoder(model, device=device, precision=precision, max_seq_length=max_seq_length)


class EncodePool:
    """Encode with one worker process per device; `encode` matches `Encoder.encode` row for row.

    devices: e.g. ["cuda:0", "cuda:1"], or ["cpu"] * 4 for four CPU processes; default every GPU, else one CPU
    process. Each CPU worker gets an equal share of this machine's cores as torch threads, unless
    threads_per_worker says how many.
    factory(model, device, precision, max_seq_length) builds each worker's encoder (anything with `dim`,
    `tokenize` and `encode_ids`, as Encoder has); it must be importable by name (a module-level function), as
    spawned workers import it afresh.
    Use as a context manager, or call close(); workers are also stopped when the pool is garbage-collected.
    """

    def __init__(self, model: str = DEFAULT_MODEL, devices: Sequence[str] | None = None, precision: str | None = None,
                 max_seq_length: int | None = None, threads_per_worker: int | None = None,
                 factory: Callable = load_encoder):
        self.devices = list(devices) if devices is not None else default_devices()
        if not self.devices:
            raise InvalidInput("devices is empty")
        # resolved here, not in the workers: a bad $ALLMPNET_PRECISION fails before any process starts
        precision = precision_or_default(precision)
        context = mp.get_context("spawn")
        self.tasks = context.Queue()
        self.results = context.Queue()
        cpu_workers = sum(1 for d in self.devices if str(d).startswith("cpu"))
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        self.workers = [context.Process(target=_worker_main, name=f"allmpnet-encode-{i}", daemon=True,
                                        args=(i, str(d), self.tasks, self.results, factory,
                                              (str(model), str(d), precision, max_seq_length), threads))
                        for i, d in enumerate(self.devices)]
        self.closed = False
        try:
            for w in self.workers:
                w.start()
            # each worker reports its vector size once its model is loaded, or why it could not load it
            self.dim = [self._take() for _ in self.workers][0]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "EncodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "workers", None) and not getattr(self, "closed", True):
            try:
                self.close()
            except Exception:  # at interpreter exit the queues may already be gone; workers are daemons
                pass

    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize: bool | None = None,
               chunk_size: int = 1024, show_progress_bar: bool | None = None) -> np.ndarray:
        """(N, dim) float32 vectors in the order of texts (a single string gives one (dim,) vector)."""
        if isinstance(texts, str):
            return self.encode([texts], batch_size, normalize, chunk_size, show_progress_bar)[0]
        if self.closed:
            raise RuntimeError("this EncodePool is closed (a worker failed, or close() was called)")
        texts = check_texts(texts)
        if batch_size < 1 or chunk_size < 1:
            raise InvalidInput(f"batch_size and chunk_size must be at least 1, got {batch_size} and {chunk_size}")
        # longest first, by characters: a cheap stand-in for token counts that keeps each chunk's padding low
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        received, truncated = 0, 0
        show = len(texts) > 256 if show_progress_bar is None else show_progress_bar
        try:
            with tqdm(total=len(texts), desc="encoding", unit="text", disable=not show) as bar:
                sent = 0
                while received < len(chunks):
                    # keep every worker busy with a spare chunk queued, but no more: memory stays bounded
                    while sent < len(chunks) and sent - received < 2 * len(self.workers):
                        self.tasks.put((sent, [texts[i] for i in chunks[sent]], batch_size, normalize))
                        sent += 1
                    index, vectors, cut = self._take()
                    out[chunks[index]] = vectors  # back to the caller's order
                    received += 1
                    truncated += cut
                    bar.update(len(vectors))
        except BaseException:  # a worker error, a dead worker, Ctrl-C: nothing keeps running
            self.close()
            raise
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts were longer than the model's max_seq_length and were "
                          "truncated; Encoder.truncated_indices(texts) lists them", TruncationWarning, stacklevel=2)
        return out

    def _take(self):
        """The next result; raises PoolWorkerError for a worker's exception or a worker that has died."""
        while True:
            try:
                kind, worker, payload = self.results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                for i, w in enumerate(self.workers):
                    if not w.is_alive():
                        raise PoolWorkerError(f"worker {i} ({self.devices[i]}) died with exit code {w.exitcode}")
                continue
            if kind == "error":
                raise PoolWorkerError(f"worker {worker} ({self.devices[worker]}) failed: {payload}")
            return payload

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker: politely, then by force. Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        for w in self.workers:
            if w.is_alive():
                try:
                    self.tasks.put(STOP)
                except (ValueError, OSError):
                    break
        for w in self.workers:
            if w.pid is not None:
                w.join(timeout)
                if w.is_alive():
                    w.terminate()
                    w.join(timeout)
                if w.is_alive():
                    w.kill()
                    w.join()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()  # unread items must not block this process from exiting
            q.close()


def _worker_main(index: int, device: str, tasks, results, factory: Callable, factory_args: tuple,
                 threads: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch
        if device.startswith("cpu"):
            torch.set_num_threads(threads)
        encoder = factory(*factory_args)
    except BaseException as e:
        results.put(("error", index, _describe(e)))
        return
    results.put(("ready", index, encoder.dim))
    while (task := tasks.get()) is not STOP:
        chunk, texts, batch_size, normalize = task
        try:
            tokenized = encoder.tokenize(texts)  # once: its truncation flags are counted here, reported by the caller
            vectors = encoder.encode_ids(tokenized.ids, batch_size=batch_size, normalize=normalize)
            truncated = sum(tokenized.truncated)
        except BaseException as e:
            results.put(("error", index, _describe(e)))
            return
        results.put(("done", index, (chunk, np.asarray(vectors, dtype=np.float32), truncated)))


def _describe(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"
