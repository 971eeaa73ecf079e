"""Quality of int8 recipes on the real all-mpnet-base-v2: min cosine to fp32 over all STSBenchmark sentences and
over SciFact passages cut at 256 word pieces, and STSBenchmark Spearman (fp32: 83.42).

Each recipe says, per projection (12 layers x qkv, o, up, down), how it runs: oneDNN bf16 (as our bf16 path),
one of our int8 kernels (int8 weights; activations int8 per token = W8A8, or int16 = weight-only quality), or a
torch emulation of a library's scheme (per-tensor dynamic as ONNX Runtime, per-tensor static with PyTorch's
histogram observer as the PT2E x86 quantizer, per-token dynamic with per-channel weights as torchao). Smoothing
factors (SmoothQuant) and static scales come from the calibration texts shipped in the package
(src/allmpnet/encode/calibration_texts.txt), never from the evaluation data.

    PYTHONPATH=src python benchmarks/int8_research/quality.py --experiments baselines,alpha --scifact 300
    PYTHONPATH=src python benchmarks/int8_research/quality.py --experiments final --scifact all
    PYTHONPATH=src python benchmarks/int8_research/quality.py --experiments combo --scifact 0 --sentences 40  # smoke
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODEL, RESULTS, cpu_model, mean_cosine, min_cosine, reference_vectors,  # noqa: E402
                    scifact_passages, sts_rows, sts_spearman)

from allmpnet import Encoder  # noqa: E402
from allmpnet.encode.inference import PackedLinear, swap_linears  # noqa: E402
from allmpnet.encode.int8_x86 import X86Int8Linear, projection, quantize_rows, smoothing_factors  # noqa: E402
from allmpnet.model import PackedBatch  # noqa: E402
from allmpnet.model.mpnet import Linear  # noqa: E402
from allmpnet.model.sentence import SentenceModel  # noqa: E402

PROJ = ("qkv", "o", "up", "down")
CALIBRATION = Path(__file__).resolve().parents[2] / "src" / "allmpnet" / "encode" / "calibration_texts.txt"


def layer_key(name: str) -> tuple[int, str]:
    """(layer index, projection) of a linear layer's name in the network ("encoder.layer.3.output.dense")."""
    return int(name.split(".")[2]), projection(name)


# ---------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Per projection (layer, proj): the input's per-channel max |x| over all calibration tokens, and a PyTorch
    histogram observer of the whole input (the PT2E x86 quantizer's default for static activations)."""
    absmax: dict = field(default_factory=dict)
    observers: dict = field(default_factory=dict)


def calibrate(enc: Encoder, texts: list[str], histograms: bool = True) -> Calibration:
    from torch.ao.quantization.observer import HistogramObserver
    cal = Calibration()
    hooks = []
    for name, module in enc.model.network.named_modules():
        if not isinstance(module, Linear) or not name.startswith("encoder.layer."):
            continue
        key = layer_key(name)
        if histograms:
            cal.observers[key] = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)

        def hook(module, args, key=key):
            x = args[0].detach().float()  # (real tokens, K): the packed batch has no filler rows
            cal.absmax[key] = torch.maximum(cal.absmax.get(key, torch.zeros(x.shape[1])), x.abs().amax(0))
            if histograms:
                cal.observers[key](x)
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 32):
                enc.model(PackedBatch.from_ids(enc.tokenizer(texts[start:start + 32]).ids, "cpu"))
    finally:
        for h in hooks:
            h.remove()
    return cal


