"""Encode speed and quality: our paths against the tools a speed-seeking user picks, in one run.

Paths (benchmarks/speed_paths.py): sentence-transformers fp32 (the reference) and bf16; its ONNX Runtime backend in
fp32 and dynamic int8; its OpenVINO backend at OpenVINO's default precision, in fp32 and static int8 (NNCF);
fastembed; ours fp32, bf16, int8 and auto; our ONNX export run by ONNX Runtime in fp32 and as our int8 graph
(`allmpnet export onnx --int8`, beside sentence-transformers' dynamic int8 export). Peers run in their own venvs (`--setup-peers` makes them). A path this
machine cannot run is skipped with the reason, never a crash.
Workloads: (a) the STSBenchmark sentences, (b) SciFact abstracts cut at 256 word pieces, (c) one short query at a
time (latency p50/p99). Each tool uses its own default batching (sentence-transformers and fastembed 32 texts;
ours the token budget) and encodes each workload once as warm-up before the timed pass. Each path runs in its own
process (peak RSS is per path) and the paths take turns for --reps rounds, so machine load hits them alike; the
best round counts. Quality per path: min cosine to our fp32 vectors on (a) and on (b), and STSBenchmark Spearman
x100 on all pairs. Machine figures in the same run: matmul ceilings (fp32, bf16, int8), memory read bandwidth, and
the single-query floor (layer weights over the read bandwidth measured right before ours-auto's runs; it is
read before every path's, and the range is printed). GPU section: with CUDA, sentence-transformers fp16 against
ours fp16/bf16 on a random model of the published shape.

    .venv/bin/python benchmarks/encode_speed.py --setup-peers                 # once: the peers' venvs
    .venv/bin/python benchmarks/encode_speed.py --reps 2 --out benchmarks/results/encode_speed_<cpu>.txt
    .venv/bin/python benchmarks/encode_speed.py --paths st-fp32 ours-fp32 ours-auto
    ONEDNN_MAX_CPU_ISA=AVX2 ALLMPNET_MAX_ISA=avx2 .venv/bin/python benchmarks/encode_speed.py --paths st-fp32 ours-fp32 ours-auto
    .venv/bin/python benchmarks/encode_speed.py --stream 100000 --paths ours-auto   # peak RSS, 100k sentences
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_paths import PATHS, load_path, peer_versions, prepare, setup_peers, unavailable, venv_python  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PASSAGE_TOKENS = 256
QUERY = "How do I bake bread at home?"
QUALITY_BASE = "ours-fp32"


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
        model = load_path(args.worker, args.model, 384)
        texts = [f"{sentences[i % len(sentences)]} ({i})" for i in range(args.stream)]  # distinct texts
        seconds, vectors = timed(model.encode, texts)
        result.update(stream_texts=len(texts), stream_seconds=seconds, stream_shape=list(vectors.shape))
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    model = load_path(args.worker, args.model, 384)
    model.encode(sentences)  # warm-up on the same inputs: first-call allocations, kernels for each shape
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
    model = load_path(args.worker, args.model, PASSAGE_TOKENS)
    model.encode(passages)
    result["b_seconds"], vec_b = timed(model.encode, passages)
    np.save(work / f"{args.worker}.b.npy", vec_b)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def run_in_venv(name: str, extra: list[str], args: argparse.Namespace, work: Path) -> str:
    cmd = [str(venv_python(PATHS[name][0] if name in PATHS else name)), __file__, "--work", str(work),
           "--model", args.model, "--sentences", str(args.sentences), "--passages", str(args.passages),
           "--queries", str(args.queries), "--stream", str(args.stream), *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_worker(name: str, args: argparse.Namespace, work: Path) -> dict:
    return json.loads(run_in_venv(name, ["--worker", name], args, work).strip().splitlines()[-1])


# ---------------------------------------------------------------- machine figures


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    """GFLOP/s (GOP/s for int8, through torch._int_mm) of a square matmul with torch's threads."""
    if dtype == torch.int8:
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8)
        try:
            run = lambda: torch._int_mm(a, b)  # noqa: E731
            run()
        except RuntimeError:
            return float("nan")
    else:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        run = lambda: a @ b  # noqa: E731
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    if first > 1.0:  # emulated under a limited instruction set (ONEDNN_MAX_CPU_ISA=AVX2): one call says enough
        return 2 * n ** 3 / first / 1e9
    best = float("inf")
    for _ in range(3):
        run()
        start = time.perf_counter()
        for _ in range(reps):
            run()
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


