"""Training throughput and peak memory, plain step vs GradCache, for global batch sizes 32…1024.

Each (batch, mode) runs in its own process so that its peak memory is its own. Figures: examples/s (pairs/s),
tokens/s (word pieces through the encoder, both columns), peak memory (RSS on CPU, allocated on GPU).
The model is an MPNet of the given shape with random weights (same code path as the real one): the published
shape (`--shape base`) is for a GPU; on a 2-core CPU a small shape keeps the sweep to minutes.

    python benchmarks/train_throughput.py --shape small --out benchmarks/results/train_throughput
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from allmpnet import Encoder
from allmpnet.model import MPNetConfig
from allmpnet.testing import build_random_model
from allmpnet.train.distributed import Context
from allmpnet.train.gradcache import forward_backward
from allmpnet.train.trainer import memory_mb

SHAPES = {"small": MPNetConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
          "base": MPNetConfig()}


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: warm-up step, then timed steps (forward, backward, AdamW)."""
    model = Encoder(args.model_dir, device=args.device, precision=args.precision)
    model.train()
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=2e-5, eps=1e-6, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    vocab = model.model.network.cfg.vocab_size

    def columns():  # two columns of batch texts, each exactly seq word pieces (<s> … </s>)
        ids = torch.randint(5, vocab, (2, args.batch, args.seq - 2), generator=g)
        return [[[0] + row.tolist() + [2] for row in column] for column in ids]

    chunk = args.chunk if args.mode == "gradcache" else None
    times = []
    for step in range(args.steps + 1):
        batch = columns()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, batch, Context(), 20.0, chunk)
        torch.nn.utils.clip_grad_norm_(model.model.parameters(), 1.0)
        optimizer.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # step 0 warms up
            times.append(time.perf_counter() - start)
    per_step = sum(times) / len(times)
    return {"batch": args.batch, "mode": args.mode, "chunk": chunk, "examples_per_s": args.batch / per_step,
            "tokens_per_s": 2 * args.batch * args.seq / per_step, "s_per_step": per_step,
            "peak_memory_mb": memory_mb(model.device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--seq", type=int, default=32, help="word pieces per text (all texts this long)")
    p.add_argument("--batches", default="32,64,128,256,512,1024")
    p.add_argument("--chunk", type=int, default=32, help="GradCache chunk (texts per forward)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="folder for results.json and results.md")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(Path(tmp) / "model", replace(SHAPES[args.shape]), max_seq_length=args.seq)
        for batch in map(int, args.batches.split(",")):
            for mode in ("plain", "gradcache"):
                cmd = [sys.executable, __file__, "--one", "--model-dir", str(model_dir), "--batch", str(batch),
                       "--mode", mode, "--seq", str(args.seq), "--chunk", str(args.chunk), "--steps",
                       str(args.steps), "--precision", args.precision, "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if done.returncode:
                    row = {"batch": batch, "mode": mode, "error": done.stderr.strip().splitlines()[-1]}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    plain = {r["batch"]: r for r in rows if r["mode"] == "plain" and "error" not in r}
    lines = [f"shape={args.shape} seq={args.seq} chunk={args.chunk} precision={args.precision} "
             f"device={args.device} torch threads={torch.get_num_threads()}", "",
             "| batch | mode | examples/s | tokens/s | peak memory MB | speed vs plain | memory vs plain |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['mode']} | failed: {r['error']} | | | | |")
            continue
        base = plain.get(r["batch"])
        speed = f"{r['examples_per_s'] / base['examples_per_s']:.2f}" if base else "–"
        memory = f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}" if base else "–"
        lines.append(f"| {r['batch']} | {r['mode']} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} | {speed} | {memory} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
