"""allmpnet's CPU backend: our kernels for x86 CPUs, built into one library (csrc/, build.py, library.py), and the
modules that put them in an inference copy. What the rest of allmpnet asks of it, and nothing else:

- what runs here, for the precision planner (encode/precision.py): `kernel_unavailable` and its kin;
- the swaps an inference copy is built from (encode/inference.py): int8 linear layers (`X86Int8Linear`, AMX's
  `Int8Linear`), the bf16 LayerNorm, and the fused forward pass (`FusedX86Stack`);
- for a packed batch, the attention kernels a plan runs (`attention_options`);
- a batch's vectors in one call, where the copy has the fused forward pass (`sentence_vectors`), and the exact
  fp32 path over the model's own weights (`exact_stack`).

Layout: one C/C++ source per operation and instruction set in csrc/ (allmpnet_cpu.h is the interface), each built
with its own flags and dispatched at run time; how to add a kernel: docs/design/cpu-backend.md.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from allmpnet.backends.cpu import amx, attention
from allmpnet.backends.cpu.fused import FusedX86Stack
from allmpnet.backends.cpu.library import cpu_flags, library_unavailable

__all__ = ["FusedX86Stack", "attention_options", "cpu_flags", "exact_stack", "library_unavailable",
           "sentence_vectors"]


def attention_options(short_attention: bool, block_products: str | None, hidden_size: int,
                      n_head: int) -> dict[str, Any]:
    """PackedBatch.from_ids's kernel arguments for a plan: the AMX kernel for texts of at most 32 tokens
    (`short_attention`), our x86 kernel with `block_products` for texts up to 512, where they take these heads."""
    head_dim = hidden_size // n_head
    options: dict[str, Any] = {}
    if short_attention and amx.short_attention_supported(head_dim):
        options.update(short_kernel=amx.short_attention, short_kernel_max_tokens=amx.MAX_BLOCK_TOKENS)
    if block_products and head_dim == attention.HEAD_DIM:
        options.update(block_kernel=functools.partial(attention.block_attention, products=block_products),
                       block_kernel_max_tokens=attention.MAX_TOKENS)
    return options


def sentence_vectors(model: torch.nn.Module, ids: Sequence[Sequence[int]], normalize: bool) -> torch.Tensor | None:
    """(B, dim) vectors of the batch through `model`'s fused forward pass in one call, where its layer stack is a
    FusedX86Stack that takes the batch; else None (run the model)."""
    stack = model.network.encoder
    return stack.sentence_vectors(ids, normalize) if isinstance(stack, FusedX86Stack) else None


def exact_stack(model: torch.nn.Module, kernel: str | None) -> FusedX86Stack | None:
    """The fused call on an fp32 model's own weights through fp32-weight kernel `kernel` (fused.FP32_KERNELS), for
    any batch (one code path: the same bits in any batch or thread count); None without a kernel."""
    if kernel is None:
        return None
    network = model.network
    return FusedX86Stack(network.encoder, None, network.encoder, kernel, network.embeddings, model.pooling)