def cpu_description() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    get = lambda k: fields.get(k, "?").strip()  # noqa: E731
    flags = set(get("Flags").split())
    shown = [f for f in ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
             if f in flags]
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{get('Model name')} (vendor {get('Vendor ID')}, family {get('CPU family')}, model {get('Model')}), "
            f"{get('CPU(s)')} CPUs; {' '.join(shown)}" + (f"; ONEDNN_MAX_CPU_ISA={limit}" if limit else "")
            + (f"; ALLMPNET_MAX_ISA={os.environ['ALLMPNET_MAX_ISA']}" if os.environ.get("ALLMPNET_MAX_ISA") else ""))


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


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


# ---------------------------------------------------------------- GPU


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
        runs[f"ours-{p}"] = lambda e=e: e.encode(texts, convert_to="torch", show_progress_bar=False)
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


# ---------------------------------------------------------------- the parent: rounds, figures, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the verified published weights)")
    parser.add_argument("--paths", nargs="+", default=None, choices=list(PATHS), metavar="PATH",
                        help=f"subset of {list(PATHS)} (default: all)")
    parser.add_argument("--reps", type=int, default=2, help="rounds; each path's best round is reported")
    parser.add_argument("--sentences", type=int, default=0, help="STS sentences for (a); 0: all (needed for the "
                        "STSBenchmark score)")
    parser.add_argument("--passages", type=int, default=96, help="SciFact abstracts for (b)")
    parser.add_argument("--queries", type=int, default=100, help="single-query calls for (c)")
    parser.add_argument("--stream", type=int, default=0, help="instead: encode this many short sentences per path "
                        "and report peak RSS")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--setup-peers", action="store_true", help="create the peers' venvs, then exit")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup_peers:
        return setup_peers()
    if args.model is None:
        from allmpnet.weights import published_dir
        args.model = str(published_dir())
    if args.prepare:
        return prepare(args.prepare, args.model)
    if args.worker:
        return worker(args)

    lines: list[str] = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    work = Path(tempfile.mkdtemp(prefix="encode_speed_"))
    out(f"encode_speed  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    out(f"CPU: {cpu_description()}")
    out(f"peers: onnx venv: {peer_versions('onnx')}; openvino venv: {peer_versions('openvino')}")
    out(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    paths = []
    for name in args.paths or list(PATHS):
        why = unavailable(name)
        if why:
            out(f"skipped {name}: {why}")
        else:
            paths.append(name)
    if QUALITY_BASE not in paths:
        paths.insert(0, QUALITY_BASE)  # the quality columns compare against it
    for venv in sorted({PATHS[p][0] for p in paths} - {"main"}):
        print(f"  preparing {venv} exports (once per model)", file=sys.stderr, flush=True)
        run_in_venv(venv, ["--prepare", venv], args, work)

    if args.stream:
        for name in paths:
            r = run_worker(name, args, work)
            out(f"{name:<18} {r['stream_texts']:,} sentences in {r['stream_seconds']:.0f} s "
                f"({r['stream_texts'] / r['stream_seconds']:,.0f}/s), output {r['stream_shape']}, "
                f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB")
        out(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    ceiling = {k: matmul_ceiling(d) for k, d in dtypes.items()}
    from allmpnet.encode.tokenizer import TextTokenizer
    from allmpnet.model import MPNetConfig
    cfg = MPNetConfig.load(args.model)
    layer_weights = layer_weight_count(cfg)
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
    for name in paths:
        out(f"  {name:<18} {PATHS[name][1]}")

    results: dict[str, list[dict]] = {p: [] for p in paths}
    bandwidths: dict[str, list[float]] = {p: [] for p in paths}
    for rep in range(args.reps):
        for name in paths:
            # read right before each path: what the machine's memory gives swings with its other tenants (28-49
            # GB/s on one Zen 4 VM in one hour), so a single reading at the start says little about a later query
            bandwidths[name].append(read_bandwidth_gbs())
            results[name].append(run_worker(name, args, work))
            print(f"  round {rep + 1}/{args.reps}: {name} done", file=sys.stderr, flush=True)

    reference = "st-fp32" if "st-fp32" in paths else paths[0]
    base = {w: np.load(work / f"{QUALITY_BASE}.{w}.npy") for w in "ab"}
    best = {p: {w: min(r[f"{w}_seconds"] for r in rs) for w in "ab"} for p, rs in results.items()}
    out()
    # measured again after the paths: a burst of load during one measurement would understate a ceiling
    ceiling = {k: max(ceiling[k], matmul_ceiling(d)) for k, d in dtypes.items()}
    out(f"matmul ceiling (2048^3, best of before and after the paths): fp32 {ceiling['fp32']:.0f} GFLOP/s, "
        f"bf16 {ceiling['bf16']:.0f} GFLOP/s, int8 (torch._int_mm) {ceiling['int8']:.0f} GOP/s")
    readings = sorted(b for bs in bandwidths.values() for b in bs)
    floor_path = "ours-auto" if "ours-auto" in paths else paths[-1]
    bandwidth = max(bandwidths[floor_path])  # the most the memory gave next to that path's runs: the harder floor
    int8_floor_ms = layer_weights / bandwidth / 1e6
    out(f"memory read bandwidth right before each path's runs: {readings[0]:.1f} - {readings[-1]:.1f} GB/s (median "
        f"{statistics.median(readings):.1f}); before {floor_path}'s: "
        f"{', '.join(f'{b:.1f}' for b in bandwidths[floor_path])}")
    out(f"single-query floor: a query reads every layer weight once; int8 {layer_weights / 1e6:.0f} MB at "
        f"{bandwidth:.1f} GB/s (the most read right before {floor_path}'s runs) = {int8_floor_ms:.1f} ms "
        f"(bf16: {2 * int8_floor_ms:.1f} ms, fp32: {4 * int8_floor_ms:.1f} ms)")
    # the share of the faster float matmul: bf16 where the CPU runs it natively, else (bf16 emulated, e.g. under
    # ONEDNN_MAX_CPU_ISA=AVX2, where its ceiling is ~0) fp32
    share = "bf16" if ceiling["bf16"] >= ceiling["fp32"] else "fp32"
    out(f"best of {args.reps} rounds; ratios against {reference}; %{share} = achieved FLOP/s over the {share} matmul "
        f"ceiling; min cos against {QUALITY_BASE} on (a) and on (b)")
    header = (f"{'path':<18}{'(a) sent/s':>11}{'tok/s':>8}{'x ref':>7}{'%' + share:>7}   {'(b) pass/s':>10}{'tok/s':>8}"
              f"{'x ref':>7}{'%' + share:>7}   {'(c) p50 ms':>10}{'p99 ms':>8}   {'RSS GB':>7}{'cos (a)':>9}"
              f"{'cos (b)':>9}{'STS':>7}")
    out(header)
    out("-" * len(header))
    summary = {}
    for name in paths:
        cells = []
        for w in "ab":
            n, tokens, flop = workloads[w]
            tps = tokens / best[name][w]
            ratio = best[reference][w] / best[name][w]
            cells.append(f"{n / best[name][w]:>11.1f}{tps:>8.0f}{ratio:>7.2f}"
                         f"{100 * tps * flop / 1e9 / ceiling[share]:>6.0f}%")
        lat = sorted(x for r in results[name] for x in r["latency_ms"])
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rss = max(r["peak_rss_mb"] for r in results[name]) / 1024
        vec = {w: np.load(work / f"{name}.{w}.npy") for w in "ab"}
        cos = {w: min_cosine(vec[w], base[w]) for w in "ab"}
        sts = (spearman_x100(vec["a"][: len(s1)], vec["a"][len(s1):], gold) if len(sentences) == 2 * len(s1)
               else float("nan"))
        summary[name] = {"a": best[reference]["a"] / best[name]["a"], "b": best[reference]["b"] / best[name]["b"],
                         "p50": p50, "cos": min(cos.values()), "sts": sts}
        out(f"{name:<18}{cells[0]}   {cells[1]}   {p50:>10.1f}{p99:>8.1f}   {rss:>7.2f}{cos['a']:>9.5f}"
            f"{cos['b']:>9.5f}{sts:>7.2f}")
    out()
    if "ours-auto" in paths:
        from allmpnet.encode.precision import plan_precision
        out(f"ours-auto here: {plan_precision('auto', 'cpu').describe()}")
        report_targets(out, summary, int8_floor_ms, ceiling)
    out()
    if not args.no_gpu:
        gpu_section(out)
    out(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


def report_targets(out, summary: dict[str, dict], int8_floor_ms: float, ceiling: dict[str, float]) -> None:
    """ours-auto against the reference, the fastest good peer, every peer, and the single-query floor; ours fp32's
    query against ONNX Runtime's; and the bound the matmul ceilings put on any int8 path's speed-up."""
    auto = summary["ours-auto"]
    peers = {n: s for n, s in summary.items() if not n.startswith("ours-") and n != "st-fp32"}
    for w, label in (("a", "sentences"), ("b", "passages")):
        line = f"(a/b) {label}: ours-auto {auto[w]:.2f}x st-fp32"
        good = {n: s[w] for n, s in peers.items() if s["cos"] >= 0.99}
        if good:
            name = max(good, key=good.get)
            line += f"; {auto[w] / good[name]:.2f}x the fastest peer with min cos >= 0.99 ({name})"
        if peers:
            name = max(peers, key=lambda n: peers[n][w])
            line += f"; {auto[w] / peers[name][w]:.2f}x the fastest peer of any quality ({name})"
        out(line)
    line = f"(c) ours-auto p50 {auto['p50']:.1f} ms = {auto['p50'] / int8_floor_ms:.2f}x the int8 floor"
    if peers:
        name = min(peers, key=lambda n: peers[n]["p50"])
        line += f"; fastest peer {name} {peers[name]['p50']:.1f} ms"
    out(line)
    if "ours-fp32" in summary and "st-onnx" in summary:
        out(f"(c) ours-fp32 p50 {summary['ours-fp32']['p50']:.1f} ms; ONNX Runtime fp32 (st-onnx) "
            f"{summary['st-onnx']['p50']:.1f} ms")
    out(f"quality: ours-auto min cos {auto['cos']:.5f}, STSBenchmark {auto['sts']:.2f} (fp32 83.42)")
    bf16 = (f", and bf16's {ceiling['bf16'] / ceiling['fp32']:.1f}x" if ceiling["bf16"] >= ceiling["fp32"]
            else " (bf16 is emulated here, slower than fp32)")
    out(f"bound: this CPU's int8 matmul ceiling is {ceiling['int8'] / ceiling['fp32']:.1f}x its fp32 one "
        f"({ceiling['int8']:.0f} vs {ceiling['fp32']:.0f}){bf16}: no path whose matmuls are int8 can pass that "
        f"multiple of a reference running fp32 matmuls at its ceiling")


if __name__ == "__main__":
    main()
