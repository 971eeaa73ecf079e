"""Precision plans: the one place a precision name ("auto", "bf16", "int8" …) is decoded.

`plan_precision(request, device)` turns the request, the device and what the hardware can do (`Capabilities`,
detected once, or passed in by tests) into a small frozen `PrecisionPlan`: the compute dtype, which linear
layers run large and small batches, how attention runs, and why. The encoder builds its inference copy from it,
the trainer takes its autocast dtype from it, and `allmpnet info` prints it.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field, replace

import torch

from allmpnet.backends.cpu.amx import kernels_unavailable
from allmpnet.backends.cpu.attention import attention_unavailable
from allmpnet.backends.cpu.fused import pick_fp32_kernel
from allmpnet.backends.cpu.int8 import KERNELS as X86_KERNELS, PREFERENCE as X86_PREFERENCE
from allmpnet.backends.cpu.int8 import kernel_unavailable as x86_kernel_unavailable
from allmpnet.backends.cpu.layer_norm import layer_norm_unavailable
from allmpnet.backends.cpu.library import cpu_flags, library_unavailable
from allmpnet.errors import InvalidInput, PrecisionUnavailable

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "bf16+int8")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# batches of at most this many packed tokens use int8 weights in "bf16+int8": they are memory-bound and int8
# weights are half the bytes (2 AMX cores: ~4 vs ~9 ms for a query's 48 projections, still 20% faster at 512
# rows); oneDNN's bf16 wins from ~1k rows, where the maths dominates
INT8_SMALL_BATCH_TOKENS = 512
# fp32: batches of at most this many tokens (a query, a few) run all layers in one call on the fp32 weights
# (backends/cpu/fused.py): a 9-token query spent ~3 ms in Python and per-call overhead around ~5 ms of kernels, 2 Zen
# 4 cores. int8-x86 plans run every batch there (batch-invariant vectors).
FUSED_STACK_TOKENS = 64

# linear layer kinds (encode/inference.py builds them):
#   "torch"     F.linear in the plan's dtype
#   "onednn"    oneDNN's prepacked linear (fp32 or bf16), bias/GELU/residual fused (CPU)
#   "int8-amx"  our int8-weight kernel on AMX tiles (CPU with AMX)
#   "int8-x86"  our int8-weight kernels for x86 CPUs (plan.int8_kernel names which: backends/cpu/int8.py KERNELS; on AMX
#               plan.int8_large_kernel takes the large batches)
# the int8-x86 kernels in the order "int8" prefers them: W8A8 on VNNI (calibrated, twice bf16's rate), else int16
# activations (weight-only int8 quality; vpmaddwd runs at twice the fp32 FMA rate, AVX2 included)
X86_INT8_KERNELS = tuple(X86_PREFERENCE["int8"] + X86_PREFERENCE["int16"])
# where it runs, "int8" gives the layers' large batches (over int8.MAX_SMALL_ROWS rows) to AMX-int8's tiles:
# the same W8A8 sums as vnni-a8's, which keeps the small ones (a query streams its weights better there)
AMX_INT8_KERNEL = "amx-a8"


@dataclass(frozen=True)
class Capabilities:
    """What the device can run, as plain values (tests construct them to plan for hardware they lack)."""
    device_type: str
    cpu_flags: frozenset[str] = frozenset()
    onednn_dtypes: frozenset[str] = frozenset()  # dtypes ("fp32", "bf16") oneDNN's prepacked linear runs in here
    amx_kernels: str = "not checked"  # "" when our AMX kernels compiled and passed their self-test; else why not
    cuda_bf16: bool = False
    x86_kernels: frozenset[str] = frozenset()  # x86 int8 kernels that loaded and passed their self-test here
    fp32_fused_kernel: str | None = None  # the fused stack's fp32-weight kernel that runs here (backends/cpu/fused.py)
    x86_attention: bool = False  # our x86 attention kernel runs here (backends/cpu/attention.py)
    x86_layer_norm: bool = False  # our bf16 LayerNorm kernel runs here (backends/cpu/layer_norm.py)

    @property
    def native_bf16(self) -> bool:
        if self.device_type == "cuda":
            return self.cuda_bf16
        return self.device_type == "cpu" and bool({"amx_bf16", "avx512_bf16"} & self.cpu_flags)

    @classmethod
    def detect(cls, device: torch.device | str, precision: str | None = None) -> "Capabilities":
        """This machine's capabilities, as far as `precision` needs them (None or "auto": all): an fp32 or bf16
        plan neither loads nor self-tests the int8 kernels it will not use."""
        return _detect(torch.device(device).type, DETECTION_SCOPES.get(precision or "auto", "all"))


# instruction-set levels, each adding CPU flags to the ones below it (oneDNN's names, lower-cased)
ISA_LEVELS = {
    "avx2": {"avx", "avx2", "fma", "f16c"},
    "avx2_vnni": {"avx_vnni"},
    "avx512_core": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
    "avx512_core_vnni": {"avx512_vnni"},
    "avx512_core_bf16": {"avx512_bf16"},
    "avx512_core_amx": {"amx_tile", "amx_bf16", "amx_int8"},
}


def limit_isa(flags: frozenset[str], max_isa: str | None) -> frozenset[str]:
    """The flags a CPU capped at `max_isa` (e.g. "avx2", "AVX512_CORE_VNNI") shows: the higher levels' removed.
    None or an unknown name leaves them all."""
    names = list(ISA_LEVELS)
    level = (max_isa or "").lower()
    if level not in names:
        return flags
    higher = names[names.index(level) + 1:]
    above = set().union(*(ISA_LEVELS[n] for n in higher))
    families = tuple(prefix for prefix, first in (("avx512", "avx512_core"), ("amx", "avx512_core_amx"))
                     if first in higher)  # AVX-512's and AMX's other extensions go with their level
    return frozenset(f for f in flags if f not in above and not f.startswith(families))


def max_isa_from_env() -> str | None:
    """ALLMPNET_MAX_ISA, else oneDNN's own ONEDNN_MAX_CPU_ISA: a user limiting one limits both."""
    return os.environ.get("ALLMPNET_MAX_ISA") or os.environ.get("ONEDNN_MAX_CPU_ISA")


