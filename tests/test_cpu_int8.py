"""Our x86 int8 kernels (backends/cpu/int8.py, csrc/linear*): quantization and layout against plain torch, and every
kernel this CPU can run against the torch reference of its own maths, on small random shapes. A kernel whose
instructions this CPU lacks is skipped with the reason; one it has that fails to build or load is a failure."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allmpnet.backends.cpu import int8 as int8_x86
from allmpnet.backends.cpu.library import library_unavailable, load as load_library
from allmpnet.backends.cpu.int8 import (AVX2, KERNEL_GROUP_STEP, KERNELS, X86Int8Linear, compensation, group_size,
                                      kernel_unavailable, pack_groups, pack_weight, pick_kernel, quantize_rows,
                                      smoothing_factors)
from allmpnet.backends.cpu.amx import cpu_flags, quantize as quantize_weight
from conftest import int8_plan

CPU = frozenset(cpu_flags())


def needs(name: str):
    missing = sorted(KERNELS[name].flags - CPU)
    return pytest.mark.skipif(bool(missing), reason=f"this CPU lacks {', '.join(missing)} for {name}")


ALL_KERNELS = [pytest.param(name, marks=needs(name)) for name in KERNELS]


def skip_unless_group_fits(name: str, group: int) -> None:
    """The AMX kernel takes groups of whole tile rows only (the layer refuses others: see below)."""
    step = KERNEL_GROUP_STEP.get(name, 1)
    if group % step:
        pytest.skip(f"{name} takes groups of a multiple of {step} inputs")


# ---------------------------------------------------------------- quantization and layout (no kernel needed)


def test_weight_groups_round_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    weight[3, 5] = 40.0  # an outlier coarsens its own group only
    q, scale = quantize_weight(weight, 128)
    assert q.dtype == torch.int8 and scale.shape == (64, 2) and q.abs().max() == 127
    error = (q.float().view(64, 2, 128) * scale[..., None] - weight.view(64, 2, 128)).abs()
    assert (error <= scale[..., None] / 2 + 1e-6).all()
    assert scale[3, 0] > 10 * scale[3, 1]


def test_group_size_falls_back_to_what_divides_the_inputs():
    assert group_size(768) == 128 and group_size(3072) == 128
    assert group_size(96) == 32 and group_size(36) == 4 and group_size(768, 768) == 768
    with pytest.raises(ValueError, match="multiple of 4"):
        group_size(30)


def test_packed_layout_is_what_one_step_reads():
    # element (n, k) lands at [n // 64][k // 4][n % 64][k % 4]; outputs padded with zeros to 64
    N, K = 100, 12
    values = (torch.arange(N * K) % 251 - 125).to(torch.int8).view(N, K)
    packed = pack_weight(values)
    assert packed.shape == (2, 3, 64, 4)
    for n, k in [(0, 0), (1, 0), (0, 1), (63, 11), (64, 4), (99, 7), (17, 3)]:
        assert packed[n // 64, k // 4, n % 64, k % 4] == values[n, k]
    assert (packed[1, :, 36:] == 0).all()
    table = torch.arange(N * 3, dtype=torch.float32).view(N, 3)
    groups = pack_groups(table)
    assert groups.shape == (2, 3, 64) and groups[1, 2, 5] == table[69, 2] and (groups[1, :, 36:] == 0).all()


def test_compensation_cancels_the_unsigned_offset():
    # the kernel multiplies (q + 128) by w and scales each group's sum: adding -128 x sum over groups of scale x
    # sum(w), one float per output, leaves the scaled sums of q w (up to fp32 rounding of that float)
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    scale = torch.rand(8, 2) + 0.1
    q = torch.randint(-127, 128, (64,))
    comp = compensation(w, scale, 32)
    assert comp.shape == (8,) and comp.dtype == torch.float32
    groups = [slice(0, 32), slice(32, 64)]
    shifted = sum(scale[:, g].double() * ((q[p] + 128) * w[:, p].long()).sum(1) for g, p in enumerate(groups))
    exact = sum(scale[:, g].double() * (q[p] * w[:, p].long()).sum(1) for g, p in enumerate(groups))
    assert ((shifted + comp.double() - exact).abs() <= 1e-7 * shifted.abs()).all()
    assert not torch.allclose(shifted, exact)  # the offset is there to cancel


def test_rows_quantize_symmetrically_and_zero_rows_stay_zero():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x, 8)
    assert q[0].tolist() == [32.0, -127.0, 64.0] and scale[0, 0] == pytest.approx(2 / 127)
    assert q[1].abs().sum() == 0 and scale[1, 0] == 0 and torch.isfinite(q).all()


def test_smoothing_moves_range_without_changing_the_product():
    torch.manual_seed(2)
    weight, x = torch.randn(64, 128), torch.randn(5, 128)
    x[:, 7] *= 50  # an outlier channel
    absmax = x.abs().amax(0)
    s = smoothing_factors(absmax, weight, 0.5)
    assert s[7] > 3 * s.median()  # the outlier channel is scaled down the most
    assert torch.allclose((x / s) @ (weight * s).T, x @ weight.T, atol=1e-3, rtol=1e-4)
    smoothed = (x / s).abs().amax(0)
    assert smoothed.max() / smoothed.median() < absmax.max() / absmax.median()


def test_layer_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="activation"):
        X86Int8Linear(torch.randn(64, 64), None, activation="relu")
    with pytest.raises(ValueError, match="unknown kernel"):
        X86Int8Linear(torch.randn(64, 64), None, small="avx9000")
    with pytest.raises(ValueError, match="at most 512"):
        X86Int8Linear(torch.randn(64, 1024), None, group=1024, small="vnni-a16")
    X86Int8Linear(torch.randn(64, 1024), None, group=1024, small="vnni-a8", large="vnni-a8")  # one scale per row
    with pytest.raises(ValueError, match="multiple of 64"):  # an AMX tile row is 64 inputs of one group
        X86Int8Linear(torch.randn(64, 120), None, group=40, small="vnni-a8", large="amx-a8")


def test_dispatch_picks_only_kernels_the_given_capabilities_allow():
    assert pick_kernel("weight-only", frozenset()) is None
    assert kernel_unavailable("avx9000").startswith("unknown kernel")
    if AVX2 <= CPU and not kernel_unavailable("avx2-a16"):
        # an AVX-512 CPU told it has AVX2 only runs AVX2 code: how the AVX2 path is checked on this machine
        assert pick_kernel("weight-only", AVX2) == "avx2-a16"
        assert pick_kernel("fp32", AVX2) == "avx2-f32"
        assert pick_kernel("int8", AVX2) is None


def test_the_library_refuses_unknown_kernels_and_bad_groups():
    why = library_unavailable()
    if why:
        pytest.skip(why)
    library = load_library()
    args = [None, 0, None, None, None, None, 128, None, None, None, 0, 1, 64, 256, 0, 0.0, None, 1]
    assert library.allmpnet_x86_linear(99, *args) == -2
    name = pick_kernel("weight-only")
    if name is None:
        pytest.skip("no kernel runs here")
    bad_group = list(args)
    bad_group[6] = 100  # does not divide K = 256
    assert library.allmpnet_x86_linear(KERNELS[name].id, *bad_group) == -1


# ---------------------------------------------------------------- the kernels


def make_layer(name: str, N: int, K: int, activation: str, smooth: bool, group: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g)
    factors = torch.rand(K, generator=g) + 0.5 if smooth else None
    return X86Int8Linear(weight, bias, activation, group=group, smooth=factors, small=name, large=name), g


@pytest.mark.parametrize("name", ALL_KERNELS)
def test_kernel_builds_loads_and_passes_its_self_test(name):
    assert kernel_unavailable(name) == ""


@pytest.mark.parametrize("name", ALL_KERNELS)
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 10, 200])
@pytest.mark.parametrize("form", ["plain", "bias+gelu", "residual", "smooth"])
def test_kernel_matches_its_torch_reference_in_fp32(name, rows, form):
    layer, g = make_layer(name, 96, 256, "gelu" if form == "bias+gelu" else "none", smooth=form == "smooth")
    if form == "plain":
        layer.bias = None
    x = torch.randn(rows, 256, generator=g)
    residual = torch.randn(rows, 96, generator=g) if form == "residual" else None
    got = layer(x, residual)
    expected = layer.reference(x, residual, form=KERNELS[name].activations)
    assert got.shape == (rows, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", ALL_KERNELS)
@pytest.mark.parametrize("N,K,group", [(64, 128, 128), (200, 384, 128), (32, 36, 4)])
def test_kernel_handles_bf16_and_partial_output_blocks(name, N, K, group):
    skip_unless_group_fits(name, group)
    layer, g = make_layer(name, N, K, "gelu", smooth=True, group=group)
    x = torch.randn(9, K, generator=g).bfloat16()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (9, N)
    expected = layer.reference(x, form=KERNELS[name].activations)
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.02)
    residual = torch.randn(9, N, generator=g).bfloat16()
    layer.activation = "none"
    torch.testing.assert_close(layer(x, residual).float(), layer.reference(x, residual, KERNELS[name].activations)
                               .float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("name", ALL_KERNELS)
def test_each_row_depends_only_on_itself_and_not_on_threads(name):
    layer, g = make_layer(name, 128, 256, "none", smooth=False)
    x = torch.randn(20, 256, generator=g)
    together = layer(x)
    for i in (0, 6, 19):
        assert torch.equal(layer(x[i:i + 1])[0], together[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(layer(x), together)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ALL_KERNELS)
def test_nan_or_inf_in_a_row_stays_in_that_rows_outputs(name):
    # never silent: the int8 kernel once turned a NaN row into finite values (its scale came out as 1)
    layer, g = make_layer(name, 128, 256, "none", smooth=False)
    layer.route = 20.0 if KERNELS[name].activations == "int8" else 0.0
    x = torch.randn(20, 256, generator=g)
    clean = layer(x)
    x[3] = float("nan")
    x[7, 5], x[11, 200] = float("nan"), float("-inf")
    damaged = layer(x)
    bad = [3, 7, 11]
    assert not torch.isfinite(damaged[bad]).any(1).any()  # every output of those rows, not only some
    others = [i for i in range(20) if i not in bad]
    assert torch.equal(damaged[others], clean[others])


@pytest.mark.parametrize("name", ALL_KERNELS)
def test_int8_weights_stay_close_to_the_float_layer(name):
    # the whole point: int8 weights (and int8 or int16 activations) track the float layer
    layer, g = make_layer(name, 128, 512, "none", smooth=False, group=128)
    weight = torch.randn(128, 512, generator=torch.Generator().manual_seed(0)) * 0.1
    x = torch.randn(32, 512, generator=g)
    exact = F.linear(x, weight, layer.bias)
    got = layer(x)
    cosine = F.cosine_similarity(got, exact, dim=1)
    assert cosine.min() > (0.995 if KERNELS[name].activations == "int8" else 0.9995)


INT8_KERNELS = [pytest.param(name, marks=needs(name)) for name in KERNELS if KERNELS[name].activations == "int8"]


@pytest.mark.parametrize("name", INT8_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [12, 40])  # a query's path (each output block group by group), a batch's
@pytest.mark.parametrize("K,group", [(1024, 64), (1000, 40)])  # the kernel scans 16 inputs at a time: 1000 leaves 8
def test_spiky_rows_keep_their_outliers_aside_or_run_in_int16(name, dtype, rows, K, group):
    skip_unless_group_fits(name, group)
    layer, g = make_layer(name, 96, K, "none", smooth=True, group=group)
    layer.route = 10.0
    v = torch.randn(rows, K, generator=g)  # what the kernel quantizes: x / smooth
    split_rows = [0, 7, rows - 1]  # huge values: max / rms far above 10 (as the <s> token's activations)
    v[split_rows, 3] = 200.0
    v[7, [5, 15, 700]] = torch.tensor([-180.0, 190.0, 210.0])  # three more in the first 16 inputs and far on
    v[rows - 1, K - 1] = -220.0  # in the last inputs (past the whole vectors of 16 where K = 1000)
    routed_rows = [5, 8]  # a huge value and ten more above 0.6 x 10 x rms: over MAX_SPLIT, so int16
    v[routed_rows, 100] = 1000.0
    v[5, 200:210] = 250.0
    v[8, 500:510] = -250.0
    x = v / layer.inverse_smooth
    kept, split, routed = int8_x86.spiky_rows(v, layer.route)
    assert split.nonzero().flatten().tolist() == split_rows and routed.nonzero().flatten().tolist() == routed_rows
    assert (kept[split_rows].abs() > 0).sum(1).tolist() == [1, 4, 2]
    got = layer(x.to(dtype))
    assert layer.routed_rows == len(routed_rows) and layer.rows == rows
    expected = layer.reference(x.to(dtype), form="int8")
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-3 if dtype == torch.float32 else 0.05,
                               rtol=2e-3 if dtype == torch.float32 else 0.02)
    # split and routed rows come out near their exact values; plain int8 (no route) leaves them far off
    plain = X86Int8Linear(torch.randn(96, K, generator=torch.Generator().manual_seed(0)) * 0.1, layer.bias,
                          group=group, smooth=1 / layer.inverse_smooth, small=name, large=name)
    exact = layer.reference(x.to(dtype), form="fp32").float()
    plain_got = plain(x.to(dtype)).float()
    for spiky in (split_rows, routed_rows):
        assert (got.float() - exact)[spiky].abs().max() * 4 < (plain_got - exact)[spiky].abs().max()


@needs("vnni-a8")
@needs("vnni256-a8")
@pytest.mark.parametrize("rows", [1, 9, 40, 250])  # every row count of the micro-kernels; the query and batch paths
def test_the_256_bit_int8_kernel_gives_the_512_bit_ones_outputs_to_the_bit(rows):
    # vnni256-a8 runs avxvnni-a8's code (AVX-VNNI CPUs: no AVX-512) in the encoding this CPU has; the int32 sums
    # are exact and each output's groups are added in the same order, so the outputs must be vnni-a8's exactly
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(200, 768, generator=g) * 0.05, torch.randn(200, generator=g)
    x = torch.randn(rows, 768, generator=g)
    x[0, 3] = 60.0  # a spiky row: its largest entry kept aside
    if rows > 1:  # a huge entry and ten more above 0.6 x 10 x its RMS: over MAX_SPLIT, so the row runs in int16
        x[-1, 100], x[-1, 200:210] = 1000.0, 400.0
    out = {}
    for name in ("vnni-a8", "vnni256-a8"):
        layer = X86Int8Linear(weight, bias, "gelu", small=name, large=name, route=10.0)
        out[name] = layer(x, torch.randn(rows, 200, generator=torch.Generator().manual_seed(2)))
        assert layer.routed_rows == (rows > 1)
    assert torch.equal(out["vnni-a8"], out["vnni256-a8"])


@needs("vnni-a8")
@needs("amx-a8")
@pytest.mark.parametrize("rows", [1, 17, 40, 250])  # one A tile, a partial second, whole chunks, two row blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_amx_int8_kernel_gives_the_vnni_kernels_outputs_to_the_bit(rows, dtype):
    # the same prepared rows, exact int32 group sums and the same order of the fp32 group additions: the AMX
    # kernel's outputs must be vnni-a8's exactly, split rows and rows routed to int16 included
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(200, 768, generator=g) * 0.05, torch.randn(200, generator=g)
    x = torch.randn(rows, 768, generator=g)
    x[0, 3] = 60.0  # a spiky row: its largest entry kept aside
    if rows > 1:  # a row over MAX_SPLIT: int16
        x[-1, 100], x[-1, 200:210] = 1000.0, 400.0
    residual = torch.randn(rows, 200, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = {}
    for name in ("vnni-a8", "amx-a8"):
        layer = X86Int8Linear(weight, bias, "gelu", small=name, large=name, route=10.0)
        out[name] = layer(x.to(dtype), residual)
        assert layer.routed_rows == (rows > 1)
    assert torch.equal(out["vnni-a8"], out["amx-a8"])


def test_rows_switch_between_the_small_and_the_large_kernel():
    small, large = pick_kernel("weight-only"), pick_kernel("int8") or pick_kernel("fp32")
    if small is None or large is None:
        pytest.skip("needs two kernels that run here")
    g = torch.Generator().manual_seed(3)
    layer = X86Int8Linear(torch.randn(64, 128, generator=g), None, small=small, large=large, max_small_rows=4)
    assert layer.kernel_for(4) == small and layer.kernel_for(5) == large
    x = torch.randn(5, 128, generator=g)
    torch.testing.assert_close(layer(x[:4]), layer.reference(x[:4], form=KERNELS[small].activations), atol=2e-3,
                               rtol=2e-3)
    torch.testing.assert_close(layer(x), layer.reference(x, form=KERNELS[large].activations), atol=2e-3,
                               rtol=2e-3)


def test_wrong_inputs_raise_before_the_kernel_runs():
    name = pick_kernel("weight-only")
    if name is None:
        pytest.skip("no kernel runs here")
    layer = X86Int8Linear(torch.randn(64, 128), None, small=name, large=name)
    with pytest.raises(ValueError, match="inputs"):
        layer(torch.randn(3, 64))
    with pytest.raises(ValueError, match="inputs"):
        layer(torch.randn(3, 128).half())
    with pytest.raises(ValueError, match="residual"):
        layer(torch.randn(3, 128), torch.randn(3, 64).bfloat16())


def test_a_kernel_the_cpu_lacks_is_named_with_what_it_lacks():
    assert "lacks avx512_vnni" in kernel_unavailable("vnni-a8", AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"})
    assert "lacks avx_vnni" in kernel_unavailable("avxvnni-a8", AVX2 | {"avx512f", "avx512_vnni"})
    assert "lacks" in kernel_unavailable("avx2-a16", frozenset({"sse4_2"}))
    assert pick_kernel("int8", AVX2) is None and pick_kernel("int8", frozenset()) is None
    assert "unknown kernel" in kernel_unavailable("vnni-a4")


def test_library_signatures_are_declared():
    why = library_unavailable()
    if why:
        pytest.skip(why)
    library = load_library()
    assert library.allmpnet_x86_linear.restype is ctypes.c_int64
    assert library.allmpnet_x86_scratch_bytes(KERNELS["vnni-a8"].id, 7, 128, 2) >= 7 * 128 * 3 + 3 * 7 * 4 + 2 * 128 * 4


# ---------------------------------------------------------------- the recipe in an Encoder (tiny model)

TEXTS = ["the cat sat on the mat", "a dog and a car", "this is a test sentence with a few more words in it", "sun",
         "what is the capital of france?"]


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("kernel", [pytest.param(k, marks=needs(k)) for k in ("vnni-a8", "avxvnni-a8", "vnni256-a8",
                                                                               "vnni-a16", "avx512-a16", "avx2-a16")])
def test_each_int8_kernel_encodes_close_to_fp32(tiny_model_dir, kernel, tmp_path, monkeypatch):
    from allmpnet import Encoder
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))  # a fresh calibration cache
    enc = Encoder(tiny_model_dir, device="cpu", precision=int8_plan(kernel))
    got = enc.encode(TEXTS)
    layers = [m for m in enc.inference_model().modules() if isinstance(m, X86Int8Linear)]
    assert len(layers) == 4 * enc.model.network.cfg.num_hidden_layers
    assert {(m.small, m.large) for m in layers} == {(kernel, kernel)}
    smoothed = {m.inverse_smooth is not None for m in layers}
    w8a8 = KERNELS[kernel].activations == "int8"
    assert smoothed == ({True, False} if w8a8 else {False})  # FFN down is never smoothed
    assert cosines(got, enc.with_precision("fp32").encode(TEXTS)).min() > 0.99
    # W8A8 only: the calibration (input ranges of every layer) was made and cached for these weights
    assert len(list((tmp_path / "calibration").glob("*.pt"))) == w8a8


@needs("vnni-a8")
@needs("amx-a8")
def test_amx_int8_plan_runs_large_batches_on_the_tiles(tmp_path, monkeypatch):
    import dataclasses

    from allmpnet import Encoder
    from allmpnet.encode.precision import Capabilities, plan_precision
    from allmpnet.testing import TINY, build_random_model
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    caps = Capabilities.detect("cpu")
    if caps.amx_kernels:
        pytest.skip(f"our AMX kernels do not run here: {caps.amx_kernels}")
    # inputs of 128 and 256: whole groups of 128, which the AMX kernel takes (the shared tiny model's 32 it does not)
    model = build_random_model(tmp_path / "m", dataclasses.replace(TINY, hidden_size=128, intermediate_size=256))
    enc = Encoder(model, device="cpu", precision="int8")
    assert (enc.plan.int8_kernel, enc.plan.int8_large_kernel) == ("vnni-a8", "amx-a8")
    texts = TEXTS * 8  # batches far over 64 rows: the tiles
    got = enc.encode(texts)
    layers = [m for m in enc.inference_model().modules() if isinstance(m, X86Int8Linear)]
    assert {(m.small, m.large) for m in layers} == {("vnni-a8", "amx-a8")} and all(m.rows > 64 for m in layers)
    vnni = enc.with_precision(dataclasses.replace(enc.plan, int8_large_kernel=None))
    np.testing.assert_array_equal(got, vnni.encode(texts))  # the same sums: the same vectors
    assert cosines(got, enc.with_precision("fp32").encode(texts)).min() > 0.99
    assert plan_precision("auto", "cpu").int8_large_kernel == "amx-a8"


@pytest.mark.skipif(not pick_kernel("weight-only"), reason="no int8 kernel runs on this CPU")
def test_quality_guard_passes_and_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    from allmpnet import Encoder
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    kernel = pick_kernel("int8") or pick_kernel("int16")
    plan = int8_plan(kernel, guard_fallback="fp32", requested="auto")
    enc = Encoder(tiny_model_dir, device="cpu", precision=plan)
    enc.encode(TEXTS)
    assert enc.plan.linear == "int8-x86" and "quality guard passed: min cosine" in enc.plan.reason
    cached = torch.load(next((tmp_path / "calibration").glob("*.pt")), weights_only=True)
    assert cached["guard_results"][kernel] >= 0.99
    again = Encoder(tiny_model_dir, device="cpu", precision=plan)
    again.encode(TEXTS)
    assert enc.plan.reason == again.plan.reason  # the same figure, read back
    again.refresh()
    again.encode(TEXTS)
    assert again.plan.reason.count("quality guard") == 1  # checked again after a refresh, said once


@pytest.mark.skipif(not pick_kernel("weight-only"), reason="no int8 kernel runs on this CPU")
def test_quality_guard_falls_back_below_the_contract(tiny_model_dir, tmp_path, monkeypatch):
    from allmpnet import Encoder
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    kernel = pick_kernel("int8") or pick_kernel("int16")
    # a contract no int8 copy can meet: the guard must refuse it and run the fallback instead
    plan = int8_plan(kernel, guard_fallback="fp32", guard_min_cosine=1.01, requested="auto")
    enc = Encoder(tiny_model_dir, device="cpu", precision=plan)
    with pytest.warns(RuntimeWarning, match="failed the quality guard"):
        got = enc.encode(TEXTS)
    assert enc.plan.name == "fp32" and enc.plan.exact and "failed the quality guard" in enc.plan.reason
    assert not any(isinstance(m, X86Int8Linear) for m in enc.inference_model().modules())
    np.testing.assert_allclose(got, enc.with_precision("fp32").encode(TEXTS), atol=1e-6)


def test_projection_names_follow_the_model():
    assert int8_x86.projection("encoder.layer.3.attention.attn.qkv") == "qkv"
    assert int8_x86.projection("encoder.layer.3.attention.attn.o") == "o"
    assert int8_x86.projection("encoder.layer.3.intermediate.dense") == "up"
    assert int8_x86.projection("encoder.layer.3.output.dense") == "down"


def test_calibration_texts_are_shipped_and_varied():
    from allmpnet.encode.calibration import calibration_texts
    texts = calibration_texts()
    assert 150 <= len(texts) <= 400
    assert max(len(t.split()) for t in texts) > 150  # passages, not only sentences
