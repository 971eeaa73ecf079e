"""Batches by token budget from length-sorted inputs, and tokenization running ahead of the model."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def token_budget_batches(lengths: np.ndarray, max_texts: int | None, max_tokens: int | None
                         ) -> Iterator[np.ndarray]:
    """Row indices, longest first, grouped so that no batch exceeds max_texts rows or max_tokens padded tokens.
    None lifts that limit; with both None, everything is one batch.

    A batch pads to its first (longest) row, so rows x longest is the work it really does. Sorting keeps that
    close to the real token count; the budget keeps long-text batches from blowing up activation memory (the
    attention bias alone is rows x heads x longest^2) while short texts still get full batches.
    """
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"batch_size must be at least 1, got {max_texts}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_batch_tokens must be at least 1, got {max_tokens}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        rows = len(order) if max_texts is None else max_texts
        if max_tokens is not None:
            rows = max(1, min(rows, max_tokens // longest))
        yield order[start:start + rows]
        start += rows


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
