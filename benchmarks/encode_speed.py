"""Encode speed and quality, every path against the reference in one run.

Paths: sentence-transformers fp32 (the reference) and its bf16 cast; ours fp32; ours bf16 without the inference
copy (plain cast of the padded network: what packing and the oneDNN layers buy); ours bf16; ours int8 (int8
weights on AMX, bf16 maths); ours auto (on AMX CPUs "bf16+int8": bf16, with int8 weights for batches of at most
512 tokens); optionally ONNX Runtime fp32 and int8 exports (--onnx). Workloads: (a) the STSBenchmark
sentences, (b) SciFact abstracts cut at 256 word pieces, (c) one short query at a time (latency p50/p99).
Each tool runs with its own default batching (sentence-transformers batch_size=32; ours the 4,096-token budget)
and encodes each workload once as warm-up before the timed pass. Each path runs in its own process (peak RSS
is per path) and the paths take turns for --reps rounds, so machine load hits them alike; the best round counts.
Quality per path: min cosine to our fp32 vectors and STSBenchmark Spearman x100 on all pairs.
GPU section: with CUDA, sentence-transformers fp16 against ours fp16/bf16 on a random model of the same shape.

    .venv/bin/python benchmarks/encode_speed.py                      # CPU paths, 2 rounds
    .venv/bin/python benchmarks/encode_speed.py --onnx --reps 3
    .venv/bin/python benchmarks/encode_speed.py --stream 100000 --paths ours-bf16   # peak RSS, 100k sentences
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATHS = ["st-fp32", "st-bf16", "ours-fp32", "ours-bf16-plain", "ours-bf16", "ours-int8", "ours-auto"]
ONNX_PATHS = ["onnx-fp32", "onnx-int8"]
PASSAGE_TOKENS = 256
QUERY = "How do I bake bread at home?"


def sts_pairs(data: Path) -> tuple[list[str], list[str], np.ndarray]:
    lines = (data / "STSBenchmark" / "sts.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines if line]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def scifact_passages(data: Path, n: int) -> list[str]:
    out = []
    with open(data / "SciFact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            out.append(f"{doc['title']} {doc['text']}".strip())
            if len(out) == n:
                break
    return out


def peak_rss_mb() -> float:
    # VmHWM is this process image's own peak; getrusage's ru_maxrss would carry over the parent's across exec
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- one path, in its own process


def load_path(name: str, model_dir: str, work: Path, max_len: int):
    """An object with encode(texts) -> (N, 768) float32 for the named path, cutting texts at max_len word pieces."""
    from allmpnet.model import MPNetConfig
    cfg = MPNetConfig.load(model_dir)
    max_len = min(max_len, cfg.max_position_embeddings - cfg.pad_token_id - 1)  # small test models are shorter
    if name.startswith("st-"):
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(model_dir, device="cpu")
        if name == "st-bf16":
            st.to(torch.bfloat16)
        st.max_seq_length = max_len

        class Ref:
            def encode(self, texts):
                return st.encode(texts, batch_size=32, convert_to_numpy=False, convert_to_tensor=True,
                                 show_progress_bar=False).float().numpy()
        return Ref()
    from allmpnet import Encoder
    if name.startswith("onnx-"):
        from allmpnet.export.onnx import OnnxEncoder
        enc = Encoder(model_dir, device="cpu", max_seq_length=max_len)
        graph = work / ("model.onnx" if name == "onnx-fp32" else "model.int8.onnx")
        runner = OnnxEncoder(graph, enc.tokenizer)
        del enc
        return runner
    precision = {"ours-fp32": "fp32", "ours-bf16": "bf16", "ours-bf16-plain": "bf16", "ours-int8": "int8",
                 "ours-auto": "auto"}[name]
    enc = Encoder(model_dir, device="cpu", precision=precision, max_seq_length=max_len)
    if name == "ours-bf16-plain":  # ablation: the same bf16 copy without oneDNN prepacking / fusion
        import dataclasses
        enc.plan = dataclasses.replace(enc.plan, linear="torch", short_attention_kernel=False)

    class Ours:
        def encode(self, texts):
            return enc.encode(texts, show_progress_bar=False)  # our default batching: the token budget
    return Ours()


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def worker(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    work = Path(args.work)
    s1, s2, _ = sts_pairs(DATA)
    sentences = (s1 + s2)[: args.sentences or None]
    passages = scifact_passages(DATA, args.passages)
    result = {"path": args.worker}
    if args.stream:
        model = load_path(args.worker, args.model, work, 384)
        texts = [f"{sentences[i % len(sentences)]} ({i})" for i in range(args.stream)]  # distinct texts
        seconds, vectors = timed(model.encode, texts)
        result.update(stream_texts=len(texts), stream_seconds=seconds, stream_shape=list(vectors.shape))
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    model = load_path(args.worker, args.model, work, 384)
    model.encode(sentences)  # warm-up on the same inputs: first-call allocations, oneDNN kernels for each shape
    result["a_seconds"], vec_a = timed(model.encode, sentences)
    np.save(work / f"{args.worker}.a.npy", vec_a)
    latencies = []
    for i in range(args.queries + 5):
        seconds, _ = timed(model.encode, [QUERY])
        if i >= 5:
            latencies.append(seconds)
    result["latency_ms"] = [1000 * s for s in latencies]
    del model  # one model at a time: peak RSS is the path's, not two copies'
    gc.collect()  # the wrapper classes sit in reference cycles: free the first model before loading the second
    model = load_path(args.worker, args.model, work, PASSAGE_TOKENS)
    model.encode(passages)
    result["b_seconds"], vec_b = timed(model.encode, passages)
    np.save(work / f"{args.worker}.b.npy", vec_b)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------- the parent: rounds, figures, report


def matmul_ceiling_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(3):
        a @ b
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n ** 3 / best / 1e9


def read_bandwidth_gbs(megabytes: int = 1024, reps: int = 5) -> float:
    """Memory read bandwidth with torch's threads: summing a buffer far larger than the caches."""
    buffer = torch.ones(megabytes * 2 ** 20 // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def layer_weight_count(cfg) -> int:
    """Weights of the encoder layers' projections (q, k, v, o, up, down): what a query streams from memory."""
    return cfg.num_hidden_layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)


