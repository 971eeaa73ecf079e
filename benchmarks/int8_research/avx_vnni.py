"""What W8A8 on 256-bit VNNI gives a CPU with AVX2 and AVX-VNNI but no AVX-512 (Alder Lake, Sierra Forest), run
on an AVX512-VNNI CPU: the kernel `avxvnni-a8` needs AVX-VNNI's VEX encoding, which Zen 4 lacks, so its code runs
here as `vnni256-a8` (the same source with AVX512-VNNI's encoding of the same 256-bit instruction). The plans are
built from capabilities passed in, as on such a CPU: fp32 activations (no native bf16), torch's attention, and
before this kernel, int16 activations (`avx2-a16`). Each path's encoder is built once; every round times each on
the same texts in turn (the machine's drift hits them alike). Run with oneDNN held to AVX2 as well:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=src \\
        python benchmarks/int8_research/avx_vnni.py [--rounds 6] [--sentences 1000] [--passages 32]

Prints tokens/s per path and workload (median round), a single query's p50, min cosine to ours fp32 and
STSBenchmark Spearman (the first n // 2 pairs) per path; appends the table to --out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, RESULTS, cpu_model, min_cosine, scifact_passages, sts_rows, sts_spearman  # noqa: E402

from allmpnet import Encoder  # noqa: E402
from allmpnet.encode.fused_x86 import pick_fp32_kernel  # noqa: E402
from allmpnet.encode.kernels import cpu_flags  # noqa: E402
from allmpnet.encode.precision import Capabilities, limit_isa, plan_precision  # noqa: E402


def avx2_capabilities(int8_kernel: str, extra_flags: frozenset[str] = frozenset()) -> Capabilities:
    flags = limit_isa(frozenset(cpu_flags()), "avx2") | extra_flags
    return Capabilities("cpu", flags, frozenset({"fp32"}), amx_kernels="no AMX", x86_kernels=frozenset({int8_kernel}),
                        fp32_fused_kernel=pick_fp32_kernel(flags), x86_attention=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--passages", type=int, default=32)
    parser.add_argument("--queries", type=int, default=20, help="single queries per path and round")
    parser.add_argument("--out", type=Path, default=RESULTS / "avx_vnni.md")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    first, second, _ = sts_rows()
    pairs = args.sentences // 2
    sentences = first[:pairs] + second[:pairs]
    passages = scifact_passages(args.passages)
    int16 = avx2_capabilities("avx2-a16")
    vnni = avx2_capabilities("vnni256-a8", frozenset({"avx_vnni"}))
    plans = {"ours fp32": plan_precision("fp32", "cpu", int16),
             "int8, int16 activations (avx2-a16)": plan_precision("int8", "cpu", int16),
             "int8, W8A8 on 256-bit VNNI (vnni256-a8 for avxvnni-a8)": plan_precision("int8", "cpu", vnni)}
    lines = [f"\n## {cpu_model()}: plans as on an AVX2 CPU with AVX-VNNI; {len(sentences)} STSBenchmark sentences, "
             f"{len(passages)} SciFact passages (256 word pieces), {args.rounds} rounds\n"]
    lines += [f"- {name}: {plan.describe()}" for name, plan in plans.items()]
    print("\n".join(lines), flush=True)
    encoders = {}
    for name, plan in plans.items():
        encoders[name] = {"a": Encoder(str(MODEL), device="cpu", precision=plan),
                          "b": Encoder(str(MODEL), device="cpu", precision=plan, max_seq_length=256)}
    workloads = {"a": sentences, "b": passages}
    tokens = {w: int(encoders["ours fp32"][w].tokenize(texts).lengths.sum()) for w, texts in workloads.items()}
    vectors = {name: {w: e[w].encode(workloads[w], show_progress_bar=False) for w in "ab"}  # warm-up, kept
               for name, e in encoders.items()}
    seconds = {name: {w: [] for w in "ab"} for name in encoders}
    query = {name: [] for name in encoders}
    for round_ in range(args.rounds):
        order = list(encoders) if round_ % 2 == 0 else list(encoders)[::-1]
        for name in order:
            for w in "ab":
                start = time.perf_counter()
                encoders[name][w].encode(workloads[w], show_progress_bar=False)
                seconds[name][w].append(time.perf_counter() - start)
            for _ in range(args.queries):
                start = time.perf_counter()
                encoders[name]["a"].encode(["How do I bake bread at home?"], show_progress_bar=False)
                query[name].append(time.perf_counter() - start)
    base = vectors["ours fp32"]
    lines += ["", "| path | sentences tok/s | passages tok/s | vs fp32 | query p50 | min cos sentences | "
              f"min cos passages | STSB Spearman ({pairs} pairs) |", "|---|---|---|---|---|---|---|---|"]
    for name in encoders:
        rate = {w: tokens[w] / statistics.median(seconds[name][w]) for w in "ab"}
        fp32 = {w: tokens[w] / statistics.median(seconds["ours fp32"][w]) for w in "ab"}
        a = vectors[name]["a"]
        spearman = sts_spearman(a, pairs)
        lines.append(f"| {name} | {rate['a']:,.0f} | {rate['b']:,.0f} | {rate['a'] / fp32['a']:.2f}x / "
                     f"{rate['b'] / fp32['b']:.2f}x | {1000 * statistics.median(query[name]):.1f} ms | "
                     f"{min_cosine(a, base['a']):.5f} | {min_cosine(vectors[name]['b'], base['b']):.5f} | "
                     f"{spearman:.2f} |")
    print("\n".join(lines[-len(encoders) - 3:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")



if __name__ == "__main__":
    main()
