"""The one batch planner: sort by length, cut by a token budget, put results back in the caller's order.

Every caller that embeds many texts goes through it: `Encoder.encode`/`encode_ids`, the server's dynamic
batcher (the budget rule, applied to rows as requests arrive), the multi-process pool's workers, the ONNX
encoder and the bulk job.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from allmpnet.errors import InvalidInput, NonFiniteOutputError

T = TypeVar("T")

# padded tokens per batch: enough rows that each weight matrix, streamed from memory once per batch, is used for a
# full-speed matmul, yet few enough that the batch's activations stay in cache. Measured on 2 Sapphire Rapids cores
# (bf16): 2048-4096 is best on both sentences and 256-token passages, 1024 and 8192 are ~10-25% slower. A GPU
# needs far more rows to fill its units.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
# texts tokenized and length-sorted together: bounds memory for huge inputs while keeping padding low
SORT_WINDOW = 16384


def default_batch_tokens(device_type: str) -> int:
    return DEFAULT_BATCH_TOKENS.get(device_type, DEFAULT_BATCH_TOKENS["cpu"])


@dataclass(frozen=True)
class TokenBudget:
    """At most max_texts rows and max_tokens padded tokens (rows x longest row) per batch; None lifts a limit.

    A batch's memory follows rows x longest (the attention of its longest text, its activations), so the budget
    keeps long-text batches from blowing up while short texts still get large batches."""
    max_tokens: int | None
    max_texts: int | None = None

    def __post_init__(self) -> None:
        if self.max_texts is not None and self.max_texts < 1:
            raise InvalidInput(f"batch_size must be at least 1, got {self.max_texts}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInput(f"max_batch_tokens must be at least 1, got {self.max_tokens}")

    def fits(self, rows: int, longest: int) -> bool:
        """Whether a batch of `rows` texts, the longest `longest` tokens, is within the budget."""
        return ((self.max_texts is None or rows <= self.max_texts)
                and (self.max_tokens is None or rows * longest <= self.max_tokens))

    def batches(self, lengths: Sequence[int] | np.ndarray) -> Iterator[np.ndarray]:
        """Row indices, longest first, in batches within the budget (a single row over it still gets one)."""
        lengths = np.asarray(lengths)
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            longest = max(int(lengths[order[start]]), 1)
            rows = len(order) - start if self.max_texts is None else min(self.max_texts, len(order) - start)
            if self.max_tokens is not None:
                rows = max(1, min(rows, self.max_tokens // longest))
            yield order[start:start + rows]
            start += rows


def check_finite(vectors: torch.Tensor | np.ndarray) -> None:
    """Raise NonFiniteOutputError when a (B, dim) batch of output vectors holds NaN or inf."""
    finite = torch.isfinite(vectors) if isinstance(vectors, torch.Tensor) else np.isfinite(vectors)
    if bool(finite.all()):  # the usual case in one reduction: a query's every torch op is ~10 us
        return
    finite = finite.all(axis=1)
    if not bool(finite.all()):
        raise NonFiniteOutputError.for_rows(np.flatnonzero(~np.asarray(finite)).tolist(), len(finite))


def embed_in_batches(ids: Sequence[Sequence[int]], embed: Callable[[list[Sequence[int]]], torch.Tensor | np.ndarray],
                     budget: TokenBudget, out: torch.Tensor | np.ndarray, offset: int = 0,
                     progress: Callable[[int], object] | None = None) -> None:
    """Embed ragged token ids in length-sorted batches; text i's vector lands in out[offset + i]."""
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    for rows in budget.batches(lengths):
        vectors = embed([ids[r] for r in rows])
        check_finite(vectors)
        target = rows + offset
        if isinstance(out, torch.Tensor):
            out[torch.from_numpy(target)] = torch.as_tensor(vectors).to(out.dtype)
        else:
            out[target] = np.asarray(vectors)
        if progress is not None:
            progress(len(rows))


def windows(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def prefetched(items: Sequence[T], prepare: Callable[[T], object]) -> Iterator[tuple[T, object]]:
    """(item, prepare(item)) in order, preparing the next item on a background thread while the caller works.

    Tokenization (Rust, releases the GIL) then overlaps the model's matmuls instead of waiting in front of them.
    Only one prepared item waits at a time, so memory stays bounded by two windows.
    """
    if not items:
        return
    if len(items) == 1:  # nothing to overlap with: no thread (a single short query pays no start-up)
        yield items[0], prepare(items[0])
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="allmpnet-tokenize") as pool:
        pending = pool.submit(prepare, items[0])
        for i, item in enumerate(items):
            ready = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(prepare, items[i + 1])
            yield item, ready
