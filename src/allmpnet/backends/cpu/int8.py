"""int8-weight linear layers for x86 CPUs (csrc/linear*): AVX512-VNNI, AVX-VNNI, AVX512-BF16, AVX512 and AVX2,
and W8A8 on AMX-int8 tiles for large batches.

A layer keeps one int8 copy of its weight (a scale per output channel and group of 128 inputs, the AMX kernel's
choice: one scale per channel lets a few large weights coarsen whole rows) and multiplies it by the activations
in one of these forms, picked per call by the number of rows:

- "int8": activations quantized per row (token) to int8, VNNI's vpdpbusd (W8A8; twice the bf16 rate), on 512-bit
  vectors (AVX512-VNNI) or 256-bit ones (AVX-VNNI: AVX2 CPUs such as Alder Lake and Sierra Forest). Only
  with an outlier treatment does it keep this model's quality: SmoothQuant-style `smooth` factors, and int8
  activations only in the layers that tolerate them (docs/design/cpu-backend.md). On AMX-int8 (Sapphire Rapids on)
  the same prepared rows go through the tiles ("amx-a8", for large batches: vnni-a8's outputs to the bit).
- "int16": activations quantized per row to int16, 1/32767 of the row's largest value: finer than bf16, so
  weight-only int8 in quality; vpdpwssd (VNNI), vpmaddwd (AVX512BW, AVX2: twice the fp32 FMA rate there).
- "bf16": bf16 activations, vdpbf16ps (AVX512-BF16). "fp32": FMA (AVX512F, AVX2).

Small batches (a query's dozen rows) are memory-bound, so any form that streams the int8 weights at the memory's
speed wins; large ones are compute-bound and want the fastest multiply that keeps quality.

`kernel_unavailable(name)` says why a kernel cannot run here ("" when it can: the library loaded, the CPU has its
instructions, and its self-test against torch passed).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.backends.cpu.library import KERNEL_IDS, MAX_SPLIT, SPLIT_SHARE, cpu_flags, library_unavailable, load
from allmpnet.backends.cpu.library import scratch_buffer

BLOCK_N = 64  # outputs per packed block
STEP_K = 4  # inputs per packed step
GROUP = 128  # inputs sharing one weight scale (per output channel)
MAX_GROUP = 512  # int16 activations: a group's int32 sums stay exact up to here (group = K: one scale per channel)

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
AVX2 = frozenset({"avx2", "fma"})
AVX_VNNI = "avx_vnni"  # /proc/cpuinfo's name for AVX-VNNI (VEX-encoded vpdpbusd on 256 bits)


@dataclass(frozen=True)
class Kernel:
    id: int  # the C enum (allmpnet_cpu.h)
    flags: frozenset  # /proc/cpuinfo flags it needs
    activations: str  # "int8", "int16", "bf16" or "fp32"


KERNELS = {
    "vnni-a8": Kernel(KERNEL_IDS["vnni-a8"], AVX512 | {"avx512_vnni"}, "int8"),
    "avxvnni-a8": Kernel(KERNEL_IDS["avxvnni-a8"], AVX2 | {AVX_VNNI}, "int8"),
    # avxvnni-a8's code in AVX512-VNNI's encoding of the same instruction, so that CPUs with AVX-512 but not
    # AVX-VNNI (Zen 4, where the tests ran) run and test that code; its outputs equal vnni-a8's to the bit
    "vnni256-a8": Kernel(KERNEL_IDS["vnni256-a8"], AVX512 | {"avx512_vnni"}, "int8"),
    # vnni-a8's rows on AMX-int8 tiles (Sapphire Rapids on): large batches (the same sums, in the same order)
    "amx-a8": Kernel(KERNEL_IDS["amx-a8"], AVX512 | {"avx512_vnni", "amx_tile", "amx_int8"}, "int8"),
    "vnni-a16": Kernel(KERNEL_IDS["vnni-a16"], AVX512 | {"avx512_vnni"}, "int16"),
    "avx512-bf16": Kernel(KERNEL_IDS["avx512-bf16"], AVX512 | {"avx512_bf16"}, "bf16"),
    "avx512-a16": Kernel(KERNEL_IDS["avx512-a16"], AVX512, "int16"),
    "avx512-f32": Kernel(KERNEL_IDS["avx512-f32"], AVX512, "fp32"),
    "avx2-a16": Kernel(KERNEL_IDS["avx2-a16"], AVX2, "int16"),
    "avx2-f32": Kernel(KERNEL_IDS["avx2-f32"], AVX2, "fp32"),
}
MAX_SMALL_ROWS = 64  # X86Int8Linear's default: batches of at most this many rows run its `small` kernel
KERNEL_GROUP_STEP = {"amx-a8": 64}  # kernels that take only groups of a multiple of this many inputs (a tile row)
# per activation form, the kernels in the order they are preferred where several run (measured on Zen 4:
# docs/design/cpu-backend.md)
PREFERENCE = {
    "int8": ["vnni-a8", "avxvnni-a8", "vnni256-a8"],
    "int16": ["vnni-a16", "avx512-a16", "avx2-a16"],
    "bf16": ["avx512-bf16"],
    "fp32": ["avx512-f32", "avx2-f32"],
    # weight-only int8, any activation form that keeps fp32 quality (for a few rows all are memory-bound)
    "weight-only": ["vnni-a16", "avx512-bf16", "avx512-a16", "avx2-a16", "avx512-f32", "avx2-f32"],
}


def pick_kernel(form: str, capabilities: frozenset[str] | None = None) -> str | None:
    """The preferred kernel of activation form `form` (a PREFERENCE key) whose flags are all in `capabilities`
    (this CPU's by default) and that runs here; None when there is none."""
    capabilities = frozenset(cpu_flags()) if capabilities is None else capabilities
    for name in PREFERENCE[form]:
        if not kernel_unavailable(name, capabilities):
            return name
    return None


# ---------------------------------------------------------------- whether a kernel runs here


def loaded_for(kernel: Kernel, capabilities: frozenset[str] | None = None) -> str:
    """"" when a CPU with these flags (this CPU's by default) has what `kernel` needs, the library loaded, and it
    agrees that this CPU runs the kernel; else why not. Self-tests come after."""
    capabilities = frozenset(cpu_flags()) if capabilities is None else capabilities
    missing = sorted(kernel.flags - capabilities)
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    why = library_unavailable()
    if why:
        return why
    if not load().allmpnet_x86_kernel_supported(kernel.id):
        return "this CPU lacks an instruction set it needs (or this build of the library left the kernel out)"
    return ""


@functools.lru_cache(maxsize=None)
def kernel_unavailable(name: str, capabilities: frozenset[str] | None = None) -> str:
    """Why kernel `name` cannot run on a CPU with these flags (this CPU's by default; "" when it can: built,
    supported, and its self-test passed)."""
    if name not in KERNELS:
        return f"unknown kernel {name!r}; known: {sorted(KERNELS)}"
    why = loaded_for(KERNELS[name], capabilities)
    if why:
        return why
    return "" if _self_test(name) else f"kernel {name} gave wrong results in its self-test"


def _self_test(name: str) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 256, generator=generator), torch.randn(96, generator=generator)
    layer = X86Int8Linear(weight, bias, "gelu", group=64, small=name, large=name,
                          smooth=torch.rand(256, generator=generator) + 0.5)
    x = torch.randn(13, 256, generator=generator)  # two row chunks, one partial; N: one block, one partial
    got = layer.run(name, x, None)
    return bool(torch.allclose(got, layer.reference(x, form=KERNELS[name].activations), atol=2e-3, rtol=2e-3))


