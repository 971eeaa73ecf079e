"""W8A8 on AMX-int8 (`amx-a8`) against the same W8A8 on AVX512-VNNI (`vnni-a8`) and oneDNN's bf16 linear (AMX
tiles: what `bf16` and `bf16+int8` run), per projection of the model and batch size, in one process taking turns.

The int8 layers carry the shipped recipe's shape of work: SmoothQuant factors, spiky-row routing, bias and GELU
or the residual add in the epilogue; the oneDNN layer its fused bias / GELU / residual. Each figure is GOP/s
(2 M N K per call) of the fastest call seen (`common.interleaved_best`); the two int8 kernels' outputs are also
compared (they must be equal to the bit). On a CPU without AMX-int8 it says so and stops.

    PYTHONPATH=src python benchmarks/int8_research/amx_int8.py --rounds 10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECTIONS, cpu_model, interleaved_best  # noqa: E402

from allmpnet.encode.inference import PackedLinear  # noqa: E402
from allmpnet.encode.int8_x86 import SPIKY_ROW_RATIO, X86Int8Linear, _library, kernel_unavailable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[13, 100, 512, 4096])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    why = kernel_unavailable("amx-a8") or kernel_unavailable("vnni-a8")
    if why:
        raise SystemExit(f"amx-a8 / vnni-a8 cannot run here: {why}")
    library = _library()[0]
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; GOP/s of the fastest call, {args.rounds} rounds")
    print(f"{'projection':<10} {'rows':>5} {'amx-a8':>8} {'vnni-a8':>8} {'onednn bf16':>12}  amx/bf16  equal")
    g = torch.Generator().manual_seed(0)
    for name, (K, N) in PROJECTIONS.items():
        activation = "gelu" if name == "up" else "none"
        weight, bias = torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
        smooth = None if name == "down" else torch.rand(K, generator=g) + 0.5
        layer = X86Int8Linear(weight, bias, activation, small="vnni-a8", large="amx-a8", smooth=smooth,
                              route=SPIKY_ROW_RATIO)
        onednn = PackedLinear(weight.bfloat16(), bias.bfloat16(), activation)
        for M in args.rows:
            x = torch.randn(M, K, generator=g).bfloat16()
            residual = torch.randn(M, N, generator=g).bfloat16() if name in ("o", "down") else None
            equal = torch.equal(layer.run(library, "amx-a8", x, residual), layer.run(library, "vnni-a8", x, residual))
            best = interleaved_best({
                "amx-a8": lambda: layer.run(library, "amx-a8", x, residual),
                "vnni-a8": lambda: layer.run(library, "vnni-a8", x, residual),
                "onednn": lambda: onednn(x, residual)}, rounds=args.rounds)
            rate = {k: 2 * M * N * K / t / 1e9 for k, t in best.items()}
            print(f"{name:<10} {M:>5} {rate['amx-a8']:>8.0f} {rate['vnni-a8']:>8.0f} {rate['onednn']:>12.0f}"
                  f"  {rate['amx-a8'] / rate['onednn']:>7.2f}x  {equal}", flush=True)


if __name__ == "__main__":
    main()
