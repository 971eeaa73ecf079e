"""A/B of source variants of our x86 kernels in one process: each variant is kernels_x86.c with text replaced,
compiled beside the others, and every round calls each in turn on the same layers (30 distinct 768 -> 3072
projections, so a few rows stream the weights from memory as in the model). The machine's drift then hits every
variant alike. Prints the weight-streaming rate (GB/s) and GOP/s per row count.

    PYTHONPATH=src python benchmarks/int8_research/kernel_variants.py vnni-a8 base: \\
        "near:#define PREFETCH 16384=>#define PREFETCH 2048 && #define PREFETCH_HINT _MM_HINT_T1=>#define PREFETCH_HINT _MM_HINT_T0" \\
        --rows 2,9,16,512,2048 [--form plain|gelu|residual]

A variant is NAME:OLD=>NEW[ && OLD=>NEW ...] (NAME: alone is the source as it is).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from allmpnet.encode import int8_x86
from allmpnet.encode.int8_x86 import KERNELS, X86Int8Linear


def build(name: str, substitutions: str, folder: Path) -> ctypes.CDLL:
    text = int8_x86.SOURCE.read_text()
    for change in filter(None, substitutions.split(" && ")):
        old, new = change.split("=>")
        if old not in text:
            raise SystemExit(f"variant {name}: {old!r} is not in the source")
        text = text.replace(old, new)
    source, library = folder / f"{name}.c", folder / f"{name}.so"
    source.write_text(text)
    include = f"-I{int8_x86.SOURCE.parent}"  # the headers beside the source (simd_math.h)
    run = subprocess.run(["gcc", *int8_x86.COMPILE_FLAGS, include, str(source), "-o", str(library)],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"variant {name} does not build:\n{run.stderr[-2000:]}")
    loaded = ctypes.CDLL(str(library))
    reference = int8_x86._library()[0]
    loaded.allmpnet_x86_linear.argtypes = reference.allmpnet_x86_linear.argtypes
    loaded.allmpnet_x86_linear.restype = ctypes.c_int64
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rows", default="2,9,16,512,2048")
    parser.add_argument("--form", choices=["plain", "gelu", "residual"], default="plain")
    args = parser.parse_args()
    N, K, count = 3072, 768, 30
    with tempfile.TemporaryDirectory() as folder:
        libraries = {}
        for variant in args.variants:
            name, _, substitutions = variant.partition(":")
            libraries[name] = build(name, substitutions, Path(folder))
        torch.manual_seed(0)
        layers = [X86Int8Linear(torch.randn(N, K) * 0.05, torch.zeros(N), small=args.kernel, large=args.kernel)
                  for _ in range(count)]
        weight_bytes = sum(layer.packed.numel() for layer in layers)
        kernel = KERNELS[args.kernel].id
        bias = torch.randn(N)
        print(f"# {args.kernel}, {args.form}, {count} x ({K} -> {N}), {torch.get_num_threads()} threads")
        for M in (int(r) for r in args.rows.split(",")):
            x, y, residual = torch.randn(M, K), torch.empty(M, N), torch.randn(M, N)
            scratch = torch.empty(int8_x86._library()[0].allmpnet_x86_scratch_bytes(kernel, M, K, 2),
                                  dtype=torch.uint8)

            def run(library: ctypes.CDLL) -> float:
                start = time.perf_counter()
                for layer in layers:
                    library.allmpnet_x86_linear(
                        kernel, x.data_ptr(), 0, None, layer.packed.data_ptr(), layer.scales.data_ptr(),
                        layer.compensation.data_ptr(), layer.group,
                        None if args.form == "plain" else bias.data_ptr(),
                        residual.data_ptr() if args.form == "residual" else None, y.data_ptr(), 0, M, N, K,
                        int(args.form == "gelu"), 0.0, scratch.data_ptr(), torch.get_num_threads())
                return time.perf_counter() - start

            times = {name: [] for name in libraries}
            for _ in range(40 if M < 100 else 4):
                for name, library in libraries.items():
                    times[name].append(run(library))
            print(f"rows {M}: " + "  ".join(
                f"{name} {weight_bytes / statistics.median(t) / 1e9:.1f} GB/s {2 * M * weight_bytes / min(t) / 1e9:.0f}"
                f" GOP/s" for name, t in times.items()))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
