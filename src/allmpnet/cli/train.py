"""train: the contrastive recipe (`allmpnet train …`; many processes: `torchrun --nproc-per-node N --no-python allmpnet train …`)."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

from allmpnet.errors import InvalidInput


def register(subparsers: argparse._SubParsersAction) -> None:
    from allmpnet.train.trainer import TrainConfig  # dataclass only; torch loads lazily below

    d = {f.name: f.default for f in fields(TrainConfig)}
    p = subparsers.add_parser("train", help="fine-tune with in-batch negatives (the all-* recipe)",
                              description="Train a sentence-embedding model with the all-* recipe. Defaults are "
                                          "the card's values. Under torchrun the same command runs data-parallel "
                                          "with global negatives; --batch-size is the global batch.")
    p.add_argument("--data-config", required=True, help='JSON list of {"name": file.jsonl[.gz], "weight": int}')
    p.add_argument("--model", "-m", required=True,
                   help="start: sentence-embedding model (name, hub id, directory) or an MPNet masked-LM directory")
    p.add_argument("--out", required=True, help="output directory: final model, checkpoints, train_log.jsonl")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch (pairs per score matrix)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--adam-eps", type=float, default=d["adam_eps"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    p.add_argument("--scale", type=float, default=d["scale"], help="cosine similarity multiplier")
    p.add_argument("--max-seq-length", type=int, default=d["max_seq_length"], help="training truncation")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="GradCache: embed this many texts per forward (exact large batches in bounded memory)")
    p.add_argument("--precision", default=d["precision"],
                   help="autocast dtype of the precision plan: fp32, bf16, fp16, or auto (bf16 where native; "
                        "default %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dedup-window", type=int, default=d["dedup_window"],
                   help="batches (current one included) within which a repeated text skips its sample")
    p.add_argument("--shuffle-buffer", type=int, default=d["shuffle_buffer"])
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad data lines instead of stopping")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--save-steps", type=int, default=d["save_steps"], help="checkpoint every N steps (0: end only)")
    p.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    p.add_argument("--log-steps", type=int, default=d["log_steps"])
    p.add_argument("--eval-task", help="retrieval task folder (BEIR layout) scored every --eval-steps steps")
    p.add_argument("--eval-steps", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    from allmpnet.train.trainer import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    evaluator = None
    if args.eval_task:
        evaluator = retrieval_evaluator(args.eval_task)
        if not cfg.eval_steps:
            raise InvalidInput("--eval-task needs --eval-steps N")
    out = train(cfg, evaluator)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"trained model in {out}")


def retrieval_evaluator(task_dir: str):
    """The evaluation package's retrieval score on a task folder (its test split), as the training eval hook."""
    from allmpnet.evaluate import load_task
    from allmpnet.evaluate.data import read_retrieval
    from allmpnet.evaluate.retrieval import evaluate_retrieval

    task = load_task(task_dir)
    data = read_retrieval(task)

    def evaluate(model) -> dict:
        scores = evaluate_retrieval(model, data)
        return {k: round(v, 3) for k, v in scores.items() if k in ("ndcg_at_10", "recall_at_100", "mrr_at_10")}
    return evaluate
