"""Per-op speed of our x86 int8 kernels (src/allmpnet/encode/kernels_x86.c) against oneDNN bf16, fp32 and
torch._int_mm, on the model's projection shapes; and a single query's 48 projections with distinct weights (so
they stream from memory as in the model) against the int8 weight-streaming floor.

    PYTHONPATH=src python benchmarks/int8_research/ops_ours.py [--rows 11,64,512,2048,4096] [--query-only]
    PYTHONPATH=src python benchmarks/int8_research/ops_ours.py --kernels avx2-a16,avx2-f32 --query-only

Ours take bf16 input and give bf16 output with the bias added (as our bf16 path's oneDNN layers), quantizing
the activations inside the call where the kernel needs it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import PROJECTIONS, RESULTS, ROWS, cpu_model, interleaved_best  # noqa: E402
from encode_speed import read_bandwidth_gbs  # noqa: E402

from allmpnet.encode.int8_x86 import KERNELS, X86Int8Linear, kernel_unavailable  # noqa: E402


def runnable(names: list[str]) -> list[str]:
    out = []
    for name in names:
        why = kernel_unavailable(name)
        if why:
            print(f"  skipping {name}: {why}")
        else:
            out.append(name)
    return out


def op_table(M: int, K: int, N: int, kernels: list[str]) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g) * 0.1
    x = torch.randn(M, K, generator=g)
    xb = x.bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1024)
    bb = b.bfloat16()
    fns = {"fp32 F.linear": lambda: F.linear(x, w, b),
           "bf16 oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, bb, "none", [], "")}
    wq = torch.round(w / (w.abs().amax(1, keepdim=True) / 127)).to(torch.int8).t().contiguous()
    xq = torch.round(x / (x.abs().amax(1, keepdim=True) / 127)).to(torch.int8)
    fns["_int_mm raw"] = lambda: torch._int_mm(xq, wq)
    for name in kernels:
        layer = X86Int8Linear(w, b, small=name, large=name)
        fns[f"ours {name}"] = (lambda layer=layer: layer(xb))
    return interleaved_best(fns)


def query_projections(kernels: list[str], rows: int = 11, rounds: int = 30) -> dict[str, float]:
    """Seconds for a query's 48 projections (12 layers x qkv, o, up, down; distinct weights, so each streams
    from memory as in the model). The machine is shared: each projection is timed on its own in every round
    (the other 47 run in between, evicting its weights from cache), and the sum of each one's best round counts."""
    g = torch.Generator().manual_seed(0)
    shapes = [PROJECTIONS[p] for p in ("qkv", "o", "up", "down")] * 12
    weights = [(torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g) * 0.1) for K, N in shapes]
    xs = {K: torch.randn(rows, K, generator=g) for K in (768, 3072)}
    paths = {"fp32 F.linear": [(lambda w=w, b=b, x=xs[w.shape[1]]: F.linear(x, w, b)) for w, b in weights]}
    bf16 = [(torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1024), b.bfloat16()) for w, b in weights]
    paths["bf16 oneDNN"] = [(lambda p=p, b=b, x=xs[p.shape[1]].bfloat16():
                             torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")) for p, b in bf16]
    for name in kernels:
        layers = [X86Int8Linear(w, b, small=name, large=name) for w, b in weights]
        paths[f"ours {name}"] = [(lambda l=l, x=xs[l.in_features].bfloat16(): l(x)) for l in layers]
        if name == "vnni-a8":  # with the <s> / </s> rows routed to int16, as the W8A8 recipe runs a query
            routed = [X86Int8Linear(w, b, small=name, large=name, route=20.0) for w, b in weights]
            spiky = {K: x.clone() for K, x in xs.items()}
            for x in spiky.values():
                x[[0, -1], 5] = 100.0
            paths["ours vnni-a8, 2 rows routed"] = [(lambda l=l, x=spiky[l.in_features].bfloat16(): l(x))
                                                    for l in routed]
    best = {name: [float("inf")] * len(calls) for name, calls in paths.items()}
    for _ in range(rounds):
        for name, calls in paths.items():
            for i, call in enumerate(calls):
                start = time.perf_counter()
                call()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) for name, times in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--query-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    kernels = runnable(args.kernels.split(","))
    lines = [f"# our x86 int8 kernels: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             ""]
    weight_bytes = 12 * sum(K * N for K, N in PROJECTIONS.values())
    bandwidth = read_bandwidth_gbs()
    floor = weight_bytes / bandwidth / 1e9
    query = query_projections(kernels)
    lines += [f"## a query's 48 projections (11 rows, distinct weights), sum of each one's best of 30 rounds",
              f"int8 weights {weight_bytes / 1e6:.0f} MB, read bandwidth {bandwidth:.1f} GB/s: floor "
              f"{floor * 1e3:.2f} ms", "", "| path | ms | vs bf16 | vs fp32 | x floor |", "|---|---|---|---|---|"]
    for name, t in query.items():
        lines.append(f"| {name} | {t * 1e3:.2f} | {query['bf16 oneDNN'] / t:.2f}x | "
                     f"{query['fp32 F.linear'] / t:.2f}x | {t / floor:.2f} |")
    lines.append("")
    print("\n".join(lines), flush=True)
    if not args.query_only:
        for M in map(int, args.rows.split(",")):
            for proj, (K, N) in PROJECTIONS.items():
                with torch.no_grad():
                    best = op_table(M, K, N, kernels)
                base = best["bf16 oneDNN"]
                rows = [f"## M={M} {proj} {K}->{N}", "", "| variant | us | GOP/s | vs bf16 |", "|---|---|---|---|"]
                for name, t in best.items():
                    rows.append(f"| {name} | {t * 1e6:.0f} | {2 * M * K * N / t / 1e9:.0f} | {base / t:.2f}x |")
                print("\n".join(rows) + "\n", flush=True)
                lines += rows + [""]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
