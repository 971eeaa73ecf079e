"""The int8 copy's weights on 2 MB pages (backends/cpu/pages.py): aligned, asked for huge pages, in the order a query
reads them, and the layers compute the same."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from allmpnet.backends.cpu.pages import HUGE_PAGE, huge_page_region, move_to_huge_pages
from conftest import int8_plan


def mapping_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (Linux)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_region_starts_on_a_huge_page_zeroed_and_asked_for_huge_pages():
    region = huge_page_region(3 * HUGE_PAGE + 100)
    assert region.dtype == torch.uint8 and region.numel() == 3 * HUGE_PAGE + 100
    assert region.data_ptr() % HUGE_PAGE == 0 and not region.any()
    if sys.platform.startswith("linux"):
        flags = mapping_flags(region.data_ptr())
        assert "sh" not in flags  # private memory: shared anonymous memory gets no transparent huge pages
        if Path("/sys/kernel/mm/transparent_hugepage").is_dir():  # a kernel built with them takes the advice
            assert "hg" in flags


class Holder(nn.Module):
    def __init__(self, *tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"b{i}", t)


def test_buffers_move_in_order_keep_their_values_and_stay_registered():
    torch.manual_seed(0)
    a = Holder(torch.randint(-127, 128, (64, 33), dtype=torch.int8), torch.randn(5, 3), None)
    b = Holder(torch.randint(-127, 128, (7,), dtype=torch.int8), torch.randn(64))
    before = {(id(m), n): t.clone() for m in (a, b) for n, t in m.named_buffers()}
    region = move_to_huge_pages([a, b], ("b0", "b1", "b2"))
    moved = [a.b0, a.b1, b.b0, b.b1]
    assert a.b2 is None and region is not None
    for m in (a, b):
        for n, t in m.named_buffers():
            assert torch.equal(t, before[(id(m), n)]) and t.dtype == before[(id(m), n)].dtype
            assert dict(m.named_buffers())[n] is t
    starts = [t.data_ptr() for t in moved]
    assert starts == sorted(starts) and starts[0] == region.data_ptr()
    assert all(s % 64 == 0 for s in starts)
    assert all(t.untyped_storage().data_ptr() == moved[0].untyped_storage().data_ptr() for t in moved)
    assert move_to_huge_pages([Holder(None)], ("b0",)) is None


def test_the_int8_copy_reads_its_weights_from_one_region_in_layer_order(tiny_model_dir, tmp_path, monkeypatch):
    from allmpnet import Encoder
    from allmpnet.backends.cpu.int8 import STREAMED_BUFFERS, X86Int8Linear, pick_kernel
    kernel = pick_kernel("int8") or pick_kernel("int16")  # "int8"'s own order of preference
    if kernel is None:
        pytest.skip("no x86 int8 kernel runs on this CPU")
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    enc = Encoder(tiny_model_dir, device="cpu", precision=int8_plan(kernel))
    layers = [m for m in enc.inference_model().network.modules() if isinstance(m, X86Int8Linear)]
    assert len(layers) == 4 * enc.model.network.cfg.num_hidden_layers
    starts = [getattr(m, n).data_ptr() for m in layers for n in STREAMED_BUFFERS]
    assert starts == sorted(starts)  # q|k|v, o, up, down, layer after layer: as the fused stack reads them
    assert starts[0] % HUGE_PAGE == 0
    assert len({getattr(m, n).untyped_storage().data_ptr() for m in layers for n in STREAMED_BUFFERS}) == 1
    # and the layers still compute what their reference does
    x = torch.randn(9, layers[0].in_features)
    torch.testing.assert_close(layers[0](x), layers[0].reference(x), atol=2e-3, rtol=2e-3)
