"""Our bf16 LayerNorm kernel (backends/cpu/layer_norm.py; allmpnet_x86_layer_norm, csrc/layer_norm*.c) against
torch's, alone and inside an encoder, and where the plan uses it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allmpnet.backends.cpu.layer_norm import X86LayerNorm, layer_norm_unavailable, swap_layer_norms
from allmpnet.encode.precision import Capabilities, plan_precision
from allmpnet.model import MPNetConfig
from allmpnet.testing import build_random_model

needs_kernel = pytest.mark.skipif(bool(layer_norm_unavailable()), reason=layer_norm_unavailable() or "runs")


def norm_of(width: int, seed: int = 0) -> nn.LayerNorm:
    generator = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(width, generator=generator))
    return norm


@needs_kernel
@pytest.mark.parametrize("rows,width", [(0, 768), (1, 768), (7, 64), (300, 768), (33, 3072)])
def test_kernel_matches_torch(rows, width):
    generator = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, width, generator=generator) + 1).bfloat16()
    x[:, :3] *= 40  # a few large channels, as the residual stream has
    norm = norm_of(width).bfloat16().requires_grad_(False)  # as in the inference copy
    layer = X86LayerNorm.like(norm)
    ours = layer(x)
    assert layer.calls == [1, 0]  # our kernel ran
    theirs = norm(x)
    exact = F.layer_norm(x.float(), (width,), norm.weight.float(), norm.bias.float(), norm.eps)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    if rows:
        # bf16 outputs of fp32 maths: ours within a rounding of the exact values, as torch's are
        torch.testing.assert_close(ours.float(), exact, atol=1e-2, rtol=8e-3)
        assert (ours != theirs).float().mean() < 0.01  # the same values but where a tie rounds the other way


def test_other_inputs_run_torch():
    norm = norm_of(24)  # not a multiple of 16
    ours = X86LayerNorm.like(norm)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), norm(x))  # fp32, any width
    torch.testing.assert_close(ours(x.bfloat16()).float(), norm.bfloat16()(x.bfloat16()).float())
    assert ours.calls == [0, 2]
    wide = X86LayerNorm.like(norm_of(32))
    batch = torch.randn(2, 5, 32).bfloat16()  # 3-D
    torch.testing.assert_close(wide(batch).float(), F.layer_norm(batch.float(), (32,), wide.weight, wide.bias,
                                                                    1e-5), atol=2e-2, rtol=1e-2)
    trained = X86LayerNorm.like(norm_of(32))
    trained.requires_grad_(True)  # under autograd: torch's, which has a backward
    y = trained(torch.randn(4, 32).bfloat16())
    y.float().sum().backward()
    assert trained.calls == [0, 1] and trained.weight.grad is not None
    with pytest.raises(ValueError, match="with a weight and a bias"):
        X86LayerNorm.like(nn.LayerNorm(16, elementwise_affine=False))


def test_swap_replaces_every_layer_norm_with_its_weights():
    model = nn.Sequential(norm_of(16, 1), nn.Sequential(nn.Linear(16, 16), norm_of(16, 2)))
    swap_layer_norms(model)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 and all(isinstance(m, X86LayerNorm) for m in norms)
    torch.testing.assert_close(norms[1].weight, norm_of(16, 2).weight)
    assert layer_norm_unavailable(frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}))


def test_plan_uses_it_for_bf16_activations_where_it_runs():
    zen4 = Capabilities("cpu", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), frozenset({"fp32", "bf16"}),
                        amx_kernels="no AMX", x86_kernels=frozenset({"vnni-a8"}), x86_attention=True,
                        x86_layer_norm=True)
    for precision in ("auto", "bf16"):
        assert plan_precision(precision, "cpu", zen4).layer_norm_kernel
    assert "LayerNorm our x86 kernel" in plan_precision("bf16", "cpu", zen4).describe()
    assert not plan_precision("fp32", "cpu", zen4).layer_norm_kernel  # the exact path keeps torch's
    assert not plan_precision("bf16", "cpu", dataclasses.replace(zen4, x86_layer_norm=False)).layer_norm_kernel


@needs_kernel
def test_encoder_with_the_kernel_matches_torch(tmp_path):
    from allmpnet import Encoder
    cfg = MPNetConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                      max_position_embeddings=130)
    model_dir = build_random_model(tmp_path / "m", cfg)
    caps = dataclasses.replace(Capabilities.detect("cpu"), x86_layer_norm=True)
    enc = Encoder(model_dir, device="cpu", precision=plan_precision("bf16", "cpu", caps))
    assert enc.plan.layer_norm_kernel
    norms = [m for m in enc.inference_model().modules() if isinstance(m, X86LayerNorm)]
    assert len(norms) == 5 and not any(m.training for m in norms)  # the embeddings' and 2 per layer
    torch_norms = enc.with_precision(dataclasses.replace(enc.plan, layer_norm_kernel=False))
    assert not any(isinstance(m, X86LayerNorm) for m in torch_norms.inference_model().modules())
    texts = ["a short one", "the cat sat on the mat", "x " * 50, "another text of a few words"]
    got, expected = enc.encode(texts), torch_norms.encode(texts)
    assert all(m.calls[0] > 0 and m.calls[1] == 0 for m in norms)  # every one ran our kernel
    assert (got * expected).sum(1).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
