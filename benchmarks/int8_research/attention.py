"""Our x86 attention kernel (attention_x86.py) against torch's SDPA on the packed layouts the encoder gives it:
q|k|v as one (N, 3C) matrix, blocks of T tokens, 12 heads of 64, position bias (H, T, T); time, GFLOP/s and the
largest error against SDPA in fp32.

    PYTHONPATH=src python benchmarks/int8_research/attention.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from allmpnet.encode.attention_x86 import HEAD_DIM, attention_unavailable, block_attention, reference
from allmpnet.encode.kernels import cpu_flags

SHAPES = [(16, 256), (8, 384), (40, 96), (128, 32), (3, 13), (1, 9)]  # (blocks, tokens)


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    why = attention_unavailable()
    if why:
        raise SystemExit(f"the kernel cannot run here: {why}")
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    flags = cpu_flags()
    print(f"# attention, ours vs SDPA: {model}, {torch.get_num_threads()} threads, "
          f"avx512_bf16={'avx512_bf16' in flags}, amx_bf16={'amx_bf16' in flags}\n")
    print("ours: the products it used for bf16 blocks (PRODUCTS: amx tiles, bf16 pair dot products, fp32 FMAs)\n")
    print("| blocks x tokens | dtype | ours | SDPA ms | ours ms | ours / SDPA | SDPA GFLOP/s | ours GFLOP/s | SDPA err "
          "| ours err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    H = 12
    for blocks, tokens in SHAPES:
        for dtype, products in ((torch.bfloat16, "amx"), (torch.bfloat16, "bf16"), (torch.bfloat16, "fp32"),
                                (torch.float32, "fp32")):
            generator = torch.Generator().manual_seed(tokens)
            qkv = torch.randn(blocks * tokens, 3 * H * HEAD_DIM, generator=generator).to(dtype)
            bias = torch.randn(H, tokens, tokens, generator=generator)
            ours_out, sdpa_out = (torch.empty(blocks * tokens, H * HEAD_DIM, dtype=dtype) for _ in range(2))
            used = block_attention(qkv, ours_out, bias, 0, blocks, tokens, H, products)
            if used != products:
                continue  # this CPU lacks those products: the row would repeat another

            def ours():
                block_attention(qkv, ours_out, bias, 0, blocks, tokens, H, products)

            def sdpa():
                q, k, v = qkv.view(blocks, tokens, 3, H, HEAD_DIM).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype)[None])
                sdpa_out.view(blocks, tokens, H, HEAD_DIM).copy_(y.transpose(1, 2))

            with torch.inference_mode():
                repeats = 5 if tokens >= 64 else 50
                t_sdpa, t_ours = best_seconds(sdpa, repeats), best_seconds(ours, repeats)
                exact = reference(qkv, bias, 0, blocks, tokens, H)
                err_sdpa = (sdpa_out.float() - exact).abs().max().item()
                err_ours = (ours_out.float() - exact).abs().max().item()
            flops = 4 * blocks * H * tokens * tokens * HEAD_DIM
            print(f"| {blocks} x {tokens} | {str(dtype)[6:]} | {used} | {t_sdpa * 1e3:.2f} | {t_ours * 1e3:.2f} | "
                  f"{t_ours / t_sdpa:.2f} | {flops / t_sdpa / 1e9:.0f} | {flops / t_ours / 1e9:.0f} | "
                  f"{err_sdpa:.1e} | {err_ours:.1e} |")


if __name__ == "__main__":
    main()
