"""Data parallelism over torch.distributed (torchrun): global negatives and exact gradient sums.

Every process computes the same loss over the gathered global batch; `gather_with_grad` sends back to each process
only the gradient of its own rows, and `sum_gradients` adds the processes' parameter gradients. The result is the
gradient one process would get from the whole global batch, whatever the number of processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> Context:
    """Join the process group torchrun describes in the environment; a plain `python` run is one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)  # (world_size * rows, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all processes evaluate the identical loss, so the local rows' gradient is already complete here
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(local: torch.Tensor, context: Context) -> torch.Tensor:
    """(rows, D) on each process -> (world_size * rows, D) in rank order, differentiable w.r.t. the local rows."""
    return _GatherWithGrad.apply(local) if context.enabled else local


def sum_gradients(parameters: list[torch.nn.Parameter], context: Context) -> None:
    """All-reduce (sum) the parameter gradients in one flat buffer."""
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: torch.nn.Module, context: Context) -> None:
    """Start every process from rank 0's weights."""
    if context.enabled:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def sum_over_processes(value: float, context: Context) -> float:
    if not context.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])
