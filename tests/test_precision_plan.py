"""Precision plans from capabilities passed in: what "auto" picks on each kind of hardware, and the errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from allmpnet import Encoder
from allmpnet.encode.precision import Capabilities, check_precision_name, limit_isa, plan_precision

ONEDNN = frozenset({"fp32", "bf16"})
AMX = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), ONEDNN, amx_kernels="")
ZEN4_KERNELS = frozenset({"vnni-a8", "vnni-a16", "avx512-bf16", "avx512-a16", "avx512-f32", "avx2-a16", "avx2-f32"})
ZEN4 = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), ONEDNN,
                    amx_kernels="this CPU has no AMX bf16 units", x86_kernels=ZEN4_KERNELS)
ZEN4_NO_KERNELS = dataclasses.replace(ZEN4, x86_kernels=frozenset())  # e.g. no C compiler
SKYLAKE = Capabilities("cpu", frozenset({"avx2", "avx512f"}), ONEDNN, amx_kernels="this CPU has no AMX bf16 units",
                       x86_kernels=frozenset({"avx512-a16", "avx512-f32", "avx2-a16", "avx2-f32"}))
AVX2 = Capabilities("cpu", frozenset({"avx2", "fma"}), amx_kernels="this CPU has no AMX bf16 units",
                    x86_kernels=frozenset({"avx2-a16", "avx2-f32"}))
AVX2_NO_KERNELS = dataclasses.replace(AVX2, x86_kernels=frozenset())
# AVX2 with AVX-VNNI (Alder Lake, Sierra Forest): W8A8 on 256-bit vpdpbusd, fp32 between the layers
ALDER_LAKE = Capabilities("cpu", frozenset({"avx2", "fma", "avx_vnni"}), ONEDNN,
                          amx_kernels="this CPU has no AMX bf16 units",
                          x86_kernels=frozenset({"avxvnni-a8", "avx2-a16", "avx2-f32"}))
# AMX with our VNNI and AMX-int8 kernels (Sapphire Rapids on): W8A8, AMX tiles for large batches
SAPPHIRE_RAPIDS = dataclasses.replace(
    AMX, cpu_flags=AMX.cpu_flags | {"avx512_vnni", "amx_int8"}, x86_kernels=ZEN4_KERNELS | {"amx-a8"},
    fp32_fused_kernel="avx512-f32w", x86_attention=True)
GPU_BF16 = Capabilities("cuda", cuda_bf16=True)
GPU_OLD = Capabilities("cuda", cuda_bf16=False)


@pytest.mark.parametrize("caps,device,name,linear,small,kernel", [
    (AMX, "cpu", "bf16+int8", "onednn", "int8-amx", None),
    (SAPPHIRE_RAPIDS, "cpu", "int8", "int8-x86", None, "vnni-a8"),
    (ZEN4, "cpu", "int8", "int8-x86", None, "vnni-a8"),
    (ZEN4_NO_KERNELS, "cpu", "bf16", "onednn", None, None),
    (SKYLAKE, "cpu", "int8", "int8-x86", None, "avx512-a16"),
    (AVX2, "cpu", "int8", "int8-x86", None, "avx2-a16"),
    (ALDER_LAKE, "cpu", "int8", "int8-x86", None, "avxvnni-a8"),
    (AVX2_NO_KERNELS, "cpu", "fp32", "torch", None, None),
    (dataclasses.replace(AVX2_NO_KERNELS, onednn_dtypes=frozenset({"fp32"})), "cpu", "fp32", "onednn", None, None),
    (GPU_BF16, "cuda", "bf16", "torch", None, None),
    (GPU_OLD, "cuda", "fp16", "torch", None, None),
])
def test_auto_picks_by_hardware(caps, device, name, linear, small, kernel):
    plan = plan_precision("auto", device, caps)
    assert (plan.name, plan.linear, plan.small_linear, plan.int8_kernel) == (name, linear, small, kernel)
    assert plan.requested == "auto" and plan.reason  # it says why
    assert plan.attention == ("grouped" if device == "cpu" else "padded")
    assert plan.bucket_rows == (device == "cpu" and linear != "int8-x86")  # our kernels need no shape buckets
    # auto's own int8 kernels are checked against fp32 when first built, with somewhere to fall back to
    amx = not caps.amx_kernels
    assert plan.guard_fallback == (None if kernel is None else "bf16+int8" if amx else "bf16" if caps.native_bf16
                                   else "fp32")


def test_amx_int8_takes_large_batches_and_vnni_the_small_ones():
    plan = plan_precision("auto", "cpu", SAPPHIRE_RAPIDS)
    assert (plan.int8_kernel, plan.int8_large_kernel, plan.dtype) == ("vnni-a8", "amx-a8", torch.bfloat16)
    assert plan.fused_stack_tokens is None  # every batch in one call: vnni-a8 for a query, the tiles for large ones
    assert plan.short_attention_kernel and plan.block_attention_kernel  # ours on the tiles beats SDPA's bf16
    assert "AMX-int8" in plan.reason and "amx-a8 for large" in plan.describe()
    # without the AMX-int8 kernel (an older compiler, a kernel that refused the tiles) "int8" stays weight-only
    older = dataclasses.replace(SAPPHIRE_RAPIDS, x86_kernels=ZEN4_KERNELS)
    assert plan_precision("auto", "cpu", older).name == "bf16+int8"
    assert (plan_precision("int8", "cpu", older).linear, plan_precision("int8", "cpu", older).int8_large_kernel) == (
        "int8-amx", None)
    # bf16+int8 keeps its weight-only small batches on AMX either way
    assert plan_precision("bf16+int8", "cpu", SAPPHIRE_RAPIDS).small_linear == "int8-amx"


def test_int8_x86_activations_are_bf16_where_native_or_read_by_our_attention():
    assert plan_precision("int8", "cpu", ZEN4).dtype == torch.bfloat16
    # AVX512 without native bf16 (Skylake-SP, Cascade Lake): stored in bf16, widened by our kernels
    assert plan_precision("int8", "cpu", dataclasses.replace(SKYLAKE, x86_attention=True)).dtype == torch.bfloat16
    assert plan_precision("int8", "cpu", SKYLAKE).dtype == torch.float32  # no attention kernel: torch's in fp32
    assert plan_precision("int8", "cpu", ALDER_LAKE).dtype == torch.float32
    assert "AVX-VNNI" in plan_precision("auto", "cpu", ALDER_LAKE).reason
    assert plan_precision("int8", "cpu", AVX2).dtype == torch.float32  # emulated bf16 would cost more than it saves
    assert plan_precision("int8", "cpu", ZEN4).guard_fallback is None  # asked for by name: run as asked


def test_explicit_requests_are_planned_as_asked():
    fp32 = plan_precision("fp32", "cpu", AMX)
    assert fp32.exact and fp32.linear == "onednn" and not fp32.runs_the_model_itself  # prepacked fp32 copy
    assert plan_precision("fp32", "cpu", AVX2).runs_the_model_itself  # no oneDNN layers: the model as it is
    assert plan_precision("fp32", "cuda", GPU_BF16).runs_the_model_itself
    assert not plan_precision("bf16", "cpu", AMX).exact
    int8 = plan_precision("int8", "cpu", AMX)
    assert (int8.linear, int8.small_linear, int8.dtype) == ("int8-amx", None, torch.bfloat16)
    mixed = plan_precision("bf16+int8", "cpu", AMX)
    assert (mixed.small_linear, mixed.small_batch_tokens) == ("int8-amx", 512)
    assert plan_precision("bf16", "cpu", AMX).short_attention_kernel  # where our kernels run
    assert not plan_precision("bf16", "cpu", ZEN4).short_attention_kernel
    assert plan_precision("bf16", "cpu", AVX2).linear == "torch"  # no oneDNN bf16 linear: plain cast
    zen4 = plan_precision("bf16+int8", "cpu", ZEN4)
    assert (zen4.linear, zen4.small_linear, zen4.int8_kernel) == ("onednn", "int8-x86", "vnni-a8")


@pytest.mark.parametrize("caps,device,match", [(ZEN4_NO_KERNELS, "cpu", "no int8 kernel runs on this CPU"),
                                               (GPU_BF16, "cuda", "CPUs only")])
def test_unavailable_requests_say_why(caps, device, match):
    for name in ("int8", "bf16+int8"):
        with pytest.raises(ValueError, match=match):
            plan_precision(name, device, caps)


def test_unknown_names_are_refused_in_one_place():
    for bad in ("int4", "FP32", ""):
        with pytest.raises(ValueError, match="precision must be"):
            plan_precision(bad, "cpu", AMX)
        with pytest.raises(ValueError, match="precision must be"):
            check_precision_name(bad)
    assert check_precision_name("auto") == "auto"


def test_describe_names_every_choice():
    text = plan_precision("auto", "cpu", AMX).describe()
    assert "bf16+int8" in text and "int8-amx up to 512 tokens" in text and "onednn" in text and "AMX" in text
    text = plan_precision("auto", "cpu", ZEN4).describe()
    assert "vnni-a8: W8A8" in text and "VNNI" in text and "bfloat16 activations" in text
    assert "avx2-a16: int16 activations" in plan_precision("auto", "cpu", AVX2).describe()


def test_detected_capabilities_plan_without_error():
    caps = Capabilities.detect("cpu")
    assert caps.device_type == "cpu"
    plan = plan_precision("auto", "cpu")
    assert plan.name in ("fp32", "bf16", "int8", "bf16+int8")
    assert plan.name != "fp32" or not caps.native_bf16


def test_encoder_takes_a_plan_and_reports_it(tiny_model_dir):
    plan = plan_precision("bf16", "cpu")
    enc = Encoder(tiny_model_dir, device="cpu", precision=plan)
    assert enc.plan is plan and enc.precision == "bf16"
    exact = enc.with_precision("fp32")
    assert exact.plan.exact and exact.model is enc.model and exact.tokenizer is enc.tokenizer
    with pytest.raises(ValueError, match="precision"):
        Encoder(tiny_model_dir, device="cpu", precision="int4")


def test_isa_limit_hides_the_higher_levels_flags():
    flags = frozenset({"sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16",
                       "amx_tile", "amx_bf16"})
    assert limit_isa(flags, "avx2") == {"sse4_2", "avx2", "fma"}
    assert limit_isa(flags, "AVX512_CORE_VNNI") == flags - {"avx512_bf16", "amx_tile", "amx_bf16"}
    assert limit_isa(flags, "avx512_core_bf16") == flags - {"amx_tile", "amx_bf16"}
    assert limit_isa(flags, None) == flags and limit_isa(flags, "unknown") == flags
    capped = Capabilities("cpu", limit_isa(flags, "avx2"), amx_kernels="capped")
    assert plan_precision("auto", "cpu", capped).name == "fp32"  # no native bf16 below AVX512-BF16, no kernels


def test_isa_limit_reaches_our_kernels():
    """ALLMPNET_MAX_ISA / ONEDNN_MAX_CPU_ISA=avx2 leaves only the AVX2 kernels, whatever this CPU has."""
    from allmpnet.backends.cpu.int8 import KERNELS, kernel_unavailable
    from allmpnet.backends.cpu.library import cpu_flags
    capped = limit_isa(frozenset(cpu_flags()), "avx2")
    runnable = {name for name in KERNELS if not kernel_unavailable(name, capped)}
    assert runnable <= {"avx2-a16", "avx2-f32"}
    caps = Capabilities("cpu", capped, ONEDNN, amx_kernels="capped", x86_kernels=frozenset(runnable))
    plan = plan_precision("auto", "cpu", caps)
    assert plan.name == ("int8" if "avx2-a16" in runnable else "fp32")


def test_training_plans_stay_in_float():
    from allmpnet.encode.precision import plan_training_precision
    assert plan_training_precision("auto", "cpu", ZEN4).name == "bf16"  # not auto's int8: training needs floats
    assert plan_training_precision("auto", "cpu", AVX2).name == "fp32"
    assert plan_training_precision("auto", "cuda", GPU_OLD).name == "fp16"
    assert plan_training_precision("fp32", "cpu", ZEN4).exact
    for name in ("int8", "bf16+int8"):
        with pytest.raises(ValueError, match="inference only"):
            plan_training_precision(name, "cpu", ZEN4)


def test_small_batches_run_the_fused_stack_where_a_kernel_does():
    zen4 = dataclasses.replace(ZEN4, fp32_fused_kernel="avx512-f32w")
    fp32 = plan_precision("fp32", "cpu", zen4)
    assert (fp32.fused_stack_tokens, fp32.fused_fp32_kernel) == (64, "avx512-f32w") and fp32.exact
    assert "one call (avx512-f32w) up to 64 tokens" in fp32.describe()
    int8 = plan_precision("auto", "cpu", zen4)
    assert (int8.linear, int8.fused_stack_tokens, int8.fused_fp32_kernel) == ("int8-x86", None, None)
    assert plan_precision("bf16", "cpu", zen4).fused_stack_tokens == 0  # oneDNN's bf16 layers: no fused form
    assert plan_precision("fp32", "cpu", ZEN4).fused_stack_tokens == 0  # no fp32-weight kernel runs there
    assert plan_precision("bf16+int8", "cpu", dataclasses.replace(AMX, fp32_fused_kernel="avx512-f32w")
                          ).fused_stack_tokens == 0
    assert plan_precision("fp32", "cuda", GPU_BF16).fused_stack_tokens == 0
