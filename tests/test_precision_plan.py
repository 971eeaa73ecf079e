"""Precision plans from capabilities passed in: what "auto" picks on each kind of hardware, and the errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from allmpnet import Encoder
from allmpnet.encode.precision import Capabilities, check_precision_name, limit_isa, plan_precision

ONEDNN = frozenset({"fp32", "bf16"})
AMX = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), ONEDNN, amx_kernels="")
ZEN4 = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), ONEDNN,
                    amx_kernels="this CPU has no AMX bf16 units")
AVX2 = Capabilities("cpu", frozenset({"avx2", "fma"}), amx_kernels="this CPU has no AMX bf16 units")
GPU_BF16 = Capabilities("cuda", cuda_bf16=True)
GPU_OLD = Capabilities("cuda", cuda_bf16=False)


@pytest.mark.parametrize("caps,device,name,linear,small", [
    (AMX, "cpu", "bf16+int8", "onednn", "int8-amx"),
    (ZEN4, "cpu", "bf16", "onednn", None),
    (AVX2, "cpu", "fp32", "torch", None),
    (dataclasses.replace(AVX2, onednn_dtypes=frozenset({"fp32"})), "cpu", "fp32", "onednn", None),
    (GPU_BF16, "cuda", "bf16", "torch", None),
    (GPU_OLD, "cuda", "fp16", "torch", None),
])
def test_auto_picks_by_hardware(caps, device, name, linear, small):
    plan = plan_precision("auto", device, caps)
    assert (plan.name, plan.linear, plan.small_linear) == (name, linear, small)
    assert plan.requested == "auto" and plan.reason  # it says why
    assert plan.attention == ("grouped" if device == "cpu" else "padded")
    assert plan.bucket_rows == (device == "cpu")


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


@pytest.mark.parametrize("caps,device,match", [(ZEN4, "cpu", "no AMX"), (GPU_BF16, "cuda", "CPUs only")])
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


def test_detected_capabilities_plan_without_error():
    caps = Capabilities.detect("cpu")
    assert caps.device_type == "cpu"
    plan = plan_precision("auto", "cpu")
    assert plan.name in ("fp32", "bf16", "bf16+int8")
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
    assert plan_precision("auto", "cpu", capped).name == "fp32"  # no native bf16 below AVX512-BF16