def flops_per_token(avg_len: float, cfg) -> float:
    """2 x linear-layer weights (the matmuls) + attention scores and mixing, 4 x T x C per layer."""
    return 2 * layer_weight_count(cfg) + cfg.num_hidden_layers * 4 * avg_len * cfg.hidden_size


def spearman_x100(a: np.ndarray, b: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100 * float(spearmanr(cos, gold).statistic)


def run_worker(name: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--model", args.model,
           "--sentences", str(args.sentences), "--passages", str(args.passages), "--queries", str(args.queries),
           "--stream", str(args.stream)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"path {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_section(out) -> None:
    if not torch.cuda.is_available():
        out("GPU: skipped — no CUDA device on this machine (the section runs only where a GPU is present)")
        return
    from sentence_transformers import SentenceTransformer

    from allmpnet import Encoder
    from allmpnet.model import MPNetConfig
    from allmpnet.testing import build_random_model
    model_dir = build_random_model(Path(tempfile.mkdtemp()) / "random-mpnet", cfg=MPNetConfig(), seed=0)
    words = "the a cat dog sun moon plant car search query text world hello test example sentence".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(8, 200)))) for _ in range(4096)]
    out(f"GPU: {torch.cuda.get_device_name()}, random-initialised model of the published shape, "
        f"{len(texts)} texts of 8-200 words")
    st = SentenceTransformer(str(model_dir), device="cuda").half()
    enc = {p: Encoder(model_dir, device="cuda", precision=p) for p in ("fp16", "bf16")}
    tokens = int(enc["fp16"].tokenize(texts).lengths.sum())

    def st_run():
        return st.encode(texts, batch_size=128, convert_to_tensor=True, show_progress_bar=False)
    runs = {"st-fp16": st_run}
    for p, e in enc.items():
        runs[f"ours-{p}"] = lambda e=e: e.encode(texts, batch_size=512, convert_to="torch", show_progress_bar=False)
    best = {}
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best[name] = tokens / min(times)
    for name, tps in best.items():
        out(f"  {name:<10} {tps:>12,.0f} tokens/s  {tps / best['st-fp16']:5.2f}x st-fp16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the verified published weights)")
    parser.add_argument("--paths", nargs="+", default=None, help=f"subset of {PATHS + ONNX_PATHS}")
    parser.add_argument("--onnx", action="store_true", help="also export to ONNX and time ONNX Runtime fp32/int8")
    parser.add_argument("--reps", type=int, default=2, help="rounds; each path's best round is reported")
    parser.add_argument("--sentences", type=int, default=0, help="STS sentences for (a); 0: all (needed for the "
                        "STSBenchmark score)")
    parser.add_argument("--passages", type=int, default=96, help="SciFact abstracts for (b)")
    parser.add_argument("--queries", type=int, default=100, help="single-query calls for (c)")
    parser.add_argument("--stream", type=int, default=0, help="instead: encode this many short sentences per path "
                        "and report peak RSS")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from allmpnet.weights import published_dir
        args.model = str(published_dir())
    if args.worker:
        return worker(args)

    lines: list[str] = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    paths = args.paths or (PATHS + (ONNX_PATHS if args.onnx else []))
    work = Path(tempfile.mkdtemp(prefix="encode_speed_"))
    out(f"encode_speed  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    out(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if any(p.startswith("onnx-") for p in paths):
        from allmpnet import Encoder
        from allmpnet.export.onnx import export_onnx, quantize_int8
        graph = export_onnx(Encoder(args.model, device="cpu"), work)
        quantize_int8(graph)

    if args.stream:
        for name in paths:
            r = run_worker(name, args, work)
            out(f"{name:<16} {r['stream_texts']:,} sentences in {r['stream_seconds']:.0f} s "
                f"({r['stream_texts'] / r['stream_seconds']:,.0f}/s), output {r['stream_shape']}, "
                f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB")
        out(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return

    ceiling = {"fp32": matmul_ceiling_gflops(torch.float32), "bf16": matmul_ceiling_gflops(torch.bfloat16)}

    from allmpnet.encode.tokenizer import TextTokenizer
    from allmpnet.model import MPNetConfig
    cfg = MPNetConfig.load(args.model)
    bandwidth = read_bandwidth_gbs()
    layer_weights = layer_weight_count(cfg)
    out(f"single-query floor: a query reads every layer weight once; bf16 {2 * layer_weights / 1e6:.0f} MB at the "
        f"{bandwidth:.1f} GB/s this run reads from memory = {2 * layer_weights / bandwidth / 1e6:.1f} ms "
        f"(int8: {layer_weights / bandwidth / 1e6:.1f} ms, fp32: {4 * layer_weights / bandwidth / 1e6:.1f} ms)")
    s1, s2, gold = sts_pairs(DATA)
    sentences = (s1 + s2)[: args.sentences or None]
    passages = scifact_passages(DATA, args.passages)
    tok_a = TextTokenizer.from_dir(Path(args.model), 384, cfg.pad_token_id)(sentences).lengths
    tok_b = TextTokenizer.from_dir(Path(args.model), PASSAGE_TOKENS, cfg.pad_token_id)(passages).lengths
    workloads = {"a": (len(sentences), int(tok_a.sum()), flops_per_token(tok_a.mean(), cfg)),
                 "b": (len(passages), int(tok_b.sum()), flops_per_token(tok_b.mean(), cfg))}
    out(f"(a) {len(sentences)} STSBenchmark sentences, {workloads['a'][1]:,} tokens (mean {tok_a.mean():.1f})")
    out(f"(b) {len(passages)} SciFact abstracts cut at {PASSAGE_TOKENS}, {workloads['b'][1]:,} tokens "
        f"(mean {tok_b.mean():.1f})")
    out(f"(c) one query at a time, {args.queries} calls: {QUERY!r}")

    results: dict[str, list[dict]] = {p: [] for p in paths}
    for rep in range(args.reps):
        for name in paths:
            results[name].append(run_worker(name, args, work))
            print(f"  round {rep + 1}/{args.reps}: {name} done", file=sys.stderr, flush=True)

    reference = "st-fp32" if "st-fp32" in paths else paths[0]
    quality_base = "ours-fp32" if "ours-fp32" in paths else reference
    base = {w: np.load(work / f"{quality_base}.{w}.npy") for w in "ab"}
    best = {p: {w: min(r[f"{w}_seconds"] for r in rs) for w in "ab"} for p, rs in results.items()}
    out()
    # measured again after the paths: a burst of load on a shared machine during one measurement would otherwise
    # understate the ceiling (and overstate every path's share of it)
    ceiling = {"fp32": max(ceiling["fp32"], matmul_ceiling_gflops(torch.float32)),
               "bf16": max(ceiling["bf16"], matmul_ceiling_gflops(torch.bfloat16))}
    out(f"matmul ceiling (2048^3, best of before and after the paths): fp32 {ceiling['fp32']:.0f} GFLOP/s, "
        f"bf16 {ceiling['bf16']:.0f} GFLOP/s")
    out(f"best of {args.reps} rounds; ratios against {reference}; ceiling % = achieved FLOP/s over the bf16 matmul "
        f"ceiling above; cosine against {quality_base}")
    header = (f"{'path':<16}{'(a) sent/s':>11}{'tok/s':>8}{'x ref':>7}{'%bf16':>7}   {'(b) pass/s':>10}{'tok/s':>8}"
              f"{'x ref':>7}{'%bf16':>7}   {'(c) p50 ms':>10}{'p99 ms':>8}   {'RSS GB':>7}{'min cos':>10}"
              f"{'STS':>7}")
    out(header)
    out("-" * len(header))
    for name in paths:
        cells = []
        for w in "ab":
            n, tokens, flop = workloads[w]
            tps = tokens / best[name][w]
            ratio = best[reference][w] / best[name][w]
            cells.append(f"{n / best[name][w]:>11.1f}{tps:>8.0f}{ratio:>7.2f}{100 * tps * flop / 1e9 / ceiling['bf16']:>6.0f}%")
        lat = sorted(x for r in results[name] for x in r["latency_ms"])
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rss = max(r["peak_rss_mb"] for r in results[name]) / 1024
        vec = {w: np.load(work / f"{name}.{w}.npy") for w in "ab"}
        cos = min(float(((vec[w] * base[w]).sum(1) / (np.linalg.norm(vec[w], axis=1)
                                                       * np.linalg.norm(base[w], axis=1))).min()) for w in "ab")
        sts = (spearman_x100(vec["a"][: len(s1)], vec["a"][len(s1):], gold) if len(sentences) == 2 * len(s1)
               else float("nan"))
        out(f"{name:<16}{cells[0]}   {cells[1]}   {p50:>10.1f}{p99:>8.1f}   {rss:>7.2f}{cos:>10.5f}{sts:>7.2f}")
    if "ours-auto" in paths:
        from allmpnet.encode.precision import plan_precision
        auto = plan_precision("auto", "cpu").name
        out(f"ours-auto is {auto!r} here" + (": batches of at most 512 tokens, such as (c), run with int8 weights "
                                             "and give ours-int8's vectors; ours-int8's quality columns cover them"
                                             if auto == "bf16+int8" else ""))
    out()
    if not args.no_gpu:
        gpu_section(out)
    out(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
