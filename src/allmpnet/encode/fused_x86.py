"""The whole layer stack in one C call for small batches (a query), on the int8-x86 kernels.

A query's 9-15 tokens make each of a layer's seven steps (q|k|v, attention, o + residual, LayerNorm, up + GELU,
down + residual, LayerNorm) a few microseconds of arithmetic; run from Python, one module and one ctypes call at
a time, the 12 layers' 48 projections, 12 attentions and 24 LayerNorms cost ~3 ms of calls around ~5 ms of
kernels (2 Zen 4 cores). `allmpnet_x86_encoder` (kernels_x86.c) runs them all in one team of threads, in fp32
between the projections, with the layers' own int8 weights: so a swapped module, `FusedX86Stack`, takes the
place of the inference copy's `LayerStack` and sends batches of at most `max_tokens` tokens there, larger ones
to the stack it wraps.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from allmpnet.encode.int8_x86 import KERNELS, X86Int8Linear, _library, _scratch_buffer, kernel_unavailable
from allmpnet.model.mpnet import LayerStack
from allmpnet.model.packing import AttentionLayout, GroupedAttention

MAX_TEXT_TOKENS = 64  # MAX_FUSED_TEXT in kernels_x86.c


class LinearSpec(ctypes.Structure):  # x86_linear_spec
    _fields_ = [("kernel", ctypes.c_int32), ("gelu", ctypes.c_int32), ("packed", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("compensation", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("smooth", ctypes.c_void_p), ("group", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("route", ctypes.c_float)]


class LayerSpec(ctypes.Structure):  # x86_layer_spec
    _fields_ = [("qkv", LinearSpec), ("o", LinearSpec), ("up", LinearSpec), ("down", LinearSpec),
                ("norm1_weight", ctypes.c_void_p), ("norm1_bias", ctypes.c_void_p),
                ("norm2_weight", ctypes.c_void_p), ("norm2_bias", ctypes.c_void_p)]


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_spec(layer: X86Int8Linear) -> LinearSpec:
    """The C description of `layer` running its small-batch kernel (pointers into its buffers)."""
    return LinearSpec(KERNELS[layer.small].id, int(layer.activation == "gelu"), layer.packed.data_ptr(),
                      layer.scales.data_ptr(), layer.compensation.data_ptr(), _pointer(layer.bias),
                      _pointer(layer.inverse_smooth), layer.group, layer.out_features, layer.in_features,
                      layer.route)


class FusedX86Stack(nn.Module):
    """`stack` (whose linears are X86Int8Linear) in one C call for batches of at most `max_tokens` packed tokens
    laid out as GroupedAttention with no filler rows; any other batch runs `stack` itself. Same call as LayerStack:
    (N, C) tokens and the layout -> (N, C) tokens, in x's dtype (fp32 inside)."""

    def __init__(self, stack: LayerStack, max_tokens: int = MAX_TEXT_TOKENS):
        super().__init__()
        self.stack = stack
        layers = list(stack.layer)
        linears = [(l.attention.attn.qkv, l.attention.attn.o, l.intermediate.dense, l.output.dense) for l in layers]
        if not all(isinstance(linear, X86Int8Linear) for four in linears for linear in four):
            raise TypeError("FusedX86Stack runs a stack whose linear layers are all X86Int8Linear")
        self.max_tokens = min(max_tokens, MAX_TEXT_TOKENS, *(linear.max_small_rows for four in linears
                                                            for linear in four))
        kernels = {linear.small for four in linears for linear in four}
        self.unavailable = "; ".join(filter(None, (kernel_unavailable(k) for k in sorted(kernels))))
        self.n_head = layers[0].attention.attn.n_head
        self.eps = float(layers[0].attention.LayerNorm.eps)
        norms = [(l.attention.LayerNorm, l.output.LayerNorm) for l in layers]
        # fp32 copies of the LayerNorms (the copy keeps them in its dtype), kept alive with the C description
        self.norms = [tuple(t.detach().float().contiguous() for n in pair for t in (n.weight, n.bias))
                      for pair in norms]
        self._specs = None  # the C description, built on first use (pointers: never copied or pickled)
        self.routed = torch.zeros(len(layers), 4, dtype=torch.int64)  # the last fused call's rows routed to int16
        self.position_biases: dict[int, torch.Tensor] = {}

    @property
    def specs(self) -> ctypes.Array:
        if self._specs is None:
            layers = list(self.stack.layer)
            self._specs = (LayerSpec * len(layers))(*[
                LayerSpec(linear_spec(l.attention.attn.qkv), linear_spec(l.attention.attn.o),
                          linear_spec(l.intermediate.dense), linear_spec(l.output.dense), *(t.data_ptr() for t in norm))
                for l, norm in zip(layers, self.norms)])
        return self._specs

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_specs": None}

    def texts(self, x: torch.Tensor, layout: AttentionLayout) -> tuple[list[int], list[int]] | None:
        """(starts, lengths) of the batch's texts when it runs fused, else None."""
        if (self.unavailable or not isinstance(layout, GroupedAttention) or x.shape[0] != layout.tokens
                or not 0 < x.shape[0] <= self.max_tokens or x.device.type != "cpu"):
            return None
        starts, lengths = [], []
        for g in layout.groups:
            for i in range(g.blocks * g.rows_per_block):
                starts.append(g.start + i * g.length)
                lengths.append(g.length)
        return starts, lengths

    def position_bias(self, length: int) -> torch.Tensor:
        bias = self.position_biases.get(length)
        if bias is None:  # fixed at inference: computed once per length
            with torch.no_grad():
                bias = self.stack.relative_attention_bias(length).float().contiguous()  # (H, L, L)
            self.position_biases[length] = bias
        return bias

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        texts = self.texts(x, layout)
        if texts is None:
            return self.stack(x, layout)
        starts, lengths = texts
        h = x.to(torch.float32, copy=True).contiguous()  # (N, C), layers applied in place
        M, C = h.shape
        biases = [self.position_bias(length) for length in lengths]
        n = len(starts)
        library = _library()[0]
        threads = torch.get_num_threads()
        intermediate = self.specs[0].up.N
        scratch = _scratch_buffer(library.allmpnet_x86_encoder_scratch_bytes(M, C, intermediate, threads))
        status = library.allmpnet_x86_encoder(
            self.specs, len(self.specs), h.data_ptr(), M, C, self.n_head, n, (ctypes.c_int32 * n)(*starts),
            (ctypes.c_int32 * n)(*lengths), (ctypes.c_void_p * n)(*[b.data_ptr() for b in biases]), self.eps,
            self.routed.data_ptr(), scratch.data_ptr(), threads)
        if status < 0:
            raise RuntimeError(f"the fused int8 layer stack refused the call (status {status})")
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"one C call up to {self.max_tokens} tokens" + (f" (off: {self.unavailable})" if self.unavailable
                                                                 else "")
