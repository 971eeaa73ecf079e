"""End to end on the real weights: fine-tune all-mpnet-base-v2 on SciFact's train claims, pick on dev, test once.

    # 1) choose hyper-parameters on a dev part (20% of the TRAIN claims, seeded), never on test claims
    nice -n 10 python benchmarks/train_scifact.py dev --work /tmp/scifact-train --steps 46 --batch-size 32 --lr 2e-5
    # 2) score the chosen model on the test claims, once (optionally encode the corpus first in parallel shards,
    #    kept in the evaluation package's vector cache, so that an interrupted run resumes)
    nice -n 10 python benchmarks/train_scifact.py prefill --model /tmp/scifact-train/run --shard 0 --shards 2 &
    nice -n 10 python benchmarks/train_scifact.py prefill --model /tmp/scifact-train/run --shard 1 --shards 2
    nice -n 10 python benchmarks/train_scifact.py test --model /tmp/scifact-train/run

    # hard negatives: mine (claim, cited abstract, negative) triplets for the same train claims from an index of
    # the corpus, then train on them with the same protocol (dev --data)
    nice -n 10 python benchmarks/train_scifact.py mine --work /tmp/scifact-mined --relative-margin 0.05 --range-max 100
    nice -n 10 python benchmarks/train_scifact.py dev --work /tmp/scifact-mined --data /tmp/scifact-mined/triplets.jsonl

Training pairs are (claim, cited abstract as `title text`), one per train qrel of the non-dev claims, truncated to
128 word pieces (the recipe). To keep dev scoring affordable on 2 CPU cores, dev claims are scored against a reduced
corpus: every abstract cited by a dev claim plus a fixed random sample of other abstracts (seed 0), with abstracts
truncated at 256 word pieces. The test score uses the evaluation issue's SciFact protocol unchanged (full corpus,
384 word pieces).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from allmpnet import Encoder
from allmpnet.evaluate import CachedEncoder, load_task
from allmpnet.evaluate.data import RetrievalData, read_retrieval
from allmpnet.evaluate.retrieval import document_text, evaluate_retrieval
from allmpnet.search import Index
from allmpnet.search.mining import mine_hard_negatives
from allmpnet.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "SciFact"
CARD_NDCG10 = 65.57  # all-mpnet-base-v2 model card, MTEB SciFact test, ndcg_at_10


def split_train_claims(data: RetrievalData, dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    claims = sorted(data.qrels, key=int)
    order = np.random.default_rng(seed).permutation(len(claims))
    n_dev = round(dev_fraction * len(claims))
    dev = sorted((claims[i] for i in order[:n_dev]), key=int)
    return [c for c in claims if c not in set(dev)], dev


def dev_data(data: RetrievalData, dev: list[str], extra_docs: int, seed: int) -> RetrievalData:
    cited = {d for c in dev for d in data.qrels[c]}
    others = sorted(set(data.corpus) - cited)
    sample = np.random.default_rng(seed).choice(len(others), size=min(extra_docs, len(others)), replace=False)
    keep = cited | {others[i] for i in sample}
    return RetrievalData({d: data.corpus[d] for d in data.corpus if d in keep},
                         {c: data.queries[c] for c in dev}, {c: data.qrels[c] for c in dev})


def dev_evaluator(data: RetrievalData, max_seq_length: int):
    def evaluate(model: Encoder) -> dict:
        training_length, model.max_seq_length = model.max_seq_length, max_seq_length
        try:
            start = time.perf_counter()
            scores = evaluate_retrieval(model, data, batch_size=32, show_progress_bar=True)
            return {"dev_ndcg_at_10": round(scores["ndcg_at_10"], 3), "dev_recall_at_100": round(
                scores["recall_at_100"], 3), "eval_s": round(time.perf_counter() - start, 1)}
        finally:
            model.max_seq_length = training_length
    return evaluate


def train_pairs(data: RetrievalData, train_claims: list[str]) -> list[list[str]]:
    return [[data.queries[c], document_text(data.corpus[d])] for c in train_claims for d in sorted(data.qrels[c])]


def cmd_mine(args: argparse.Namespace) -> None:
    """Triplets for the train claims (dev held out as in `dev`), negatives from an index of the whole corpus."""
    data = read_retrieval(load_task(DATA), "train_queries.jsonl", "train_qrels.tsv")
    train_claims, _ = split_train_claims(data, args.dev_fraction, args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    index_dir = args.work / "corpus-index"
    encoder = Encoder(args.model, device="cpu", precision=args.precision)
    encoder.max_seq_length = args.max_seq_length  # what the trainer will see of each negative
    start = time.perf_counter()
    if (index_dir / "CURRENT").is_file():
        index = Index.open(index_dir, encoder=encoder)
    else:
        doc_ids = list(data.corpus)
        index = Index.build(index_dir, texts=[document_text(data.corpus[d]) for d in doc_ids], ids=doc_ids,
                            encoder=encoder)
    print(f"index of {len(index)} abstracts ready in {time.perf_counter() - start:.0f} s", flush=True)
    pairs = train_pairs(data, train_claims)
    result = mine_hard_negatives(index, pairs, num_negatives=args.negatives, range_min=args.range_min,
                                 range_max=args.range_max, relative_margin=args.relative_margin,
                                 absolute_margin=args.absolute_margin, max_score=args.max_score, exact=True,
                                 show_progress_bar=True)
    with (args.work / "triplets.jsonl").open("w") as f:
        f.writelines(json.dumps([t.anchor, t.positive, t.negative]) + "\n" for t in result.triplets)
    scores = np.array([[t.positive_score, t.negative_score] for t in result.triplets])
    summary = {"pairs": len(pairs), "triplets": len(result.triplets), "short_anchors": result.report.short_anchors,
               "skipped": dict(result.report.skipped), "mean_positive_score": round(float(scores[:, 0].mean()), 4),
               "mean_negative_score": round(float(scores[:, 1].mean()), 4), "settings": {
                   k: getattr(args, k) for k in ("negatives", "range_min", "range_max", "relative_margin",
                                                 "absolute_margin", "max_score", "max_seq_length", "precision")}}
    (args.work / "mining.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(result.report.summary())
    print(json.dumps(summary, indent=2))


def cmd_dev(args: argparse.Namespace) -> None:
    task = load_task(DATA)
    data = read_retrieval(task, "train_queries.jsonl", "train_qrels.tsv")
    train_claims, dev = split_train_claims(data, args.dev_fraction, args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        pairs = train_pairs(data, train_claims)
        with (args.work / "scifact_train_pairs.jsonl").open("w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        data_file = args.work / "scifact_train_pairs.jsonl"
    else:  # e.g. the triplets of `mine` (made from the same train claims)
        data_file = args.data.resolve()
        pairs = data_file.read_text().splitlines()
    (args.work / "data.json").write_text(json.dumps([{"name": str(data_file), "weight": 1,
                                                      "lines": len(pairs)}]) + "\n")
    held_out = dev_data(data, dev, args.dev_extra_docs, args.seed)
    print(f"train claims {len(train_claims)} ({len(pairs)} pairs), dev claims {len(dev)} scored against "
          f"{len(held_out.corpus)} abstracts", flush=True)
    cfg = TrainConfig(data_config=str(args.work / "data.json"), model=args.model, out=str(args.work / "run"),
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      max_seq_length=args.max_seq_length, precision=args.precision, save_steps=args.eval_steps,
                      keep_checkpoints=args.steps // max(1, args.eval_steps) + 1, eval_steps=args.eval_steps,
                      eval_at_start=args.eval_at_start, chunk_size=args.chunk_size, seed=args.seed)
    start = time.perf_counter()
    train(cfg, evaluator=dev_evaluator(held_out, args.dev_max_seq_length))
    print(f"training + dev evaluations took {time.perf_counter() - start:.0f} s", flush=True)


def cached_test_encoder(model_dir: str, precision: str) -> CachedEncoder:
    """The model at the card's inference length (384), behind the evaluation package's on-disk vector cache."""
    model = Encoder(model_dir, device="cpu", precision=precision)
    model.max_seq_length = 384
    return CachedEncoder(model)


def cmd_prefill(args: argparse.Namespace) -> None:
    """Encode shard i of n of the test corpus into the cache: parallel and resumable on a busy machine."""
    data = read_retrieval(load_task(DATA))
    texts = [document_text(data.corpus[d]) for d in list(data.corpus)[args.shard::args.shards]]
    encoder = cached_test_encoder(args.model, args.precision)
    for start in range(0, len(texts), args.piece):  # small pieces: an interruption loses little
        encoder.encode(texts[start:start + args.piece], batch_size=32, show_progress_bar=False)
        print(f"shard {args.shard}/{args.shards}: {min(start + args.piece, len(texts))}/{len(texts)} "
              f"({encoder.hits} cached, {encoder.misses} encoded)", flush=True)


def cmd_test(args: argparse.Namespace) -> None:
    task = load_task(DATA)
    data = read_retrieval(task)
    model = cached_test_encoder(args.model, args.precision)
    start = time.perf_counter()
    scores = evaluate_retrieval(model, data, batch_size=32, show_progress_bar=True)
    took = time.perf_counter() - start
    result = {"model": str(args.model), "precision": args.precision, "ndcg_at_10": round(scores["ndcg_at_10"], 2),
              "card_ndcg_at_10": CARD_NDCG10, "gain": round(scores["ndcg_at_10"] - CARD_NDCG10, 2),
              "scores": scores, "eval_s": round(took, 1)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("dev", help="train on the train claims minus dev, scoring dev along the way")
    p.add_argument("--work", type=Path, required=True, help="folder for the derived pairs and the run")
    p.add_argument("--model", default="all-mpnet-base-v2")
    p.add_argument("--steps", type=int, default=46)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--eval-steps", type=int, default=23)
    p.add_argument("--eval-at-start", action="store_true")
    p.add_argument("--dev-fraction", type=float, default=0.2)
    p.add_argument("--dev-extra-docs", type=int, default=400)
    p.add_argument("--dev-max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None,
                   help="train on this .jsonl (e.g. mined triplets) instead of the train claims' pairs")
    p.set_defaults(func=cmd_dev)
    p = sub.add_parser("mine", help="mine hard-negative triplets for the train claims from an index of the corpus")
    p.add_argument("--work", type=Path, required=True, help="folder for the index, triplets.jsonl, mining.json")
    p.add_argument("--model", default="all-mpnet-base-v2")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--max-seq-length", type=int, default=128, help="abstracts embedded for mining at this length")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--range-min", type=int, default=0)
    p.add_argument("--range-max", type=int, default=None)
    p.add_argument("--relative-margin", type=float, default=None)
    p.add_argument("--absolute-margin", type=float, default=None)
    p.add_argument("--max-score", type=float, default=None)
    p.add_argument("--dev-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_mine)
    p = sub.add_parser("test", help="SciFact test nDCG@10 of one model, the evaluation issue's protocol")
    p.add_argument("--model", required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.set_defaults(func=cmd_test)
    p = sub.add_parser("prefill", help="encode one shard of the test corpus into the evaluation cache")
    p.add_argument("--model", required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--piece", type=int, default=64)
    p.set_defaults(func=cmd_prefill)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
