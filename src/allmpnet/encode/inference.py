"""The inference copy of a SentenceModel: the same modules and forward pass, with its linear layers swapped for
the precision plan's kinds (gpt-fast style: each speed-up is a module swap, not a second forward pass).

- "onednn": the weight is reordered once by oneDNN into its blocked (on AMX: tile) layout, and the bias, GELU or
  residual add are applied while the output is still in cache instead of in separate passes over memory. In
  fp32 too: F.linear re-packs the weight on every call, which a query's few rows cannot amortise.
- "int8-amx": the CPU backend's AMX kernel (backends/cpu/amx.py), int8 weights widened to bf16 on the tiles.
- "int8-x86": the CPU backend's x86 kernels (backends/cpu/int8.py): W8A8 on VNNI (or AMX-int8 for large batches)
  with the calibrated outlier treatment, int16 activations elsewhere; built from the fp32 master weights, not the
  cast copy's, and their streamed buffers then moved onto 2 MB pages in the order a query reads them.
- a small-batch kind beside a large-batch one: `RowSwitchedLinear` keeps both forms and picks per call.
- LayerNorms in bf16 on x86 CPUs with AVX512-BF16: the backend's kernel, where the plan says so.
- with int8-x86 linears, and in fp32 on x86 CPUs, the layer stack itself is swapped for the backend's
  `FusedX86Stack`: every int8 batch (and an fp32 query) runs the whole forward pass in one C call, which
  Encoder.embed_ids reaches with token ids, embeddings and pooling included.

`build_inference` makes the copy a plan asks for, calibrating W8A8 and checking auto's int8 against fp32 first.

In fp32 with torch's linears the copy is the model itself; otherwise it is a frozen deep copy cast to the plan's
dtype (in fp32 sharing every tensor but the swapped linears'), so the fp32 master weights (training, saving) are
never touched.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from allmpnet.backends.cpu.amx import Int8Linear
from allmpnet.backends.cpu.fused import FusedX86Stack
from allmpnet.backends.cpu.int8 import KERNELS as X86_KERNELS, STREAMED_BUFFERS, X86Int8Linear, recipe_layer
from allmpnet.backends.cpu.layer_norm import swap_layer_norms
from allmpnet.backends.cpu.pages import move_to_huge_pages
from allmpnet.encode.calibration import Calibration, cached_calibration, min_cosine
from allmpnet.encode.precision import PrecisionPlan, plan_precision
from allmpnet.model.mpnet import Linear
from allmpnet.model.packing import PackedBatch
from allmpnet.model.sentence import SentenceModel


class PackedLinear(nn.Module):
    """Linear with W prepacked by oneDNN and the bias, GELU or residual add fused into the matmul."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 batch_hint: int = 1024):
        super().__init__()
        self.activation = activation
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:  # the model adds a residual only after layers with no activation
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "none")


class RowSwitchedLinear(nn.Module):
    """Batches of at most `max_small_rows` rows go to `small`, larger ones to `large` (two forms of one layer)."""

    def __init__(self, small: nn.Module, large: nn.Module, max_small_rows: int):
        super().__init__()
        self.small, self.large, self.max_small_rows = small, large, max_small_rows

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return (self.small if x.shape[0] <= self.max_small_rows else self.large)(x, residual)


@dataclass(frozen=True)
class LinearSource:
    """What a linear kind is built from: the copy's layer (in the plan's dtype), the model's own fp32 layer of
    the same name, and the calibration (int8-x86 only)."""
    name: str  # in the network, e.g. "encoder.layer.3.intermediate.dense"
    linear: Linear
    master: Linear
    plan: PrecisionPlan
    calibration: Calibration | None


def x86_int8_layer(source: LinearSource) -> nn.Module:
    if source.plan.int8_kernel is None:
        raise ValueError("an int8-x86 plan names its kernel (plan_precision sets int8_kernel)")
    master = source.master
    absmax = None if source.calibration is None else source.calibration.input_absmax.get(source.name)
    return recipe_layer(master.weight.detach().float().cpu(), None if master.bias is None else master.bias.detach(),
                        master.activation, source.name, source.plan.int8_kernel, absmax,
                        source.plan.int8_large_kernel)


LINEAR_KINDS: dict[str, Callable[[LinearSource], nn.Module]] = {
    "torch": lambda source: source.linear,
    "onednn": lambda source: PackedLinear(source.linear.weight, source.linear.bias, source.linear.activation),
    "int8-amx": lambda source: Int8Linear(source.linear.weight, source.linear.bias, source.linear.activation),
    "int8-x86": x86_int8_layer,
}


def swap_linears(module: nn.Module, make: Callable[[str, Linear], nn.Module], prefix: str = "") -> None:
    """Replace every model Linear under `module` (in place) by make(its name under the first module, linear)."""
    for name, child in list(module.named_children()):
        if isinstance(child, Linear):
            setattr(module, name, make(prefix + name, child))
        else:
            swap_linears(child, make, f"{prefix}{name}.")


