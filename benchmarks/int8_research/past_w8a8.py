"""Two ways past the shipped W8A8 path, measured for quality before any kernel is written for them:

- int4 weights (round to nearest, a scale per group of g inputs, symmetric or with a zero point) on every
  projection, activations fp32: the single query reads every weight once, so half the bytes would be up to half
  its time. Run on the fp32 model with its weights replaced by their int4 values.
- int8 products in attention, on top of `precision="auto"` (W8A8 linears, bf16 between layers): q and k per
  token and head (q . k in VNNI's u8 x s8), and/or the softmax weights as u8 (exp(s - max) in [0, 1], 255
  levels) against v per head and channel. q . k and p . v are each about half of a 256-token block's products
  (docs/speed.md: attention is ~13% of a passage batch under auto). Emulated in torch on the attention kernel's
  inputs for blocks of at least --min-tokens tokens (shorter ones keep the shipped kernel).

Min cosine to fp32 (ours) over all 2,758 STSBenchmark sentences and the first --passages SciFact passages cut at
256 word pieces, mean cosine, and STSBenchmark Spearman (fp32: 83.42).

    PYTHONPATH=src python benchmarks/int8_research/past_w8a8.py [--passages 300] [--out results/past_w8a8.md]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODEL, RESULTS, cpu_model, mean_cosine, min_cosine, reference_vectors,  # noqa: E402
                    scifact_passages, sts_sentences, sts_spearman)

import allmpnet.encode.attention_x86 as attention_x86  # noqa: E402
from allmpnet import Encoder  # noqa: E402
from allmpnet.encode.encoder import TruncationWarning  # noqa: E402
from allmpnet.model.mpnet import Linear  # noqa: E402


def int4_weight(weight: torch.Tensor, group: int, zero_point: bool) -> torch.Tensor:
    """(N, K) -> the same weights rounded to 4 bits per group of `group` inputs (fp32 values)."""
    N, K = weight.shape
    w = weight.float().reshape(N, K // group, group)
    if zero_point:  # 16 levels from the group's min to its max
        low, high = w.amin(2, keepdim=True), w.amax(2, keepdim=True)
        scale = ((high - low) / 15).clamp_min(1e-12)
        zero = torch.round(-low / scale)
        q = (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale
    else:  # -8..7 around zero
        scale = (w.abs().amax(2, keepdim=True) / 7).clamp_min(1e-12)
        q = torch.clamp(torch.round(w / scale), -8, 7) * scale
    return q.reshape(N, K)


def int8_per_slice(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric int8 values of x with one scale per slice along `dim` (the largest |x| there -> 127)."""
    scale = (x.abs().amax(dim, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(x / scale) * scale


def emulated_attention(quantize_qk: bool, quantize_pv: bool, min_tokens: int, shipped: Callable) -> Callable:
    """A stand-in for attention_x86.block_attention with the chosen products on int8 values (fp32 maths)."""
    def attend(qkv, out, bias, start, blocks, block_tokens, n_head, products="amx"):
        if block_tokens < min_tokens:
            return shipped(qkv, out, bias, start, blocks, block_tokens, n_head, products)
        C = out.shape[1]
        D = C // n_head
        rows = qkv[start:start + blocks * block_tokens].float().view(blocks, block_tokens, 3, n_head, D)
        q, k, v = rows.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if quantize_qk:
            q, k = int8_per_slice(q, -1), int8_per_slice(k, -1)  # per token and head
        scores = q @ k.transpose(-1, -2) * D ** -0.5 + bias  # (B, H, T, T)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        if quantize_pv:
            weights = torch.round(weights * 255) / 255
            v = int8_per_slice(v, -2)  # per head and channel, over the block's tokens
        y = (weights @ v) / weights.sum(-1, keepdim=True)
        out[start:start + blocks * block_tokens].view(blocks, block_tokens, n_head, D).copy_(
            y.transpose(1, 2).to(out.dtype))
    return attend


def measure(enc: Encoder, data: dict) -> dict:
    enc.max_seq_length = 512
    sts = enc.encode(data["sts"], show_progress_bar=False)
    enc.max_seq_length = 256
    sci = enc.encode(data["sci"], show_progress_bar=False)
    return {"sts_min": min_cosine(sts, data["sts_ref"]), "sts_mean": mean_cosine(sts, data["sts_ref"]),
            "sci_min": min_cosine(sci, data["sci_ref"]), "spearman": sts_spearman(sts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--min-tokens", type=int, default=64, help="int8 attention only on blocks this long")
    parser.add_argument("--out", type=Path, default=RESULTS / "past_w8a8.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", TruncationWarning)  # the passages are cut at 256 on purpose
    data = {"sts": sts_sentences(), "sci": scifact_passages(args.passages)}
    data["sts_ref"] = reference_vectors("sts", data["sts"], 512)
    data["sci_ref"] = reference_vectors("scifact", data["sci"], 256)
    lines = [f"## {cpu_model()}, torch {torch.__version__}: STSBenchmark {len(data['sts'])} sentences, SciFact "
             f"{len(data['sci'])} passages (256 word pieces); fp32 Spearman 83.42", "",
             "| variant | min cos STS | mean cos STS | min cos SciFact | STSB Spearman |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)

    def row(name: str, r: dict) -> None:
        lines.append(f"| {name} | {r['sts_min']:.5f} | {r['sts_mean']:.5f} | {r['sci_min']:.5f} "
                     f"| {r['spearman']:.2f} |")
        print(lines[-1], flush=True)

    for group, zero_point in ((32, False), (32, True), (64, False), (128, True)):
        enc = Encoder(str(MODEL), device="cpu", precision="fp32")
        with torch.no_grad():
            for name, module in enc.model.network.named_modules():
                if isinstance(module, Linear) and name.startswith("encoder.layer."):
                    module.weight.copy_(int4_weight(module.weight, group, zero_point))
        row(f"int4 weights, group {group}, {'zero point' if zero_point else 'symmetric'}; fp32 activations",
            measure(enc, data))

    shipped = attention_x86.block_attention
    enc = Encoder(str(MODEL), device="cpu", precision="auto")
    try:
        row("auto as shipped", measure(enc, data))
        for qk, pv in ((True, False), (False, True), (True, True)):
            attention_x86.block_attention = emulated_attention(qk, pv, args.min_tokens, shipped)
            parts = " and ".join(p for p, on in (("q . k", qk), ("p . v", pv)) if on)
            row(f"auto, {parts} in int8 (blocks >= {args.min_tokens} tokens)", measure(enc, data))
    finally:
        attention_x86.block_attention = shipped
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
