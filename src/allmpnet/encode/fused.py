"""A fast inference copy of the MPNet network: low-precision weights, and on CPU oneDNN-prepacked linear layers.

Plain ``F.linear`` in bf16 on CPU spends about as long broadcasting the bias into its output as the AMX matmul
itself takes, and GELU and the residual add are each another pass over memory. oneDNN's linear op (the one
torch.compile's CPU backend emits) takes a weight reordered once into the AMX tile layout and applies bias, GELU
or a residual add while the output is still in cache. The swap below keeps the network's maths and module tree;
only the leaves that do the work change. The fp32 training network is never touched: this is a separate copy.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.model.mpnet import MPNet


def onednn_linear_available() -> bool:
    """True where this torch build has oneDNN's prepacked linear op and it runs on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=torch.bfloat16), 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=torch.bfloat16), w, None, "none", [], "")
        return bool(torch.allclose(y.float(), torch.full((2, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


class PackedLinear(nn.Module):
    """y = act(x W^T + b) [+ residual] with W prepacked by oneDNN; inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 batch_hint: int = 1024):
        super().__init__()
        self.activation = activation  # "none" or "gelu" (exact erf GELU: oneDNN's "none" algorithm)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "none")


class FusedAttention(nn.Module):
    """Attention block of one layer: one q|k|v projection, SDPA, output projection fused with the residual add."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        attn = attention.attn
        self.n_head = attn.n_head
        self.qkv = PackedLinear(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]),
                                torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        self.o = PackedLinear(attn.o.weight, attn.o.bias)
        self.LayerNorm = attention.LayerNorm

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # (B, H, T, D)
        return self.LayerNorm(self.o(y.transpose(1, 2).reshape(B, T, C), residual=x))


class FusedOutput(nn.Module):
    """LayerNorm(residual + dense(h)) with the add done by the matmul's epilogue."""

    def __init__(self, output: nn.Module):
        super().__init__()
        self.dense = PackedLinear(output.dense.weight, output.dense.bias)
        self.LayerNorm = output.LayerNorm

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h, residual=residual))


def inference_network(network: MPNet, dtype: torch.dtype, device: torch.device) -> MPNet:
    """A frozen copy of `network` in `dtype` on `device`; fused oneDNN layers where they apply (CPU, bf16/fp32)."""
    # deepcopy with every tensor pre-cast in the memo: the copy never holds a second full fp32 set of weights
    memo = {id(t): (nn.Parameter(t.detach().to(device=device, dtype=dtype), requires_grad=False)
                    if isinstance(t, nn.Parameter) else t.to(device=device, dtype=dtype if t.is_floating_point()
                                                                    else t.dtype))
            for t in list(network.parameters()) + list(network.buffers())}
    fast = copy.deepcopy(network, memo).eval()
    fast.pooler = None  # never used for sentence vectors
    if device.type == "cpu" and dtype == torch.bfloat16 and onednn_linear_available():
        for layer in fast.encoder.layer:
            layer.attention = FusedAttention(layer.attention)
            layer.intermediate = PackedLinear(layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                                              activation="gelu")
            layer.output = FusedOutput(layer.output)
    return fast
