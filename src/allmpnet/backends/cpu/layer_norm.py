"""LayerNorm of bf16 rows for x86 CPUs with AVX512-BF16 (`allmpnet_x86_layer_norm`, csrc/layer_norm*.c): fp32 mean and
variance, bf16 in and out, as torch's; the same values but where a rounding tie falls the other way.

Why: torch's bf16 LayerNorm took 1.2 ms for a 3,825 x 768 batch on 2 AMX Xeon cores, ours 0.6 ms; a batch of
passages runs 25 of them (5% of its time under auto, before). The inference copy swaps the model's LayerNorms for
this one where the plan says so (PrecisionPlan.layer_norm_kernel).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.backends.cpu.int8 import KERNELS, loaded_for
from allmpnet.backends.cpu.library import load


@functools.lru_cache(maxsize=None)
def layer_norm_unavailable(capabilities: frozenset[str] | None = None) -> str:
    """Why the kernel cannot run on a CPU with these flags (this CPU's by default; "" when it can)."""
    return loaded_for(KERNELS["avx512-bf16"], capabilities)  # the same instructions


class X86LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose 2-D bf16 CPU inputs (rows a multiple of 16 wide) run our kernel, outside autograd;
    anything else runs torch's. Its weight and bias stay fp32 (the kernel reads them so), its output takes the
    input's dtype. `calls` counts the calls each way: [ours, torch's]."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = [0, 0]  # a list: no Module setattr per call

    @classmethod
    def like(cls, norm: nn.LayerNorm) -> "X86LayerNorm":
        if len(norm.normalized_shape) != 1 or not norm.elementwise_affine or norm.bias is None:
            raise ValueError("X86LayerNorm takes LayerNorms over the last dimension with a weight and a bias")
        out = cls(norm.normalized_shape, eps=norm.eps, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            out.weight.copy_(norm.weight.float())
            out.bias.copy_(norm.bias.float())
        return out.requires_grad_(False).train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.normalized_shape[0]
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2 or C % 16
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or layer_norm_unavailable()):
            self.calls[1] += 1
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        self.calls[0] += 1
        x = x.contiguous()
        y = torch.empty_like(x)
        status = load().allmpnet_x86_layer_norm(x.data_ptr(), y.data_ptr(), self.weight.data_ptr(),
                                                       self.bias.data_ptr(), self.eps, x.shape[0], C,
                                                       torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"the x86 LayerNorm kernel refused the call (status {status})")
        return y


def swap_layer_norms(module: nn.Module) -> None:
    """Replace every nn.LayerNorm under `module` (in place) by an X86LayerNorm of the same weights."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.LayerNorm) and not isinstance(child, X86LayerNorm):
            setattr(module, name, X86LayerNorm.like(child))
        else:
            swap_layer_norms(child)
