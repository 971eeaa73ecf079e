"""embed-corpus: a whole corpus to resumable Parquet shards of embeddings, on Ray."""
from __future__ import annotations

import argparse
import sys

from allmpnet.cli.core import add_precision_arg
from allmpnet.settings import precision_or_default
from allmpnet.weights import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed-corpus", help="embed Parquet/JSONL/CSV files into Parquet shards on Ray (resumable)",
        description="Embed every row of the inputs into Parquet shards of (id, embedding, kept columns) under "
                    "--out. Runs on a local Ray instance started for the job, or joins a cluster with --address. "
                    "Running the same command again skips the shards already written and verified.")
    p.add_argument("input", nargs="+", help="files or directories (.parquet, .jsonl, .csv; local or any "
                                            "filesystem pyarrow opens, e.g. s3://bucket/dir)")
    p.add_argument("--out", "-o", required=True, help="output directory (local or s3://…)")
    p.add_argument("--address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start one here")
    p.add_argument("--workers", type=int, default=None,
                   help="actors, each holding one model (default: enough to use every core, see --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs each actor reserves, also its torch threads (default: the smallest node's free "
                        "cores, at most 8; with --workers, the free cores shared among them)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="> 0 runs each model on a GPU")
    p.add_argument("--on-bad", choices=["fail", "skip"], default="fail",
                   help="a bad row (no id, no text, not a string, unreadable) stops the job, or is skipped and "
                        "counted (default fail)")
    p.add_argument("--id-field", default="id")
    p.add_argument("--text-field", default="text")
    p.add_argument("--keep", action="append", default=[], metavar="COLUMN",
                   help="copy this input column next to each embedding (repeatable)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="rows per output shard (default: about 64 shards of 1,000 to 10,000 rows)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per forward pass (default: the token budget decides, as in Encoder.encode)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out made with different inputs or settings")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model name, hub id or directory")
    add_precision_arg(p, "fp32 (exact), bf16, auto … (see allmpnet info; default fp32)")
    p.set_defaults(func=cmd_embed_corpus)


def cmd_embed_corpus(args: argparse.Namespace) -> int:
    from allmpnet.bulk import BadRowsError, BulkConfig, BulkJobError, embed_corpus
    config = BulkConfig(model=args.model, id_field=args.id_field, text_field=args.text_field,
                        keep=tuple(args.keep), shard_rows=args.shard_rows, batch_size=args.batch_size,
                        on_bad=args.on_bad, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                        gpus_per_worker=args.gpus_per_worker,
                        precision=precision_or_default(args.precision))
    try:
        result = embed_corpus(args.input, args.out, config, address=args.address, overwrite=args.overwrite)
    except BadRowsError as e:
        print(f"allmpnet embed-corpus: {e}", file=sys.stderr)
        print("finished shards are kept: the same command with --on-bad skip resumes from them", file=sys.stderr)
        return 1
    except (BulkJobError, ImportError) as e:
        print(f"allmpnet embed-corpus: error: {e}", file=sys.stderr)
        return 1
    ray_start = f" after {result.ray_start_seconds:.1f}s starting Ray" if result.ray_start_seconds else ""
    print(f"{result.rows} rows embedded into {result.shards} shard(s) in {args.out} "
          f"({result.written} written now, {result.skipped} already done) in {result.job_seconds:.1f}s{ray_start}"
          + (f"; {result.layout}" if result.layout else ""))
    if result.bad_rows:
        where, why = result.bad_examples[0]
        print(f"skipped {result.bad_rows} bad row(s) (first: {where}: {why}); all are listed in "
              f"{args.out}/_manifest")
    if result.truncated:
        print(f"{result.truncated} text(s) were longer than the model's max_seq_length and were truncated")
    return 0
