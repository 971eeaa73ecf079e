"""mine-negatives: (anchor, positive) pairs in, (anchor, positive, hard negative) triplets out, negatives from an index."""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mine-negatives", help="add hard negatives from an index to (anchor, positive) pairs: training triplets",
        description="For each (anchor, positive) pair, take the anchor's nearest records in the index that are not "
                    "its positives, keep those within the rank range and below the score caps, and write "
                    "(anchor, positive, negative) triplets in the trainer's format. The rules are "
                    "sentence-transformers' mine_hard_negatives (docs/train.md).")
    p.add_argument("pairs", type=Path, help="pairs in the trainer's format: .jsonl(.gz) lines [anchor, positive] "
                   "or {\"texts\": [anchor, positive]}")
    p.add_argument("--index", required=True, type=Path, help="index whose records are the candidate negatives")
    p.add_argument("--out", "-o", required=True, type=Path, help="triplets .jsonl (one [anchor, positive, negative] "
                   "per line; several per pair with --negatives N)")
    p.add_argument("--negatives", type=int, default=1, help="negatives per pair (default 1)")
    p.add_argument("--range-min", type=int, default=0, help="skip this many of the best surviving candidates")
    p.add_argument("--range-max", type=int, default=None,
                   help="candidates considered per anchor (default: as sentence-transformers derives it)")
    p.add_argument("--absolute-margin", type=float, default=None,
                   help="drop candidates scoring above (lowest positive score - margin)")
    p.add_argument("--relative-margin", type=float, default=None,
                   help="drop candidates scoring above (lowest positive score x (1 - margin)), e.g. 0.05")
    p.add_argument("--max-score", type=float, default=None, help="drop candidates above this cosine")
    p.add_argument("--min-score", type=float, default=None, help="drop candidates below this cosine")
    p.add_argument("--sampling", choices=["top", "random"], default="top",
                   help="take the best surviving candidates, or draw them at random (--seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-scores", action="store_true",
                   help='write {"texts": [...], "scores": [positive, negative]} lines (the trainer reads both)')
    how = p.add_mutually_exclusive_group()
    how.add_argument("--exact", dest="exact", action="store_true", default=None, help="score every row")
    how.add_argument("--ann", dest="exact", action="store_false", help="re-score HNSW candidates")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files on open")
    from allmpnet.cli.search import add_encoder_args
    add_encoder_args(p, default_model=None)
    p.set_defaults(func=cmd_mine_negatives)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(anchor, positive) pairs from a trainer-format file; any other line stops with its file:line."""
    from allmpnet.train.data import DataError, parse_example
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    pairs = []
    with opener(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            texts = parse_example(line, f"{path}:{number}")
            if len(texts) != 2:
                raise DataError(f"{path}:{number}: expected (anchor, positive) pairs, got {len(texts)} texts")
            pairs.append((texts[0], texts[1]))
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def cmd_mine_negatives(args: argparse.Namespace) -> None:
    from allmpnet.cli.search import open_for_text
    from allmpnet.search.mining import mine_hard_negatives
    pairs = read_pairs(args.pairs)
    index = open_for_text(args, verify=not args.no_verify)
    result = mine_hard_negatives(index, pairs, num_negatives=args.negatives, range_min=args.range_min,
                                 range_max=args.range_max, absolute_margin=args.absolute_margin,
                                 relative_margin=args.relative_margin, max_score=args.max_score,
                                 min_score=args.min_score, sampling=args.sampling, seed=args.seed, exact=args.exact,
                                 batch_size=args.batch_size, show_progress_bar=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for t in result.triplets:
            texts = [t.anchor, t.positive, t.negative]
            record = {"texts": texts, "scores": [round(t.positive_score, 6), round(t.negative_score, 6)]} \
                if args.with_scores else texts
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(args.out)  # a stopped run never leaves a half-written triplet file under the final name
    print(result.report.summary())
    print(f"wrote {args.out}")
