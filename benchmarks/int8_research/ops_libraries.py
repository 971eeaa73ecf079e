"""Per-op speed of the int8 linear layers that libraries offer on this CPU, against oneDNN bf16 and fp32, on
the model's projection shapes (M rows x K inputs -> N outputs).

Each variant takes a bf16 (or fp32) activation and returns a float activation with the bias added, so the
figures include what an int8 layer has to do around the matmul (quantize the input, dequantize the output);
"raw" rows time the int8 matmul alone on pre-quantized inputs, the ceiling of that library.

    PYTHONPATH=src:/tmp/aolib python benchmarks/int8_research/ops_libraries.py [--compile] [--rows 11,64,...]

torchao (0.18, for its configs and the PT2E quantizer) is imported from PYTHONPATH; without it those rows say
so. --compile adds the torch.compile variants (a compile per shape: minutes).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECTIONS, RESULTS, ROWS, cpu_model, interleaved_best  # noqa: E402

warnings.filterwarnings("ignore")


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127
    return torch.round(x.float() / scale).to(torch.int8), scale


def variants(M: int, K: int, N: int, with_compile: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g) * 0.1
    x = torch.randn(M, K, generator=g)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    fns = {}
    fns["fp32 F.linear"] = lambda: F.linear(x, w, b)
    packed_bf16 = torch.ops.mkldnn._reorder_linear_weight(wb, 1024)
    fns["bf16 oneDNN prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(xb, packed_bf16, bb, "none", [],
                                                                               "")
    ws = w.abs().amax(1) / 127
    wq = torch.round(w / ws[:, None]).to(torch.int8)
    wqt = wq.t().contiguous()
    xq, xs = per_token_int8(x)
    fns["_int_mm raw"] = lambda: torch._int_mm(xq, wqt)

    def int_mm_full():
        q, s = per_token_int8(xb)
        return (torch._int_mm(q, wqt).float() * s * ws + b).bfloat16()
    fns["_int_mm + per-token quant, eager"] = int_mm_full

    qw = torch.ops.onednn.qlinear_prepack(wq, [M, K])
    zeros = torch.zeros(N, dtype=torch.int64)
    xs_t = float(x.abs().amax() / 127)
    xq_t = torch.round(x / xs_t).clamp(-127, 127).to(torch.int8)
    fns["onednn qlinear raw (per-tensor s8)"] = lambda: torch.ops.onednn.qlinear_pointwise(
        xq_t, xs_t, 0, qw, ws, zeros, b, 1.0, 0, torch.bfloat16, "none", [], "")

    def onednn_full():
        s = float(xb.abs().amax()) / 127
        q = torch.round(xb.float() / s).to(torch.int8)
        return torch.ops.onednn.qlinear_pointwise(q, s, 0, qw, ws, zeros, b, 1.0, 0, torch.bfloat16, "none", [],
                                                  "")
    fns["onednn qlinear + per-tensor quant"] = onednn_full

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        layer = torch.nn.Linear(K, N).bfloat16()
        layer.weight.data.copy_(wb)
        layer.bias.data.copy_(bb)
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        fns["torchao int8dyn (per-token) eager"] = lambda: layer(xb)
        if with_compile:
            compiled = torch.compile(layer)
            fns["torchao int8dyn compiled"] = lambda: compiled(xb)
    except ImportError as error:
        print(f"  torchao: {error}")
    if with_compile:
        fns.update(pt2e_variants(w, b, x))
    return fns


def pt2e_variants(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> dict:
    """PyTorch 2 export quantization, X86InductorQuantizer, frozen and compiled: dynamic (per-tensor scale per
    call) and static (calibrated on x itself: the best case for static)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    out = {}
    for name, dynamic in (("pt2e x86 dynamic, compiled", True), ("pt2e x86 static, compiled", False)):
        layer = torch.nn.Linear(w.shape[1], w.shape[0])
        layer.weight.data.copy_(w)
        layer.bias.data.copy_(b)
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
        with torch.no_grad():
            graph = torch.export.export(layer.eval(), (x,)).module()
            graph = prepare_pt2e(graph, quantizer)
            graph(x)
            graph = convert_pt2e(graph)
            compiled = torch.compile(graph)
            compiled(x)

        def run(compiled=compiled):
            with torch.no_grad():
                return compiled(x)
        out[name] = run
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "ops_libraries.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = [f"# int8 linear ops from libraries: {cpu_model()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}", "",
             "GOP/s (2 M K N / time) and speed relative to oneDNN bf16 (x); best of interleaved rounds", ""]
    print("\n".join(lines))
    for M in map(int, args.rows.split(",")):
        for proj, (K, N) in PROJECTIONS.items():
            with torch.no_grad():
                fns = variants(M, K, N, args.compile)
                best = interleaved_best(fns, rounds=args.rounds)
            base = best["bf16 oneDNN prepacked"]
            header = f"## M={M} {proj} {K}->{N}"
            rows = [header, "", "| variant | us | GOP/s | vs bf16 |", "|---|---|---|---|"]
            for name, t in best.items():
                rows.append(f"| {name} | {t * 1e6:.0f} | {2 * M * K * N / t / 1e9:.0f} | {base / t:.2f}x |")
            print("\n".join(rows) + "\n", flush=True)
            lines += rows + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