def linear_factory(plan: PrecisionPlan, model: SentenceModel, calibration: Calibration | None = None
                   ) -> Callable[[str, Linear], nn.Module]:
    """make(name, the copy's linear) for swap_linears over a copy of `model.network`."""
    def make(name: str, linear: Linear) -> nn.Module:
        source = LinearSource(name, linear, model.network.get_submodule(name), plan, calibration)
        large = LINEAR_KINDS[plan.linear](source)
        if plan.small_linear is None:
            return large
        return RowSwitchedLinear(LINEAR_KINDS[plan.small_linear](source), large, plan.small_batch_tokens)
    return make


def inference_model(model: SentenceModel, plan: PrecisionPlan, device: torch.device,
                    calibration: Calibration | None = None) -> SentenceModel:
    """The model encode() runs under `plan`: frozen, in eval mode. W8A8 int8-x86 layers need `calibration`."""
    if plan.runs_the_model_itself:
        return model
    # deepcopy with every tensor pre-cast in the memo: the copy never holds a second full fp32 set of weights
    memo = {id(t): (nn.Parameter(t.detach().to(device=device, dtype=plan.dtype), requires_grad=False)
                    if isinstance(t, nn.Parameter) else t.to(device=device, dtype=plan.dtype if t.is_floating_point()
                                                                    else t.dtype))
            for t in list(model.parameters()) + list(model.buffers())}
    fast = copy.deepcopy(model, memo).eval()
    swap_linears(fast.network, linear_factory(plan, model, calibration))
    if plan.layer_norm_kernel:
        swap_layer_norms(fast.network)
    # the int8 weights a query streams, on 2 MB pages in the order it reads them (backends/cpu/pages.py)
    move_to_huge_pages([m for m in fast.network.modules() if isinstance(m, X86Int8Linear)], STREAMED_BUFFERS)
    if plan.fused_stack_tokens != 0:
        fp32 = plan.fused_fp32_kernel is not None  # the fp32 model's weights as they are; else the int8 layers
        fast.network.encoder = FusedX86Stack(fast.network.encoder, plan.fused_stack_tokens,
                                             model.network.encoder if fp32 else None, plan.fused_fp32_kernel,
                                             fast.network.embeddings, fast.pooling, bf16=plan.dtype == torch.bfloat16,
                                             products=plan.block_attention_kernel or "fp32")
    return fast


def build_inference(model: SentenceModel, plan: PrecisionPlan, device: torch.device,
                    calibration_ids: Callable[[], list[list[int]]],
                    pack: Callable[[Sequence[Sequence[int]]], PackedBatch]) -> tuple[SentenceModel, PrecisionPlan]:
    """The inference copy for `plan`, and the plan it ended up with. W8A8 layers are built from the calibration
    texts' ranges (`calibration_ids()`: their token ids); auto's int8-x86 copy (plan.guard_fallback) is checked
    against fp32 on them (batches made by `pack`) and, below the quality contract, replaced by the fallback's,
    with a warning."""
    if "int8-x86" not in (plan.linear, plan.small_linear):
        return inference_model(model, plan, device), plan
    w8a8 = X86_KERNELS[plan.int8_kernel].activations == "int8"
    if not w8a8 and plan.guard_fallback is None:  # int16 activations need no ranges, and nothing is checked
        return inference_model(model, plan, device), plan
    ids = calibration_ids()
    calibration = cached_calibration(model, ids, device)
    fast = inference_model(model, plan, device, calibration)
    if plan.guard_fallback is None:
        return fast, plan
    kernels = plan.int8_kernel + (f"+{plan.int8_large_kernel}" if plan.int8_large_kernel else "")
    cosine = calibration.guard_results.get(kernels)
    if cosine is None:
        cosine = min_cosine(fast, [pack(ids[i:i + 32]) for i in range(0, len(ids), 32)], calibration.reference)
        calibration.record_guard(kernels, cosine)
    if cosine >= plan.guard_min_cosine:
        why = plan.reason.split("; quality guard")[0]  # a refresh checks again: one verdict, the latest
        return fast, replace(plan, reason=f"{why}; quality guard passed: min cosine {cosine:.4f} to fp32 on "
                                          f"{len(ids)} calibration texts")
    fallback = plan_precision(plan.guard_fallback, device)
    fallback = replace(fallback, requested=plan.requested, reason=(
        f"int8 ({plan.int8_kernel}) failed the quality guard: min cosine {cosine:.4f} < {plan.guard_min_cosine} to "
        f"fp32 on {len(ids)} calibration texts"))
    warnings.warn(f"precision 'auto': {fallback.reason}; using {fallback.name}", RuntimeWarning, stacklevel=5)
    return inference_model(model, fallback, device), fallback
