"""Attention over blocks of equal length for x86 CPUs with AVX512 (`allmpnet_x86_attention`, csrc/attention*.c):
softmax(q k^T / sqrt(D) + bias) v per block and head of 64, with fp32 scores and softmax; the products of bf16
blocks on the AMX-bf16 tiles where the CPU has them, else in AVX512-BF16 pair dot products (twice the FMA rate),
else (and for fp32 blocks) in fp32 FMAs.

Why: torch's SDPA runs this model's bf16 attention at ~40-115 GFLOP/s on 2 Zen 4 cores (a quarter of a 256-token
passage's time), where ours runs it at 2.5-6x that on 9- to 384-token blocks; and at ~230 GFLOP/s on 2 AMX Xeon
cores (a fifth of a passage's time under auto), where ours on the tiles runs it at several times that. The packed
batch sends it every group whose blocks are at most MAX_TOKENS long (model/packing.py, GroupedAttention), with the
same call as the AMX short kernel.
"""
from __future__ import annotations

import functools

import torch

from allmpnet.backends.cpu.amx import short_attention_reference as reference  # the same maths by SDPA, in fp32
from allmpnet.backends.cpu.int8 import KERNELS, loaded_for
from allmpnet.backends.cpu.library import HEAD_DIM, library_unavailable, load, scratch_buffer

MAX_TOKENS = 512  # longest block it takes (its per-thread buffers grow with it: ~0.3 MB at 512)
PRODUCTS = ("fp32", "bf16", "amx")  # how bf16 blocks are multiplied, each taken only as far as the CPU goes


@functools.lru_cache(maxsize=None)
def attention_unavailable(capabilities: frozenset[str] | None = None) -> str:
    """Why the kernel cannot run on a CPU with these flags (this CPU's by default; "" when it can: built,
    supported and checked against SDPA)."""
    why = loaded_for(KERNELS["avx512-f32"], capabilities)  # the same instructions: AVX512 F/BW/VL/DQ
    if why:
        return why
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2 * 7, 3 * 2 * HEAD_DIM, generator=generator)  # 2 blocks of 7 tokens, 2 heads
    bias = torch.randn(2, 7, 7, generator=generator)
    out = torch.zeros(2 * 7, 2 * HEAD_DIM)
    if _run(qkv, out, bias, 0, 2, 7, 2) < 0:
        return "this CPU lacks an instruction set it needs"
    expected = reference(qkv, bias, 0, 2, 7, 2)
    return "" if torch.allclose(out, expected, atol=1e-5, rtol=1e-4) else "the attention kernel failed its self-test"


def _run(qkv: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, start: int, blocks: int,
         block_tokens: int, n_head: int, products: str = "amx") -> int:
    library = load()
    scratch = scratch_buffer(library.allmpnet_x86_attention_scratch_bytes(block_tokens, torch.get_num_threads()))
    return library.allmpnet_x86_attention(qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), out.data_ptr(),
                                          bias.data_ptr(), HEAD_DIM ** -0.5, start, blocks, block_tokens, n_head,
                                          PRODUCTS.index(products), scratch.data_ptr(), torch.get_num_threads())


def block_attention(qkv: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, start: int, blocks: int,
                    block_tokens: int, n_head: int, products: str = "amx") -> str:
    """Rows [start, start + blocks x block_tokens) of packed (N, 3C) q|k|v -> the same rows of out (N, C), both
    bf16 or both fp32, heads of 64; bias (H, T, T) fp32. products (PRODUCTS): for bf16 q|k|v the most it may use,
    "amx" tiles, "bf16" AVX512-BF16 pair dot products (as on CPUs without AMX) or "fp32" FMAs (as on CPUs without
    either). Returns the products it used."""
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    C = out.shape[1]
    if not (qkv.dtype == out.dtype and qkv.dtype in (torch.bfloat16, torch.float32) and bias.dtype == torch.float32
            and qkv.is_contiguous() and out.is_contiguous() and bias.is_contiguous() and qkv.shape[1] == 3 * C
            and C == n_head * HEAD_DIM and bias.shape == (n_head, block_tokens, block_tokens)
            and 0 < block_tokens <= MAX_TOKENS and start + blocks * block_tokens <= min(qkv.shape[0], out.shape[0])):
        raise ValueError("block_attention: inputs of the wrong dtype, layout or shape")
    why = library_unavailable()
    used = -1 if why else _run(qkv, out, bias, start, blocks, block_tokens, n_head, products)
    if used < 0:
        raise RuntimeError(f"the x86 attention kernel cannot run here: {why or 'it refused the call'}")
    return PRODUCTS[used]
