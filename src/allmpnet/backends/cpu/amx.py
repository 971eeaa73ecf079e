"""Our AMX-bf16 kernels (for CPUs with AMX): weight-only int8 linear layers, and attention over short blocks.

int8 linear layers: int8 weights with a scale per output channel and group of 128 inputs, bf16 maths. A short
query is memory-bound: it reads every weight once for about a dozen rows, so its floor is the weights' bytes
over the memory bandwidth (bf16: 170 MB, ~7 ms on two cores here). Stored in int8 they are half that. No op in
this torch build streams int8 weights at that speed for a few rows (`_weight_int8pack_mm` is ~4x slower than
bf16, dequantizing per call or torch.compile's template 2-3x), so the kernel does it: each block of weights is
widened to bf16 in L1 and multiplied on the AMX tiles. Why groups: with one scale per output channel, a few
large weights in the 3072-input projections coarsen the grid for all the others (STSBenchmark sentences: min
cosine to fp32 0.975); a scale per 128 inputs gives 0.999.

Short attention: blocks of at most 32 tokens, where SDPA's CPU kernel is all fixed cost (csrc/amx_bf16.c).

Both live in the CPU backend's library (csrc/amx_bf16.c); where the CPU has no AMX, the library is missing, or
their self-test fails, `kernels_unavailable()` says why and callers stay on torch's ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.backends.cpu.int8 import quantize
from allmpnet.backends.cpu.library import cpu_flags, library_unavailable, load

BLOCK = 32  # output channels and inputs per packed block (the kernel's tile geometry)
GROUP = 128  # inputs sharing one scale (per output channel)


def cpu_has_amx() -> bool:
    return {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} <= cpu_flags()


@functools.lru_cache(maxsize=1)
def kernels_unavailable() -> str:
    """Why our AMX kernels cannot run here ("" when they can: the library loaded, the CPU has AMX-bf16 and granted
    its tile state, and their self-test passed)."""
    if not cpu_has_amx():
        return "this CPU has no AMX bf16 units"
    why = library_unavailable()
    if why:
        return why
    if not _self_test():
        return "the kernels' self-test gave wrong results, or the tile state was refused"
    return ""


def _self_test() -> bool:
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(torch.randn(64, 96, generator=generator), torch.randn(64, generator=generator), "gelu")
    x = torch.randn(37, 96, generator=generator).bfloat16()  # two chunks of rows, one partial
    expected = F.gelu(F.linear(x.float(), layer.dequantized().bfloat16().float(), layer.bias))
    try:
        got = layer.run(x, None)
    except RuntimeError:  # the library refused: no AMX-bf16 here after all, or no tile state
        return False
    linear_ok = torch.allclose(got.float(), expected, atol=0.05, rtol=0.02)
    qkv = torch.randn(2 * 5, 3 * 2 * 16, generator=generator).bfloat16()  # 2 blocks of 5 tokens, 2 heads of 16
    bias = torch.randn(2, 5, 5, generator=generator)
    expected = short_attention_reference(qkv, bias, 0, 2, 5, 2)
    got = torch.zeros(10, 32, dtype=torch.bfloat16)
    if _short_attention(qkv, got, bias, 0, 2, 5, 2) != 0:
        return False
    return bool(linear_ok and torch.allclose(got.float(), expected, atol=0.02, rtol=0.02))


# ---------------------------------------------------------------- attention over short blocks

MAX_BLOCK_TOKENS = 32  # the kernel keeps a block's keys in two 16-lane vectors
MAX_HEAD_DIM = 128  # its per-head buffers, on the stack


def _head_dim_fits(head_dim: int) -> bool:
    return head_dim % 16 == 0 and 0 < head_dim <= MAX_HEAD_DIM


def short_attention_supported(head_dim: int) -> bool:
    """Whether short_attention runs here for heads of this size (blocks of at most MAX_BLOCK_TOKENS tokens)."""
    return _head_dim_fits(head_dim) and not kernels_unavailable()


def short_attention(qkv: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, start: int, blocks: int,
                    block_tokens: int, n_head: int) -> None:
    """Rows [start, start + blocks x block_tokens) of packed (N, 3C) bf16 q|k|v -> the same rows of out (N, C):
    softmax(q k^T / sqrt(D) + bias) v per block and head; bias (H, T, T) fp32."""
    why = kernels_unavailable()
    if why:
        raise RuntimeError(f"our kernels cannot run here: {why}")
    _short_attention(qkv, out, bias, start, blocks, block_tokens, n_head)


def _short_attention(qkv: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, start: int, blocks: int,
                     block_tokens: int, n_head: int) -> int:
    head_dim = out.shape[1] // n_head
    if not (qkv.dtype == out.dtype == torch.bfloat16 and bias.dtype == torch.float32 and qkv.is_contiguous()
            and out.is_contiguous() and bias.is_contiguous() and qkv.shape[1] == 3 * out.shape[1]
            and bias.shape == (n_head, block_tokens, block_tokens) and 0 < block_tokens <= MAX_BLOCK_TOKENS
            and head_dim * n_head == out.shape[1] and _head_dim_fits(head_dim)
            and start + blocks * block_tokens <= min(qkv.shape[0], out.shape[0])):
        raise ValueError("short_attention: inputs of the wrong dtype, layout or shape")
    return load().allmpnet_amx_short_attention(qkv.data_ptr(), out.data_ptr(), bias.data_ptr(), head_dim ** -0.5,
                                               start, blocks, block_tokens, n_head, head_dim,
                                               torch.get_num_threads())


def short_attention_reference(qkv: torch.Tensor, bias: torch.Tensor, start: int, blocks: int, block_tokens: int,
                              n_head: int) -> torch.Tensor:
    """The same maths with torch's SDPA in fp32: (blocks x block_tokens, C)."""
    C = qkv.shape[1] // 3
    rows = qkv[start:start + blocks * block_tokens].float().view(blocks, block_tokens, 3, n_head, C // n_head)
    q, k, v = rows.permute(2, 0, 3, 1, 4)  # each (blocks, H, T, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
    return y.transpose(1, 2).reshape(blocks * block_tokens, C)


# ---------------------------------------------------------------- int8 linear layers


def group_size(in_features: int) -> int:
    """GROUP where it divides the inputs, else the kernel's step (small test models)."""
    return GROUP if in_features % GROUP == 0 else BLOCK


def pack_weight(quantized: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> the kernel's tile order, [N/32][K/32][2][16][16][2]: per block of 32 outputs and step of
    32 inputs, two B tiles of (input pair, output, input within the pair)."""
    N, K = quantized.shape
    tiles = quantized.view(N // BLOCK, 2, 16, K // BLOCK, 16, 2)  # (block, tile, n, step, pair, k in pair)
    return tiles.permute(0, 3, 1, 4, 2, 5).contiguous()


def pack_scales(scale: torch.Tensor) -> torch.Tensor:
    """(N, G) -> [N/32][G][2][32]: per block, group and tile, the scale of each lane of a widened tile row (lane j
    holds output j // 2 of the tile)."""
    N, G = scale.shape
    per_tile = scale.view(N // BLOCK, 2, 16, G).permute(0, 3, 1, 2)  # (block, group, tile, n)
    return per_tile.repeat_interleave(2, dim=3).contiguous()


class Int8Linear(nn.Module):
    """y = act(x W^T + b) [+ residual] with W in int8 (scales per output channel and group of inputs); x and y
    bf16, inference only. Same interface as fused.Linear.

    Each row is computed on its own, in a fixed order: its result does not depend on the other rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
        super().__init__()
        N, K = weight.shape
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        if N % BLOCK or K % BLOCK:
            raise ValueError(f"int8 layers need both dimensions to be multiples of {BLOCK}, got {N}x{K}")
        self.activation, self.in_features, self.out_features = activation, K, N
        self.group = group_size(K)
        quantized, scale = quantize(weight, self.group)
        self.register_buffer("packed", pack_weight(quantized))
        self.register_buffer("scales", pack_scales(scale))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def dequantized(self) -> torch.Tensor:
        """The (N, K) weight this layer stands for, in fp32 (the kernel multiplies by its bf16 rounding)."""
        N, K = self.out_features, self.in_features
        quantized = self.packed.permute(0, 2, 4, 1, 3, 5).reshape(N, K).float()
        scale = self.scales[..., ::2].permute(0, 2, 3, 1).reshape(N, K // self.group)  # (N, G)
        return (quantized.view(N, -1, self.group) * scale[..., None]).view(N, K)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        why = kernels_unavailable()
        if why:
            raise RuntimeError(f"the int8 kernel cannot run here: {why}")
        return self.run(x, residual)

    def run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Int8Linear takes (rows, {self.in_features}) bf16 CPU inputs, "
                             f"got {tuple(x.shape)} {x.dtype} on {x.device}")
        M = x.shape[0]
        if residual is not None:
            if self.activation != "none":
                raise ValueError("a residual is added after the matmul only when there is no activation")
            if residual.dtype != torch.bfloat16 or residual.shape != (M, self.out_features):
                raise ValueError(f"residual must be ({M}, {self.out_features}) bf16, got {tuple(residual.shape)} "
                                 f"{residual.dtype}")
            residual = residual.contiguous()
        x = x.contiguous()
        y = torch.empty(M, self.out_features, dtype=torch.bfloat16)
        status = 0 if not M else load().allmpnet_amx_bf16_linear(
            x.data_ptr(), self.packed.data_ptr(), self.scales.data_ptr(), self.group,
            None if self.bias is None else self.bias.data_ptr(), None if residual is None else residual.data_ptr(),
            y.data_ptr(), M, self.out_features, self.in_features, int(self.activation == "gelu"),
            torch.get_num_threads())
        if status == -2:
            raise RuntimeError("the AMX int8 kernel cannot run on this CPU (no AMX-bf16, or the tile state refused)")
        if status != 0:
            raise MemoryError("the int8 kernel could not allocate its weight buffer")
        return y