# what each precision's plan reads of the capabilities: "flags" (the CPU's flags, oneDNN), "fp32" (+ the fused fp32
# kernel), "bf16" (+ our attention, LayerNorm and AMX kernels), "all" (+ the int8 kernels)
DETECTION_SCOPES = {"fp32": "fp32", "fp16": "flags", "bf16": "bf16", "int8": "all", "bf16+int8": "all",
                    "auto": "all", "training": "flags"}


@functools.lru_cache(maxsize=None)
def _detect(device_type: str, scope: str = "all") -> Capabilities:
    if device_type == "cuda":
        return Capabilities("cuda", cuda_bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return Capabilities(device_type)
    flags = limit_isa(frozenset(cpu_flags()), max_isa_from_env())
    onednn = frozenset(name for name in ("fp32", "bf16") if onednn_linear_available(COMPUTE_DTYPES[name]))
    caps = Capabilities("cpu", flags, onednn)
    if scope in ("fp32", "all"):
        caps = replace(caps, fp32_fused_kernel=pick_fp32_kernel(flags))
    if scope in ("bf16", "all"):
        amx = kernels_unavailable() if {"amx_tile", "amx_bf16"} <= flags else "this CPU has no AMX bf16 units"
        caps = replace(caps, amx_kernels=amx, x86_attention=not attention_unavailable(flags),
                       x86_layer_norm=not layer_norm_unavailable(flags))
    if scope == "all":  # only the kernels a plan can name: each one checked here is loaded and self-tested
        caps = replace(caps, x86_kernels=frozenset(name for name in X86_INT8_KERNELS + (AMX_INT8_KERNEL,)
                                                   if not x86_kernel_unavailable(name, flags)))
    return caps


def onednn_linear_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True where this torch build has oneDNN's prepacked linear op and it runs on this CPU in `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=dtype), 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype), w, None, "none", [], "")
        return bool(torch.allclose(y.float(), torch.full((2, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


@dataclass(frozen=True)
class PrecisionPlan:
    name: str  # the resolved precision: one of PRECISIONS
    dtype: torch.dtype  # activations, and weights except where a linear kind stores its own
    linear: str  # linear layers of large batches (kinds above)
    small_linear: str | None = None  # linear layers of batches of at most small_batch_tokens packed tokens
    small_batch_tokens: int = 0
    attention: str = "grouped"  # "grouped" (CPU: SDPA per equal-length group) or "padded" (GPU: one call)
    short_attention_kernel: bool = False  # texts of <= 32 tokens through our AMX kernel
    # every group of texts up to 512 tokens through our x86 kernel, with these products (backends/cpu/attention.py's
    # PRODUCTS: "amx", "bf16" or "fp32", as far as the CPU goes); None: SDPA
    block_attention_kernel: str | None = None
    layer_norm_kernel: bool = False  # bf16 LayerNorms through our x86 kernel (backends/cpu/layer_norm.py)
    bucket_rows: bool = False  # round packed rows up to few shapes (oneDNN caches a kernel per shape; ours do not)
    int8_kernel: str | None = None  # the x86 int8 kernel of "int8-x86" linears (backends/cpu/int8.py)
    int8_large_kernel: str | None = None  # theirs for large batches, when another (AMX_INT8_KERNEL)
    # batches of at most this many tokens run the whole forward pass in one C call (backends/cpu/fused.py): int8-x86
    # plans every batch (None), fp32 with fused_fp32_kernel the small ones on the model's own weights; 0: never
    fused_stack_tokens: int | None = 0
    fused_fp32_kernel: str | None = None
    guard_fallback: str | None = None  # auto's int8-x86: checked against fp32 on the calibration texts on first
    #                                    use (encode/calibration.py); below guard_min_cosine, this precision instead
    guard_min_cosine: float = 0.99  # the project's quality contract, per vector
    requested: str = ""
    reason: str = field(default="as requested", compare=False)

    @property
    def exact(self) -> bool:
        """fp32 arithmetic throughout: the vectors of sentence-transformers (within 1e-5)."""
        return self.dtype == torch.float32 and self.linear in ("torch", "onednn") and self.small_linear is None

    @property
    def runs_the_model_itself(self) -> bool:
        """No inference copy: fp32 with torch's linears runs the (fp32 master) model as it is."""
        return self.dtype == torch.float32 and self.linear == "torch" and self.small_linear is None

    def describe(self) -> str:
        def kind(name: str) -> str:
            if name != "int8-x86" or self.int8_kernel is None:
                return name
            form = X86_KERNELS[self.int8_kernel].activations
            how = ("W8A8, SmoothQuant-calibrated, spiky rows' largest entries kept aside" if form == "int8"
                   else f"{form} activations")
            kernels = self.int8_kernel + (f" for small batches, {self.int8_large_kernel} for large"
                                          if self.int8_large_kernel else "")
            return f"{name} ({kernels}: {how})"
        linear = kind(self.linear) if self.small_linear is None else (
            f"{kind(self.small_linear)} up to {self.small_batch_tokens} tokens, {kind(self.linear)} above")
        attention = self.attention + (", our kernel for a lone short block" if self.short_attention_kernel else "")
        if self.block_attention_kernel:
            attention += f", our x86 kernel ({self.block_attention_kernel} products) for blocks up to 512 tokens"
        if self.fused_stack_tokens is None:
            attention += "; every batch's whole forward pass in one call (a text's vector the same in any batch)"
        elif self.fused_stack_tokens:
            weights = f" ({self.fused_fp32_kernel})" if self.fused_fp32_kernel else ""
            attention += f"; the whole layer stack in one call{weights} up to {self.fused_stack_tokens} tokens"
        why = f" ({self.reason})" if self.reason else ""
        norm = "; LayerNorm our x86 kernel" if self.layer_norm_kernel else ""
        apart = "" if self.exact else "; a text holding special tokens inside (a \"<s>\" it wrote) runs in fp32"
        return (f"{self.name}{why}: {str(self.dtype).removeprefix('torch.')} activations; linear {linear}; "
                f"attention {attention}{norm}{apart}")


def attention_products(caps: Capabilities) -> str:
    """The most our x86 attention kernel may use for bf16 blocks on this CPU (the flags a limited ISA leaves)."""
    if {"amx_tile", "amx_bf16"} <= caps.cpu_flags:
        return "amx"
    return "bf16" if "avx512_bf16" in caps.cpu_flags else "fp32"


def check_precision_name(request: str) -> str:
    """`request` if it names a precision (whether this machine can run it is for plan_precision to say)."""
    if request != "auto" and request not in PRECISIONS:
        raise InvalidInput(f"precision must be 'auto' or one of {list(PRECISIONS)}, got {request!r}")
    return request


def plan_precision(request: str, device: torch.device | str, capabilities: Capabilities | None = None
                   ) -> PrecisionPlan:
    """The plan for `request` ("auto" or one of PRECISIONS) on `device`.

    "auto" picks the fastest path this hardware has whose quality passes the project's contract (min cosine to
    fp32 >= 0.99, STSBenchmark within 0.1): on CPUs with AMX-int8 W8A8 int8 (AMX tiles for large batches, VNNI
    for small ones; bf16 + int8 weights for small batches where our AMX-int8 kernel does not run); with
    AVX512-VNNI or AVX-VNNI W8A8 int8 (our kernels); with native bf16 bf16; with AVX2 int8 weights and int16
    activations; on GPUs bf16 (fp16 where bf16 is not native); else fp32. Its int8-x86 plans carry
    `guard_fallback`: the encoder checks them against fp32 on first use and falls back below the contract. A
    request the hardware cannot run raises ValueError saying why; "auto" never does.
    """
    device = torch.device(device)
    caps = capabilities or Capabilities.detect(device, request)
    if request == "auto":
        lost = library_unavailable() if capabilities is None and device.type == "cpu" else ""
        name, reason = _choose(caps, lost)
    else:
        name, reason = check_precision_name(request), "as requested"
        why_not = _unavailable(name, caps)
        if why_not:
            raise PrecisionUnavailable(f"precision {name!r} is not available here: {why_not}")
    return _build(name, caps, request, reason)


def plan_training_precision(request: str, device: torch.device | str, capabilities: Capabilities | None = None
                            ) -> PrecisionPlan:
    """The plan a trainer autocasts by: int8 paths are for inference only, so "auto" means the fastest float
    precision here (bf16 where native, fp16 on older GPUs, else fp32)."""
    if request in ("int8", "bf16+int8"):
        raise InvalidInput(f"precision {request!r} is for inference only: train in fp32, bf16 or auto")
    device = torch.device(device)
    if request != "auto":
        return plan_precision(request, device, capabilities)
    caps = capabilities or Capabilities.detect(device, "training")
    name = ("bf16" if caps.native_bf16 else "fp16" if caps.device_type == "cuda" else "fp32")
    return _build(name, capabilities or Capabilities.detect(device, name), "auto",
                  "training: the fastest float precision here")


def x86_int8_kernel(caps: Capabilities) -> str | None:
    """The x86 int8 kernel "int8" runs on this CPU (None: none runs here)."""
    return next((name for name in X86_INT8_KERNELS if name in caps.x86_kernels), None)


def _choose(caps: Capabilities, lost: str = "") -> tuple[str, str]:
    """auto's precision for these capabilities, and why; `lost`: why this machine has no library of our kernels
    ("" where it has one, or where the capabilities were given)."""
    if caps.device_type == "cuda":
        return ("bf16", "GPU computes bf16 natively") if caps.cuda_bf16 else ("fp16", "GPU without native bf16")
    if caps.device_type != "cpu":
        return "fp32", f"no faster path tested on {caps.device_type}"
    kernel = x86_int8_kernel(caps)
    if lost and "avx2" in caps.cpu_flags:  # this machine could run our kernels but has no library of them
        name, reason = _choose_without_kernels(caps)
        warn_unavailable(lost)
        return name, f"without allmpnet's CPU kernels ({lost}); {reason}"
    if not caps.amx_kernels:
        if _amx_int8(caps):
            return "int8", "AMX-int8: W8A8 on the tiles, twice the rate of bf16"
        return "bf16+int8", "AMX: bf16, int8 weights for small batches"

    if kernel is not None and X86_KERNELS[kernel].activations == "int8":
        vnni = "AVX-VNNI" if kernel == "avxvnni-a8" else "AVX512-VNNI"
        return "int8", f"{vnni}: W8A8, int8 products at twice the rate of bf16 or int16 ones"
    if caps.native_bf16:
        return "bf16", "native bf16 (" + ("AMX" if "amx_bf16" in caps.cpu_flags else "AVX512-BF16") + ")"
    if kernel is not None:
        return "int8", "no native bf16 or VNNI: int8 weights with int16 activations beat fp32"
    return "fp32", "this CPU has no native bf16 (AMX or AVX512-BF16) and none of our int8 kernels runs here"


def _choose_without_kernels(caps: Capabilities) -> tuple[str, str]:
    if caps.native_bf16:
        return "bf16", "native bf16 through oneDNN"
    return "fp32", "this CPU has no native bf16 (AMX or AVX512-BF16)"


@functools.lru_cache(maxsize=None)
def warn_unavailable(why: str) -> None:
    """Once per process: what auto loses on a machine without our kernels' library, and how to get it."""
    warnings.warn(f"precision 'auto' runs without allmpnet's CPU kernels here ({why}): no int8 path, several times "
                  "slower than with them. Install allmpnet from a wheel (`pip install allmpnet-*.whl`, which carries "
                  "them built) or put a C/C++ compiler on PATH (CC, CXX) so they are built on first use; "
                  "`allmpnet info --precision auto` shows the plan", RuntimeWarning, stacklevel=4)


def _amx_int8(caps: Capabilities) -> bool:
    """AMX CPUs where our W8A8 runs: vnni-a8 for small batches, the AMX-int8 kernel for large ones."""
    return not caps.amx_kernels and {"vnni-a8", AMX_INT8_KERNEL} <= caps.x86_kernels


def _unavailable(name: str, caps: Capabilities) -> str:
    """Why precision `name` cannot run with these capabilities ("" when it can)."""
    if name in ("int8", "bf16+int8"):
        if caps.device_type != "cpu":
            return "int8 weights run on CPUs only"
        if caps.amx_kernels and x86_int8_kernel(caps) is None:
            return (f"no int8 kernel runs on this CPU (AMX: {caps.amx_kernels}; the others need AVX2 at least: "
                    f"{x86_kernel_unavailable('avx2-a16', caps.cpu_flags) or 'their library did not build'})")
    return ""  # fp16 and bf16 run everywhere (slowly where emulated); kept for comparisons


def _build(name: str, caps: Capabilities, requested: str, reason: str) -> PrecisionPlan:
    cpu = caps.device_type == "cpu"
    amx = cpu and not caps.amx_kernels
    if name == "int8" and not amx:
        # activations stored in bf16 where the CPU computes it natively, or where our attention kernel (AVX512)
        # reads it, widening to fp32 (Zen 4 held to AVX512_CORE_VNNI: passages -18%, sentences -8% against fp32
        # activations); with AVX2 alone torch's attention would compute in emulated bf16
        compute = "bf16" if caps.native_bf16 or caps.x86_attention else "fp32"
    else:
        compute = name if name in ("fp32", "fp16") else "bf16"
    dtype = COMPUTE_DTYPES[compute]
    # oneDNN's prepacked layers in fp32 too: a query's few rows otherwise pay for re-packing every weight on
    # every call (fp32 F.linear at 16 rows streams ~2x slower than the prepacked layer)
    large = "onednn" if cpu and compute in caps.onednn_dtypes else "torch"
    small, small_tokens, kernel, large_kernel, fallback = None, 0, None, None, None
    # on AMX: "int8" is W8A8 where the AMX-int8 kernel runs, else int8 weights widened to bf16 on the tiles
    int8 = "int8-x86" if not amx or (name == "int8" and _amx_int8(caps)) else "int8-amx"
    if int8 == "int8-x86" and name in ("int8", "bf16+int8"):
        kernel = "vnni-a8" if amx else x86_int8_kernel(caps)
        large_kernel = AMX_INT8_KERNEL if amx else None
        if requested == "auto":
            fallback = "bf16+int8" if amx else "bf16" if caps.native_bf16 else "fp32"
    if name == "int8":
        large = int8
    elif name == "bf16+int8":
        small, small_tokens = int8, INT8_SMALL_BATCH_TOKENS
    # one C call for the whole stack on small batches: int8-x86 layers, or fp32 on the model's own weights
    fp32_fused = caps.fp32_fused_kernel if name == "fp32" and large == "onednn" and small is None else None
    fused_tokens = (None if large == "int8-x86" and small is None else FUSED_STACK_TOKENS if fp32_fused is not None
                    else 0)
    return PrecisionPlan(
        name=name, dtype=dtype, linear=large, small_linear=small, small_batch_tokens=small_tokens,
        attention="grouped" if cpu else "padded",
        short_attention_kernel=amx and dtype == torch.bfloat16,
        # bf16 activations: ours beats SDPA's bf16 without AMX and with it (on the tiles); fp32 keeps SDPA (exact,
        # and ours gains less)
        block_attention_kernel=attention_products(caps) if cpu and dtype == torch.bfloat16 and caps.x86_attention
        else None,
        layer_norm_kernel=cpu and dtype == torch.bfloat16 and caps.x86_layer_norm,
        bucket_rows=cpu and large != "int8-x86", int8_kernel=kernel, int8_large_kernel=large_kernel,
        fused_stack_tokens=fused_tokens, fused_fp32_kernel=fp32_fused,
        guard_fallback=fallback, requested=requested, reason=reason)
