"""Our CPU kernels (`kernels.c`, for CPUs with AMX): weight-only int8 linear layers, and attention over short
blocks.

int8 linear layers: int8 weights with a scale per output channel and group of 128 inputs, bf16 maths. A short
query is memory-bound: it reads every weight once for about a dozen rows, so its floor is the weights' bytes
over the memory bandwidth (bf16: 170 MB, ~7 ms on two cores here). Stored in int8 they are half that. No op in
this torch build streams int8 weights at that speed for a few rows (`_weight_int8pack_mm` is ~4x slower than
bf16, dequantizing per call or torch.compile's template 2-3x), so the kernel does it: each block of weights is
widened to bf16 in L1 and multiplied on the AMX tiles. Why groups: with one scale per output channel, a few
large weights in the 3072-input projections coarsen the grid for all the others (STSBenchmark sentences: min
cosine to fp32 0.975); a scale per 128 inputs gives 0.999.

Short attention: blocks of at most 32 tokens, where SDPA's CPU kernel is all fixed cost (see kernels.c).

The library is compiled with the system C compiler on first use and cached, then checked against torch;
where there is no compiler, no AMX or the check fails, `kernels_unavailable()` says why and callers stay on
torch's ops.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.weights import cache_root

SOURCE = Path(__file__).with_name("kernels.c")
COMPILE_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile",
                 "-mamx-bf16"]
BLOCK = 32  # output channels and inputs per packed block (the kernel's tile geometry)
GROUP = 128  # inputs sharing one scale (per output channel)


def compiled_library(source: Path, flags: list[str]) -> Path:
    """`source` built with `flags` by the system C compiler, once per content of it and of the headers beside it
    (which it may include), into the cache (atomically: parallel processes may race to build it)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the source includes
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            run = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"compiling {source.name} failed: {run.stderr.strip()[-500:]}")
            os.replace(built, target)
    return target


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere, which keeps callers on the portable paths)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def _cpu_has_amx() -> bool:
    return {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} <= cpu_flags()


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") when the kernel runs here and passes its self-test, else (None, why not)."""
    if not _cpu_has_amx():
        return None, "this CPU has no AMX bf16 units"
    try:
        library = ctypes.CDLL(str(compiled_library(SOURCE, COMPILE_FLAGS)))
    except (OSError, RuntimeError) as error:
        return None, str(error)
    if library.allmpnet_request_amx() != 0:
        return None, "the kernel refused AMX state to this process"
    pointer = ctypes.c_void_p
    library.allmpnet_int8_linear.argtypes = ([pointer] * 3 + [ctypes.c_int64] + [pointer] * 3
                                             + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2)
    library.allmpnet_int8_linear.restype = ctypes.c_int
    library.allmpnet_short_attention.argtypes = ([pointer] * 3 + [ctypes.c_float] + [ctypes.c_int64] * 5
                                                 + [ctypes.c_int])
    library.allmpnet_short_attention.restype = None
    if not _self_test(library):
        return None, "the kernels' self-test gave wrong results"
    return library, ""


def _self_test(library: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(torch.randn(64, 96, generator=generator), torch.randn(64, generator=generator), "gelu")
    x = torch.randn(37, 96, generator=generator).bfloat16()  # two chunks of rows, one partial
    expected = F.gelu(F.linear(x.float(), layer.dequantized().bfloat16().float(), layer.bias))
    linear_ok = torch.allclose(layer.run(library, x, None).float(), expected, atol=0.05, rtol=0.02)
    qkv = torch.randn(2 * 5, 3 * 2 * 16, generator=generator).bfloat16()  # 2 blocks of 5 tokens, 2 heads of 16
    bias = torch.randn(2, 5, 5, generator=generator)
    expected = short_attention_reference(qkv, bias, 0, 2, 5, 2)
    got = torch.zeros(10, 32, dtype=torch.bfloat16)
    _short_attention(library, qkv, got, bias, 0, 2, 5, 2)
    return bool(linear_ok and torch.allclose(got.float(), expected, atol=0.02, rtol=0.02))


def kernels_unavailable() -> str:
    """Why our kernels cannot run here ("" when they can)."""
    return _load()[1]


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
    library, why = _load()
    if library is None:
        raise RuntimeError(f"our kernels cannot run here: {why}")
    _short_attention(library, qkv, out, bias, start, blocks, block_tokens, n_head)


def _short_attention(library: ctypes.CDLL, qkv: torch.Tensor, out: torch.Tensor, bias: torch.Tensor, start: int,
                     blocks: int, block_tokens: int, n_head: int) -> None:
    head_dim = out.shape[1] // n_head
    if not (qkv.dtype == out.dtype == torch.bfloat16 and bias.dtype == torch.float32 and qkv.is_contiguous()
            and out.is_contiguous() and bias.is_contiguous() and qkv.shape[1] == 3 * out.shape[1]
            and bias.shape == (n_head, block_tokens, block_tokens) and 0 < block_tokens <= MAX_BLOCK_TOKENS
            and head_dim * n_head == out.shape[1] and _head_dim_fits(head_dim)
            and start + blocks * block_tokens <= min(qkv.shape[0], out.shape[0])):
        raise ValueError("short_attention: inputs of the wrong dtype, layout or shape")
    library.allmpnet_short_attention(qkv.data_ptr(), out.data_ptr(), bias.data_ptr(), head_dim ** -0.5, start,
                                     blocks, block_tokens, n_head, head_dim, torch.get_num_threads())


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


def quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 values and fp32 scales (N, K / group): symmetric, absmax / 127 per group."""
    N, K = weight.shape
    groups = weight.detach().float().view(N, K // group, group)
    scale = groups.abs().amax(dim=2).clamp_min(1e-12) / 127  # (N, K / group)
    return torch.round(groups / scale[..., None]).to(torch.int8).view(N, K), scale


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
        library, why = _load()
        if library is None:
            raise RuntimeError(f"the int8 kernel cannot run here: {why}")
        return self.run(library, x, residual)

    def run(self, library: ctypes.CDLL, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
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
        if M and library.allmpnet_int8_linear(
                x.data_ptr(), self.packed.data_ptr(), self.scales.data_ptr(), self.group,
                None if self.bias is None else self.bias.data_ptr(),
                None if residual is None else residual.data_ptr(), y.data_ptr(),
                M, self.out_features, self.in_features, int(self.activation == "gelu"), torch.get_num_threads()) != 0:
            raise MemoryError("the int8 kernel could not allocate its weight buffer")
        return y
