"""A/B of source variants of our x86 kernels in one process: each variant is kernels_x86.c with text replaced,
compiled beside the others, and every round calls each in turn on the same layers (30 distinct projections,
768 -> 3072 unless --shape says otherwise, so a few rows stream the weights from memory as in the model; fp32
activations unless --bf16). The machine's drift then hits every variant alike. Prints the weight-streaming rate
(GB/s) and GOP/s per row count. `attention` in place of the kernel times allmpnet_x86_attention instead, on bf16
blocks (--blocks, e.g. 16x256) with bf16 pair products: median and fastest sample per variant (a sample: the
mean of 3 calls in a row; a lone call, right after another library's, ran ~2x slower), how often each beat the
first variant, and its largest difference from the first one's output.

    PYTHONPATH=src python benchmarks/int8_research/kernel_variants.py vnni-a8 base: \\
        "near:#define PREFETCH 16384=>#define PREFETCH 2048 && #define PREFETCH_HINT _MM_HINT_T1=>#define PREFETCH_HINT _MM_HINT_T0" \\
        --rows 2,9,16,512,2048 [--form plain|gelu|residual] [--shape 3072x768] [--bf16] [--rounds 10]
    git show HEAD:src/allmpnet/encode/kernels_x86.c > /tmp/old.c
    PYTHONPATH=src python benchmarks/int8_research/kernel_variants.py amx-a8 new: old@/tmp/old.c: \\
        --rows 1024,4096 --form gelu --bf16 --rounds 10
    PYTHONPATH=src python benchmarks/int8_research/kernel_variants.py attention base: \\
        "exp6:exp_nonpositive16_for_bf16(=>exp_nonpositive16( && (__m256i)_mm512_cvtneps_pbh(e)=>bf16_round16(e)"

A variant is NAME:OLD=>NEW[ && OLD=>NEW ...] (NAME: alone is the source as it is; NAME@FILE: starts from another
version of the source, FILE, as the second example does).
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
    name, _, path = name.partition("@")  # NAME@FILE: another version of the source (e.g. from `git show`)
    text = Path(path).read_text() if path else int8_x86.SOURCE.read_text()
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
    for function in ("allmpnet_x86_linear", "allmpnet_x86_attention"):
        getattr(loaded, function).argtypes = getattr(reference, function).argtypes
        getattr(loaded, function).restype = ctypes.c_int64
    return loaded


def compare_attention(libraries: dict[str, ctypes.CDLL], shapes: str, rounds: int = 60) -> None:
    """Each variant's attention on the same bf16 blocks of 12 heads of 64, in turns."""
    heads, C = 12, 768
    threads = torch.get_num_threads()
    for shape in shapes.split(","):
        blocks, T = (int(n) for n in shape.split("x"))
        torch.manual_seed(0)
        qkv = (2 * torch.randn(blocks * T, 3 * C)).bfloat16()
        bias = torch.randn(heads, T, T) * 0.5
        outs = {name: torch.empty(blocks * T, C, dtype=torch.bfloat16) for name in libraries}
        scratch = torch.empty(int8_x86._library()[0].allmpnet_x86_attention_scratch_bytes(T, threads),
                              dtype=torch.uint8)

        def run(name: str, calls: int = 3) -> float:
            start = time.perf_counter()
            for _ in range(calls):
                code = libraries[name].allmpnet_x86_attention(qkv.data_ptr(), 1, outs[name].data_ptr(),
                                                              bias.data_ptr(), 0.125, 0, blocks, T, heads, 1,
                                                              scratch.data_ptr(), threads)
                if code < 0:  # else the products it used: 1, the pair products asked for
                    raise SystemExit(f"variant {name}: allmpnet_x86_attention returned {code}")
            return (time.perf_counter() - start) / calls

        times = {name: [] for name in libraries}
        for name in libraries:
            run(name)
        for round_ in range(rounds):
            for name in (list(libraries) if round_ % 2 == 0 else list(libraries)[::-1]):
                times[name].append(run(name))
        first = next(iter(libraries))
        print(f"# attention, {blocks} x {T} tokens, 12 heads, bf16, {threads} threads")
        for name, t in times.items():
            wins = sum(b < a for a, b in zip(times[first], t))
            difference = (outs[name].float() - outs[first].float()).abs().max().item()
            print(f"{name}: median {1e3 * statistics.median(t):.2f} ms, fastest {1e3 * min(t):.2f} ms, faster than "
                  f"{first} in {wins}/{rounds}, max |difference| {difference:.2e}")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kernel", choices=sorted(KERNELS) + ["attention"])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rows", default="2,9,16,512,2048")
    parser.add_argument("--form", choices=["plain", "gelu", "residual"], default="plain")
    parser.add_argument("--rounds", type=int, help="rounds per row count (default 40 under 100 rows, else 4)")
    parser.add_argument("--bf16", action="store_true", help="bf16 inputs, residual and outputs (as the model's)")
    parser.add_argument("--shape", default="768x3072", help="inputs x outputs of the layers")
    parser.add_argument("--blocks", default="16x256,128x32", help="attention: blocks x tokens, comma-separated")
    args = parser.parse_args()
    K, N = (int(n) for n in args.shape.split("x"))
    count = 30
    with tempfile.TemporaryDirectory() as folder:
        libraries = {}
        for variant in args.variants:
            name, _, substitutions = variant.partition(":")
            libraries[name.partition("@")[0]] = build(name, substitutions, Path(folder))
        if args.kernel == "attention":
            return compare_attention(libraries, args.blocks)
        torch.manual_seed(0)
        layers = [X86Int8Linear(torch.randn(N, K) * 0.05, torch.zeros(N), small=args.kernel, large=args.kernel)
                  for _ in range(count)]
        weight_bytes = sum(layer.packed.numel() for layer in layers)
        kernel = KERNELS[args.kernel].id
        bias = torch.randn(N)
        print(f"# {args.kernel}, {args.form}, {count} x ({K} -> {N}), {'bf16' if args.bf16 else 'fp32'} activations, "
              f"{torch.get_num_threads()} threads")
        for M in (int(r) for r in args.rows.split(",")):
            dtype = torch.bfloat16 if args.bf16 else torch.float32
            x, y, residual = torch.randn(M, K).to(dtype), torch.empty(M, N, dtype=dtype), torch.randn(M, N).to(dtype)
            scratch = torch.empty(int8_x86._library()[0].allmpnet_x86_scratch_bytes(kernel, M, K, 2),
                                  dtype=torch.uint8)

            def run(library: ctypes.CDLL) -> float:
                start = time.perf_counter()
                for layer in layers:
                    library.allmpnet_x86_linear(
                        kernel, x.data_ptr(), int(args.bf16), None, layer.packed.data_ptr(), layer.scales.data_ptr(),
                        layer.compensation.data_ptr(), layer.group,
                        None if args.form == "plain" else bias.data_ptr(),
                        residual.data_ptr() if args.form == "residual" else None, y.data_ptr(), int(args.bf16), M, N, K,
                        int(args.form == "gelu"), 0.0, scratch.data_ptr(), torch.get_num_threads())
                return time.perf_counter() - start

            times = {name: [] for name in libraries}
            for _ in range(args.rounds or (40 if M < 100 else 4)):
                for name, library in libraries.items():
                    times[name].append(run(library))
            print(f"rows {M}: " + "  ".join(
                f"{name} {weight_bytes / statistics.median(t) / 1e9:.1f} GB/s {2 * M * weight_bytes / min(t) / 1e9:.0f}"
                f" GOP/s" for name, t in times.items()))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
