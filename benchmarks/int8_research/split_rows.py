"""Spiky rows in the W8A8 recipe: int16 activations for the whole row (the earlier kernel) against keeping the
row's few largest entries aside in fp32 and quantizing the rest to int8 (the shipped kernel, `spiky_rows` in
int8_x86.py), at several thresholds. A row is spiky when its max |x| exceeds SPIKY_ROW_RATIO (20) x its RMS;
"split t / n": entries above t x RMS are kept aside when there are at most n of them, else the row runs in int16.

The int8 copy's projections run as torch emulations of each variant (the kernel's quantization, in fp32), so the
variants differ in the spiky rows alone; prints min cosine to fp32 on STSBenchmark sentences and on SciFact
passages cut at 256 word pieces, the share of spiky rows, and a histogram of entries above t per spiky row.

    PYTHONPATH=src python benchmarks/int8_research/split_rows.py --sentences 600 --passages 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, cpu_model, min_cosine, scifact_passages, sts_sentences  # noqa: E402

from allmpnet import Encoder  # noqa: E402
from allmpnet.encode.int8_x86 import X86Int8Linear, quantize_rows  # noqa: E402

VARIANTS = [("int16 rows", 0.0, 0), ("split 8 / 8", 8.0, 8), ("split 8 / 16", 8.0, 16), ("split 5 / 16", 5.0, 16),
            ("split 12 / 8 (shipped: 0.6 x 20, MAX_SPLIT 8)", 12.0, 8)]


def emulated(variant: dict, stats: dict):
    """X86Int8Linear.forward as torch fp32 maths, spiky rows treated as `variant` says."""
    def forward(self: X86Int8Linear, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        v = x.float() if self.inverse_smooth is None else x.float() * self.inverse_smooth
        rms = v.pow(2).mean(1, keepdim=True).sqrt()
        spiky = v.abs().amax(1) > self.route * rms[:, 0]
        stats["spiky"] += int(spiky.sum())
        stats["rows"] += v.shape[0]
        q, scale = quantize_rows(v, 8)
        v_hat = q * scale
        if variant["threshold"] == 0:
            routed = spiky
        else:
            above = (v.abs() > variant["threshold"] * rms) & spiky[:, None]
            count = above.sum(1)
            stats["counts"].extend(count[spiky].tolist())
            routed = count > variant["cap"]
            kept = torch.where(above, v, torch.zeros_like(v))
            q, scale = quantize_rows(v - kept, 8)
            split = spiky & ~routed
            v_hat[split] = (q * scale + kept)[split]
        if routed.any():
            q16, scale16 = quantize_rows(v[routed], 16)
            v_hat[routed] = q16 * scale16
        return self.from_activations(v_hat, residual, x.dtype)
    return forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=600)
    parser.add_argument("--passages", type=int, default=32)
    args = parser.parse_args()
    sentences, passages = sts_sentences()[:args.sentences], scifact_passages(args.passages)
    fp32 = Encoder(str(MODEL), device="cpu", precision="fp32", max_seq_length=256)
    reference = fp32.encode(sentences), fp32.encode(passages)
    int8 = Encoder(str(MODEL), device="cpu", precision="int8", max_seq_length=256)
    int8.inference_model().network.encoder.max_tokens = 0  # every batch through the modules (the emulation)
    print(f"# {cpu_model()}; {len(sentences)} STSBenchmark sentences, {len(passages)} SciFact passages (256 pieces)")
    for name, threshold, cap in VARIANTS:
        variant, stats = {"threshold": threshold, "cap": cap}, {"spiky": 0, "rows": 0, "counts": []}
        X86Int8Linear.forward = emulated(variant, stats)
        got = int8.encode(sentences, show_progress_bar=False), int8.encode(passages, show_progress_bar=False)
        histogram = np.bincount(np.minimum(stats["counts"], 20)).tolist() if stats["counts"] else []
        print(f"{name}: min cos {min_cosine(got[0], reference[0]):.5f} / {min_cosine(got[1], reference[1]):.5f}; "
              f"spiky rows {stats['spiky']} of {stats['rows']} ({100 * stats['spiky'] / stats['rows']:.1f}%)"
              + (f"; entries above the threshold per spiky row (0..20+): {histogram}" if histogram else ""),
              flush=True)


if __name__ == "__main__":
    main()
