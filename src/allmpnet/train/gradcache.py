"""One training step's forward and backward, plain or with GradCache (exact large batches in bounded memory).

GradCache: embed the batch in chunks without a graph, compute the loss and its gradient with respect to the
embeddings, then re-run each chunk with a graph and back-propagate those embedding gradients into the weights.
Peak memory is one chunk's activations whatever the batch size; the gradient is the plain step's. Each chunk's
re-run restores the random state of its first run, so dropout masks are identical in both runs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from allmpnet.encode import Encoder
from allmpnet.errors import InvalidInput
from allmpnet.train.distributed import Context, gather_with_grad
from allmpnet.train.loss import contrastive_loss

TokenColumns = Sequence[Sequence[Sequence[int]]]  # [column][example] -> word-piece ids


def batch_loss(columns: list[torch.Tensor], context: Context, scale: float) -> torch.Tensor:
    """Column embeddings of the local batch -> the loss of the global batch (positives then hard negatives)."""
    anchors, *candidates = (gather_with_grad(c, context) for c in columns)
    return contrastive_loss(anchors, torch.cat(candidates), scale)


def forward_backward(model: Encoder, columns: TokenColumns, context: Context = Context(), scale: float = 20.0,
                     chunk_size: int | None = None) -> float:
    """Accumulate this process's share of d(global loss)/d(weights) into .grad; returns the loss.

    chunk_size=None embeds each column in one forward with its graph (a plain step); an integer runs GradCache
    with length-sorted chunks of that many texts.
    """
    if chunk_size is None:
        embeddings = [embed_for_training(model, column) for column in columns]  # each (N, D)
        loss = batch_loss(embeddings, context, scale)
        loss.backward()
        return float(loss.detach())
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be positive, got {chunk_size}")

    texts = [ids for column in columns for ids in column]  # column-major: anchors, positives, negatives
    order = np.argsort([-len(ids) for ids in texts], kind="stable")
    chunks = [torch.from_numpy(order[i:i + chunk_size]) for i in range(0, len(order), chunk_size)]
    cached = torch.empty((len(texts), model.dim), dtype=torch.float32, device=model.device)
    rng_states = []
    with torch.no_grad():
        for rows in chunks:
            rng_states.append(_rng_state(model.device))
            cached[rows.to(model.device)] = embed_for_training(model, [texts[r] for r in rows]).float()

    cached.requires_grad_(True)
    loss = batch_loss(list(cached.split(len(columns[0]))), context, scale)
    loss.backward()
    grads = cached.grad  # (texts, D): d loss / d embedding

    for rows, state in zip(chunks, rng_states):
        _set_rng_state(model.device, state)
        out = embed_for_training(model, [texts[r] for r in rows])
        out.backward(grads[rows.to(model.device)].to(out.dtype))
    return float(loss.detach())


def embed_for_training(model: Encoder, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, D) sentence vectors with their graph: the fp32 master weights, autocast to the plan's dtype."""
    dtype = model.plan.dtype
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model.model(model.pack(ids, for_training=True))


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
