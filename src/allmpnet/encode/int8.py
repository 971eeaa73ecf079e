"""Weight-only int8 linear layers for CPUs with AMX: int8 weights with a scale per output channel and group of
128 inputs, bf16 maths.

A short query is memory-bound: it reads every weight once for about a dozen rows, so its floor is the weights'
bytes over the memory bandwidth (bf16: 170 MB, ~7 ms on two cores here). Stored in int8 they are half that. No
op in this torch build streams int8 weights at that speed for a few rows (`_weight_int8pack_mm` is ~4x slower
than bf16, dequantizing per call or torch.compile's template 2-3x), so `int8_linear.c` does it: each block of
weights is widened to bf16 in L1 and multiplied on the AMX tiles. It is compiled with the system C compiler on
first use and cached; where there is no compiler, no AMX or the self-test fails, `int8_unavailable()` says why
and callers stay on bf16.

Why groups: with one scale per output channel, a few large weights in the 3072-input projections coarsen the
grid for all the others (STSBenchmark sentences: min cosine to fp32 0.975); a scale per 128 inputs gives 0.999.
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

SOURCE = Path(__file__).with_name("int8_linear.c")
COMPILE_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile",
                 "-mamx-bf16"]
BLOCK = 32  # output channels and inputs per packed block (the kernel's tile geometry)
GROUP = 128  # inputs sharing one scale (per output channel)


def _compiled_library() -> Path:
    """The kernel built for this source and flags, compiled once into the cache (atomically: parallel
    processes may race to build it)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *COMPILE_FLAGS]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"int8_linear-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            run = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                                 text=True)
            if run.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed: {run.stderr.strip()[-500:]}")
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
        library = ctypes.CDLL(str(_compiled_library()))
    except (OSError, RuntimeError) as error:
        return None, str(error)
    if library.allmpnet_request_amx() != 0:
        return None, "the kernel refused AMX state to this process"
    pointer = ctypes.c_void_p
    library.allmpnet_int8_linear.argtypes = ([pointer] * 3 + [ctypes.c_int64] + [pointer] * 3
                                             + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2)
    library.allmpnet_int8_linear.restype = ctypes.c_int
    if not _self_test(library):
        return None, "the kernel's self-test gave wrong results"
    return library, ""


def _self_test(library: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    layer = Int8Linear(torch.randn(64, 96, generator=generator), torch.randn(64, generator=generator), "gelu")
    x = torch.randn(37, 96, generator=generator).bfloat16()  # two chunks of rows, one partial
    expected = F.gelu(F.linear(x.float(), layer.dequantized().bfloat16().float(), layer.bias))
    return bool(torch.allclose(layer.run(library, x, None).float(), expected, atol=0.05, rtol=0.02))


def int8_unavailable() -> str:
    """Why the int8 kernel cannot run here ("" when it can)."""
    return _load()[1]


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