def calibration_texts() -> list[str]:
    return [line for line in CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- torch emulations of library schemes


class FakeQuantLinear(nn.Module):
    """Library int8 schemes in torch (fp32 maths on quantized values): weights per output channel, symmetric;
    activations per tensor dynamic (u8 asymmetric, as ONNX Runtime's dynamic quantization), per tensor static
    (qparams from a calibration observer, as the PT2E x86 quantizer) or per token dynamic (symmetric, as torchao's
    Int8DynamicActivationInt8WeightConfig)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str, scheme: str,
                 observer=None):
        super().__init__()
        scale = weight.abs().amax(1, keepdim=True) / 127
        self.weight = torch.round(weight / scale) * scale
        self.bias, self.activation, self.scheme = bias, activation, scheme
        if scheme == "static":
            s, zp = observer.calculate_qparams()
            self.qparams = (float(s), int(zp))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        v = x.float()
        if self.scheme == "per-token":
            q, s = quantize_rows(v, 8)
            v = q * s
        else:
            if self.scheme == "dynamic":
                lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
                s, zp = max(hi - lo, 1e-8) / 255, 0
                zp = int(round(-lo / s))
            else:
                s, zp = self.qparams
            v = (torch.clamp(torch.round(v / s) + zp, 0, 255) - zp) * s
        y = F.linear(v, self.weight, self.bias)
        if self.activation == "gelu":
            y = F.gelu(y)
        if residual is not None:
            y = y + residual.float()
        return y.to(x.dtype)


# ---------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """How each projection runs. form(layer, proj) -> "bf16" (oneDNN), "a8" / "a16" (our kernels: int8 or int16
    activations) or "fake-dynamic" / "fake-static" / "fake-per-token" (library emulations)."""
    name: str
    form: Callable[[int, str], str]
    alpha: float | Callable[[int, str], float] | None = None  # SmoothQuant migration strength for a8 layers
    group: int | Callable[[str, int], int] = 128  # inputs per weight scale, or (proj, K) -> that; >= K: per channel
    smooth_all: bool = False  # smooth the a16 layers too (one int8 copy for both small and large batches)
    route_ratio: float = 0.0  # "a8r": rows whose max |x| / rms(x) exceeds this run with int16 activations

    def alpha_for(self, i: int, proj: str) -> float | None:
        return self.alpha(i, proj) if callable(self.alpha) else self.alpha

    def group_for(self, proj: str, K: int) -> int:
        return min(self.group(proj, K) if callable(self.group) else self.group, K)


def uniform(form: str) -> Callable[[int, str], str]:
    return lambda i, proj: form


def per_proj(**forms: str) -> Callable[[int, str], str]:
    return lambda i, proj: forms.get(proj, "bf16")


def build_fast(enc: Encoder, recipe: Recipe, cal: Calibration) -> SentenceModel:
    """The inference copy in bf16 (as precision="bf16": inference.inference_model) with each projection made as
    the recipe says. Weights are quantized from the fp32 originals (the model's own layers of the same name)."""
    model = enc.model
    # deepcopy with every tensor pre-cast in the memo, as inference_model does
    memo = {id(t): (nn.Parameter(t.detach().bfloat16(), requires_grad=False) if isinstance(t, nn.Parameter)
                    else t.bfloat16() if t.is_floating_point() else t)
            for t in list(model.parameters()) + list(model.buffers())}
    fast = copy.deepcopy(model, memo).eval()

    def make_linear(name: str, _linear: Linear) -> nn.Module:
        master = model.network.get_submodule(name)
        activation = master.activation
        weight, bias = master.weight.detach().float(), master.bias.detach().float()
        i, proj = layer_key(name)
        form = recipe.form(i, proj)
        if form == "bf16":
            return PackedLinear(weight.bfloat16(), bias.bfloat16(), activation)
        if form.startswith("fake-"):
            return FakeQuantLinear(weight, bias, activation, form[5:], cal.observers.get((i, proj)))
        alpha = recipe.alpha_for(i, proj)
        smooth = None
        if alpha is not None and (form == "a8" or recipe.smooth_all):
            smooth = smoothing_factors(cal.absmax[(i, proj)], weight, alpha)
        if form == "a8r":  # int8 activations, spiky rows (tokens) routed to int16 inside the kernel call
            smooth = None if alpha is None else smoothing_factors(cal.absmax[(i, proj)], weight, alpha)
            return X86Int8Linear(weight, bias, activation, group=recipe.group_for(proj, weight.shape[1]),
                                 smooth=smooth, small="vnni-a16", large="vnni-a8", max_small_rows=0,
                                 route=recipe.route_ratio)
        kernel = {"a8": "vnni-a8", "a16": "vnni-a16"}[form]
        return X86Int8Linear(weight, bias, activation, group=recipe.group_for(proj, weight.shape[1]),
                             smooth=smooth, small=kernel, large=kernel, max_small_rows=0)
    with torch.no_grad():
        swap_linears(fast.network, make_linear)
    return fast.eval()


def encode_with(enc: Encoder, fast: nn.Module | None, texts: list[str], max_len: int) -> np.ndarray:
    enc.max_seq_length = max_len  # the tokenizer is shared with every with_precision copy
    if fast is None:
        return enc.encode(texts, show_progress_bar=False)
    other = enc.with_precision("bf16")  # the encoder's own batching, packing and pooling, our copy of the model
    other._inference = fast
    return other.encode(texts, show_progress_bar=False)


def evaluate(enc: Encoder, fast: nn.Module | None, data: dict) -> dict:
    start = time.perf_counter()
    sts = encode_with(enc, fast, data["sts"], 512)
    sci_min = min_cosine(encode_with(enc, fast, data["sci"], 256), data["sci_ref"]) if data["sci"] else float("nan")
    return {"sts_min": min_cosine(sts, data["sts_ref"]), "sts_mean": mean_cosine(sts, data["sts_ref"]),
        "spearman": sts_spearman(sts, len(data["sts_gold"])), "sci_min": sci_min,
        "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- experiments

ALL_A8 = uniform("a8")


def experiments(name: str) -> list[Recipe]:
    if name == "baselines":
        return [Recipe("oneDNN bf16 (our bf16 path)", uniform("bf16")),
                Recipe("weight-only int8 (int16 act.), group 128", uniform("a16")),
                Recipe("ONNX Runtime-like: per-tensor dynamic u8, per-channel W", uniform("fake-dynamic")),
                Recipe("PT2E x86 static-like: per-tensor histogram u8, per-channel W", uniform("fake-static")),
                Recipe("torchao-like: per-token dynamic, per-channel W", uniform("fake-per-token")),
                Recipe("W8A8 per-token, per-channel W (ours)", ALL_A8, group=1 << 20),
                Recipe("W8A8 per-token, group-128 W (ours)", ALL_A8)]
    if name == "alpha":
        return [Recipe(f"W8A8 all, SmoothQuant alpha {a}, group 128", ALL_A8, alpha=a)
                for a in (0.3, 0.5, 0.65, 0.8)] + \
               [Recipe(f"W8A8 all, SmoothQuant alpha {a}, per-channel W", ALL_A8, alpha=a, group=1 << 20)
                for a in (0.5, 0.8)]
    if name == "per-proj":  # which projection type carries the damage (only it in int8 activations)
        return [Recipe(f"W8A8 {p} only (alpha 0.5), rest bf16", per_proj(**{p: "a8"}), alpha=0.5) for p in PROJ] + \
               [Recipe(f"W8A8 {p} only (no smoothing), rest bf16", per_proj(**{p: "a8"})) for p in PROJ]
    if name == "keep-down":
        return [Recipe(f"W8A8 qkv/o/up (alpha {a}), down weight-only int8",
                       per_proj(qkv="a8", o="a8", up="a8", down="a16"), alpha=a) for a in (0.5, 0.8)] + \
               [Recipe("W8A8 qkv/o/up (alpha 0.5), down bf16", per_proj(qkv="a8", o="a8", up="a8"), alpha=0.5)]
    if name == "per-layer":  # which layers' down projection hurts in W8A8
        return [Recipe(f"W8A8 all (alpha 0.5) but layer {i} down weight-only",
                       lambda j, p, i=i: "a16" if (j == i and p == "down") else "a8", alpha=0.5) for i in range(12)]
    if name == "route":
        return [Recipe(f"W8A8 all, alpha 0.5, rows with max/rms > {t} in int16", uniform("a8r"), alpha=0.5,
                       route_ratio=t) for t in (12, 20, 28)] + \
               [Recipe("W8A8 all, no smoothing, rows with max/rms > 20 in int16", uniform("a8r"), route_ratio=20)]
    if name == "combo":  # smoothing where it helps (qkv, o, up), none on down (its outliers move with the token)
        out = []
        for a in (0.5, 0.8):
            alpha = (lambda i, p, a=a: None if p == "down" else a)
            out.append(Recipe(f"W8A8 all, alpha {a} on qkv/o/up, down unsmoothed", ALL_A8, alpha=alpha))
        alpha = (lambda i, p: None if p == "down" else 0.8)
        out.append(Recipe("W8A8 all, alpha 0.8 on qkv/o/up, down unsmoothed, rows max/rms > 20 in int16",
                          uniform("a8r"), alpha=alpha, route_ratio=20))
        out.append(Recipe("W8A8 all, alpha 0.8 on qkv/o/up, down unsmoothed with rows max/rms > 20 in int16",
                          lambda i, p: "a8r" if p == "down" else "a8", alpha=alpha, route_ratio=20))
        return out
    if name == "final":
        alpha = (lambda i, p: None if p == "down" else 0.8)
        return [Recipe("W8A8 all, alpha 0.8 on qkv/o/up, down unsmoothed, rows max/rms > 20 in int16", uniform("a8r"),
                       alpha=alpha, route_ratio=20),
                Recipe("W8A8 all, alpha 0.8 on qkv/o/up, down unsmoothed", ALL_A8, alpha=alpha),
                Recipe("weight-only int8 (int16 act.), group 128", uniform("a16")),
                Recipe("oneDNN bf16 (our bf16 path)", uniform("bf16"))]
    if name == "groups":  # fewer weight scales where the inputs are 768 (fewer flushes of the sums per row)
        alpha = (lambda i, p: None if p == "down" else 0.8)
        return [Recipe(f"final recipe, group {g768} on qkv/o/up, {g3072} on down", uniform("a8r"), alpha=alpha,
                       route_ratio=20, group=lambda p, K, a=g768, b=g3072: a if K == 768 else b)
                for g768, g3072 in ((128, 128), (384, 128), (384, 256))]
    raise ValueError(f"unknown experiment {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", default="baselines")
    parser.add_argument("--scifact", default="300", help="passages (the first n) or 'all'")
    parser.add_argument("--sentences", type=int, default=0,
                        help="STSBenchmark sentences: the first n // 2 pairs (smoke tests); 0: all")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n_sci = None if args.scifact == "all" else int(args.scifact)
    sci = scifact_passages(n_sci) if n_sci != 0 else []
    first, second, gold = sts_rows()
    pairs = len(gold) if args.sentences <= 0 else min(len(gold), max(1, args.sentences // 2))
    data = {"sts": first[:pairs] + second[:pairs], "sts_gold": gold[:pairs], "sci": sci}
    data["sts_ref"] = reference_vectors("sts", data["sts"], 512)
    data["sci_ref"] = reference_vectors("scifact", sci, 256) if sci else None  # the first n: all take ~30 min
    enc = Encoder(str(MODEL), device="cpu", precision="fp32")
    recipes = [recipe for exp in args.experiments.split(",") for recipe in experiments(exp)]
    # the histogram observers only serve the PT2E-like static recipe (and are slow)
    cal = calibrate(enc, calibration_texts(), histograms=any(r.form(i, p) == "fake-static" for r in recipes
                                                             for i in range(12) for p in PROJ))
    header = (f"\n## {cpu_model()}, torch {torch.__version__}; STSBenchmark {len(data['sts'])} sentences, "
              f"SciFact {len(sci)} passages (256 word pieces); fp32 Spearman 83.42\n\n"
              "| recipe | min cos STS | mean cos STS | min cos SciFact | STSB Spearman | eval s |\n|---|---|---|---|---|---|")
    print(header, flush=True)
    lines = [header]
    for recipe in recipes:
        fast = build_fast(enc, recipe, cal)
        r = evaluate(enc, fast, data)
        routers = [m for m in fast.modules() if isinstance(m, X86Int8Linear) and m.route > 0]
        routed = (f" ({100 * sum(m.routed_rows for m in routers) / max(1, sum(m.rows for m in routers)):.1f}% "
                  "rows int16)" if routers else "")
        line = (f"| {recipe.name}{routed} | {r['sts_min']:.4f} | {r['sts_mean']:.5f} | {r['sci_min']:.4f} | "
                f"{r['spearman']:.2f} | {r['seconds']:.0f} |")
        print(line, flush=True)
        lines.append(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