# ---------------------------------------------------------------- quantization and layout


def group_size(in_features: int, group: int = GROUP) -> int:
    """`group` where it divides the inputs, else the largest power of two from 4 that does (small test models)."""
    if in_features % group == 0:
        return group
    size = STEP_K
    while in_features % (size * 2) == 0 and size * 2 <= group:
        size *= 2
    if in_features % size:
        raise ValueError(f"int8 layers need a multiple of {STEP_K} inputs, got {in_features}")
    return size


def pad_outputs(t: torch.Tensor) -> torch.Tensor:
    """Zero rows appended up to a whole number of 64-output blocks."""
    extra = -t.shape[0] % BLOCK_N
    return t if not extra else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


def pack_weight(quantized: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> [N/64][K/4][64][4], N padded to blocks of 64: per block of 64 outputs and step of 4
    inputs, the 64 x 4 bytes one step reads."""
    q = pad_outputs(quantized)
    N, K = q.shape
    return q.reshape(N // BLOCK_N, BLOCK_N, K // STEP_K, STEP_K).permute(0, 2, 1, 3).contiguous()


def pack_groups(table: torch.Tensor) -> torch.Tensor:
    """A per (output, group) table (N, G) -> [N/64][G][64], N padded to blocks of 64."""
    t = pad_outputs(table)
    return t.reshape(t.shape[0] // BLOCK_N, BLOCK_N, t.shape[1]).permute(0, 2, 1).contiguous()


def compensation(quantized: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) fp32: -128 x the sum over groups of scale x the group's sum of int8 weights. The int8 kernel stores
    activations q as q + 128 (vpdpbusd multiplies unsigned by signed bytes); added to a row's scaled group sums,
    it leaves sum q w (up to fp32 rounding: one float per output, where an int32 per output and group cost a
    query 3% more bytes)."""
    N, K = quantized.shape
    sums = quantized.double().reshape(N, K // group, group).sum(2)  # (N, G), exact
    return (-128 * (sums * scale.double()).sum(1)).float()


def smoothing_factors(activation_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|x_k|^alpha / max|W_:,k|^(1 - alpha): the layer computes
    (x / s)(W diag(s))^T, moving a share alpha of the activations' outlier range into the weights, whose
    per-group scales absorb it better than a per-token activation scale does."""
    a = activation_absmax.float().clamp_min(1e-5)
    w = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(1e-2, 1e2)


def spiky_rows(v: torch.Tensor, route: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the int8 kernel does with rows whose largest |v| exceeds route x their RMS: (kept, split, routed):
    kept (M, K) the entries a split row keeps aside (exact, else 0), split (M,) the rows that do, routed (M,) the
    rows with more than MAX_SPLIT such entries, which run with int16 activations instead."""
    squares = v.pow(2).mean(1)
    spiky = v.abs().amax(1) > route * squares.sqrt()
    above = (v.pow(2) > (SPLIT_SHARE * route) ** 2 * squares[:, None]) & spiky[:, None]
    routed = above.sum(1) > MAX_SPLIT
    split = spiky & ~routed
    return torch.where(above & split[:, None], v, torch.zeros_like(v)), split, routed


def quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 values and fp32 scales (N, K / group): symmetric, absmax / 127 per group."""
    N, K = weight.shape
    groups = weight.detach().float().view(N, K // group, group)
    scale = groups.abs().amax(dim=2).clamp_min(1e-12) / 127  # (N, K / group)
    return torch.round(groups / scale[..., None]).to(torch.int8).view(N, K), scale


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization to `bits` (8 or 16), as the kernels do: (integer values as float, scales)."""
    top = 2 ** (bits - 1) - 1
    largest = x.abs().amax(1, keepdim=True)
    inverse = torch.where(largest > 0, top / largest, torch.zeros_like(largest))
    return torch.round(x * inverse), largest / top


# ---------------------------------------------------------------- the layer

STREAMED_BUFFERS = ("packed", "scales", "compensation")  # what a few rows read from memory, in the order they do


class X86Int8Linear(nn.Module):
    """y = act(x W^T + b) [+ residual] with W in int8 (a scale per output channel and group of `group` inputs);
    act "none" or "gelu" (exact erf GELU); x, residual and y fp32 or bf16 (y takes x's dtype). Inference only;
    same interface as model.mpnet.Linear.

    Batches of at most `max_small_rows` rows run kernel `small`, larger ones kernel `large` (KERNELS names; they
    share the one packed weight). smooth (K,): SmoothQuant factors s (smoothing_factors); the layer stores
    W diag(s) and multiplies x by 1 / s inside the kernel, so callers pass x unchanged. route (the int8 kernel):
    rows (tokens) whose largest |x / s| exceeds `route` times their root mean square keep their few largest
    entries aside, exact (the rest is int8 at the scale its own values set), or, with more than MAX_SPLIT of them,
    are multiplied with int16 activations, in the same call (spiky_rows; 0: never).

    Each row's result depends only on that row (per-row activation scales, fixed summation order)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none", *,
                 group: int = GROUP, smooth: torch.Tensor | None = None, small: str = "vnni-a16",
                 large: str = "vnni-a8", max_small_rows: int = MAX_SMALL_ROWS, route: float = 0.0):
        super().__init__()
        N, K = weight.shape
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        for name in (small, large):
            if name not in KERNELS:
                raise ValueError(f"unknown kernel {name!r}; known: {sorted(KERNELS)}")
        self.activation, self.in_features, self.out_features = activation, K, N
        self.small, self.large, self.max_small_rows, self.route = small, large, max_small_rows, route
        self.routing = [0, 0]  # rows the int8 kernel routed to int16, of rows it ran (a list: no Module setattr per call)
        self.group = group_size(K, group)
        for name in (small, large):
            if self.group % KERNEL_GROUP_STEP.get(name, 1):
                raise ValueError(f"kernel {name} takes groups of a multiple of {KERNEL_GROUP_STEP[name]} inputs, "
                                 f"got {self.group}")
        int16 = route > 0 or "int16" in (KERNELS[small].activations, KERNELS[large].activations)
        if self.group > MAX_GROUP and int16:
            raise ValueError(f"the int16 kernels take groups of at most {MAX_GROUP} inputs, got {self.group}")
        w = weight.detach().float()
        if smooth is not None:
            smooth = smooth.detach().float().reshape(K)
            w = w * smooth
        quantized, scale = quantize(w, self.group)
        self.register_buffer("packed", pack_weight(quantized))
        self.register_buffer("scales", pack_groups(scale))
        self.register_buffer("compensation", pad_outputs(compensation(quantized, scale, self.group)))
        self.register_buffer("inverse_smooth", None if smooth is None else (1 / smooth).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def routed_rows(self) -> int:
        return self.routing[0]

    @property
    def rows(self) -> int:
        return self.routing[1]

    def dequantized(self) -> torch.Tensor:
        """The (N, K) fp32 weight the kernels multiply by x / s (W diag(s), quantized)."""
        N, K, G = self.out_features, self.in_features, self.in_features // self.group
        q = self.packed.permute(0, 2, 1, 3).reshape(-1, K)[:N].float()
        scale = self.scales.permute(0, 2, 1).reshape(-1, G)[:N]
        return (q.reshape(N, G, self.group) * scale[..., None]).reshape(N, K)

    def kernel_for(self, rows: int) -> str:
        return self.small if rows <= self.max_small_rows else self.large

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        name = self.kernel_for(x.shape[0])
        why = kernel_unavailable(name)
        if why:
            raise RuntimeError(f"int8 kernel {name} cannot run here: {why}")
        return self.run(name, x, residual)

    def run(self, name: str, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The layer by kernel `name` (which must run here: kernel_unavailable)."""
        if (x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or x.dim() != 2
                or x.shape[1] != self.in_features):
            raise ValueError(f"X86Int8Linear takes (rows, {self.in_features}) fp32 or bf16 CPU inputs, "
                             f"got {tuple(x.shape)} {x.dtype} on {x.device}")
        M, N, K = x.shape[0], self.out_features, self.in_features
        if residual is not None:
            if residual.dtype != x.dtype or residual.shape != (M, N):
                raise ValueError(f"residual must be ({M}, {N}) {x.dtype}, got {tuple(residual.shape)} "
                                 f"{residual.dtype}")
            residual = residual.contiguous()
        x = x.contiguous()
        y = torch.empty(M, N, dtype=x.dtype)
        kernel, threads = KERNELS[name].id, torch.get_num_threads()
        library = load()
        scratch = scratch_buffer(library.allmpnet_x86_scratch_bytes(kernel, M, K, threads))
        status = library.allmpnet_x86_linear(
            kernel, x.data_ptr(), int(x.dtype == torch.bfloat16),
            None if self.inverse_smooth is None else self.inverse_smooth.data_ptr(),
            self.packed.data_ptr(), self.scales.data_ptr(), self.compensation.data_ptr(), self.group,
            None if self.bias is None else self.bias.data_ptr(), None if residual is None else residual.data_ptr(),
            y.data_ptr(), int(y.dtype == torch.bfloat16), M, N, K, int(self.activation == "gelu"), self.route,
            scratch.data_ptr(), threads)
        if status < 0:
            raise RuntimeError(f"int8 kernel {name} refused the call (status {status})")
        if KERNELS[name].activations == "int8":
            self.routing[0] += status
            self.routing[1] += M
        return y

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None = None, form: str | None = None
                  ) -> torch.Tensor:
        """What kernel form `form` ("int8", "int16", "bf16", "fp32"; default the large kernel's) computes, in
        torch fp32: the same quantization, a different summation order."""
        form = form or KERNELS[self.large].activations
        v = x.float()
        if self.inverse_smooth is not None:
            v = v * self.inverse_smooth
        if form in ("int8", "int16"):
            q, scale = quantize_rows(v, 8 if form == "int8" else 16)
            kept = None
            if form == "int8" and self.route > 0:
                kept, split, routed = spiky_rows(v, self.route)
                q[split], scale[split] = quantize_rows(v[split] - kept[split], 8)
                q[routed], scale[routed] = quantize_rows(v[routed], 16)
            v = q * scale if kept is None else q * scale + kept
        elif form == "bf16":
            v = v.bfloat16().float()
        return self.from_activations(v, residual, x.dtype)

    def from_activations(self, v: torch.Tensor, residual: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """act(v W'^T + b) [+ residual] in torch fp32, from activations v already in the kernel's form (x / s,
        rounded as it rounds them), W' the dequantized weight; in `dtype`."""
        y = F.linear(v, self.dequantized(), self.bias)
        if self.activation == "gelu":
            y = F.gelu(y)
        if residual is not None:
            y = y + residual.float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, activation={self.activation}, group={self.group}, "
                f"small={self.small} (<= {self.max_small_rows} rows), large={self.large}, "
                f"smooth={self.inverse_smooth is not None}, route={self.route}")


# ---------------------------------------------------------------- the recipe for this model's layers
# Measured (docs/design/cpu-backend.md): W8A8 keeps min cosine to fp32 >= 0.99 and STSBenchmark within 0.1 only with
# SmoothQuant on the inputs of q|k|v, the attention output and the FFN up projection, whose outliers sit in a few
# fixed channels of the residual stream, but not on the FFN down projection, whose outliers move with the token
# (smoothing made it worse), and with the spiky rows (the <s> and </s> tokens above all) treated apart: their few
# largest entries kept aside exact (as well as int16 rows, at int8's speed).

SMOOTHING = {"qkv": 0.8, "o": 0.8, "up": 0.8}  # SmoothQuant alpha per projection
SPIKY_ROW_RATIO = 20.0  # a row whose max |x| exceeds this many times its RMS is spiky (spiky_rows)


def projection(name: str) -> str:
    """"qkv", "o", "up" or "down" for a linear layer's name in the network (encoder.layer.3.intermediate.dense)."""
    parts = name.split(".")
    if parts[-1] in ("qkv", "o"):
        return parts[-1]
    return {"intermediate": "up", "output": "down"}.get(parts[-2] if len(parts) > 1 else "", "other")


def recipe_layer(weight: torch.Tensor, bias: torch.Tensor | None, activation: str, name: str, kernel: str,
                 input_absmax: torch.Tensor | None, large_kernel: str | None = None) -> X86Int8Linear:
    """The int8 layer for the projection `name` on kernel `kernel` (and `large_kernel`, of the same activation
    form, for batches over MAX_SMALL_ROWS rows, where it takes the layer's groups): smoothed and routed when the
    kernel takes int8 activations (which needs the input's per-channel max |x|), plain otherwise (int16, bf16 and
    fp32 activations need no outlier treatment)."""
    large = kernel
    if large_kernel is not None and group_size(weight.shape[1]) % KERNEL_GROUP_STEP.get(large_kernel, 1) == 0:
        large = large_kernel
    if KERNELS[kernel].activations != "int8":
        return X86Int8Linear(weight, bias, activation, small=kernel, large=large)
    alpha = SMOOTHING.get(projection(name))
    if alpha is not None and input_absmax is None:
        raise ValueError(f"{name}: W8A8 needs its input's calibrated ranges (encode/calibration.py)")
    smooth = None if alpha is None else smoothing_factors(input_absmax, weight, alpha)
    return X86Int8Linear(weight, bias, activation, smooth=smooth, small=kernel, large=large,
                         route=SPIKY_ROW_RATIO)
