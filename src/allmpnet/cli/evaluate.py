"""eval: MTEB tasks from local folders, scored by the mteb 1.0 protocol and set beside the model card."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from allmpnet.cli.core import add_model_args, load_encoder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate on MTEB tasks held locally and compare with the model card",
                              description="Evaluate a model on MTEB task folders (task.json + data files) with "
                                          "the protocol of mteb 1.0, and compare each main score with the model "
                                          "card's.")
    p.add_argument("tasks", nargs="+", metavar="TASK",
                   help="task folder names under --data, paths to task folders, or MTEB names to fetch from the hub "
                        "(needs `datasets`); 'all' runs every task in --data")
    p.add_argument("--data", type=Path, default=os.environ.get("ALLMPNET_EVAL_DATA"),
                   help="folder holding one sub-folder per task (default: $ALLMPNET_EVAL_DATA)")
    p.add_argument("--card", type=Path, help="model card to compare with (default: the model directory's README.md "
                                             "when it has a model-index, else for the published weights the "
                                             "built-in scores of their model card)")
    p.add_argument("--out", type=Path, default=Path("eval-results"),
                   help="where TASK.json files and table.md go (default: ./eval-results)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-cache", action="store_true", help="encode everything again instead of reusing vectors")
    p.add_argument("--cache-dir", type=Path, help="embedding cache folder (default: ~/.cache/allmpnet/embeddings)")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)


def task_dirs(names: list[str], data: Path | None) -> list[Path]:
    if names == ["all"]:
        if data is None or not data.is_dir():
            raise FileNotFoundError(f"'all' needs --data pointing at a folder of tasks (got {data})")
        found = sorted(d for d in data.iterdir() if (d / "task.json").is_file())
        if not found:
            raise FileNotFoundError(f"{data} holds no task folders (sub-folders with a task.json)")
        return found
    from allmpnet.evaluate.hub import HUB_TASKS, fetch_task

    dirs = []
    for name in names:
        candidates = ([data / name] if data is not None else []) + [Path(name)]
        match = next((c for c in candidates if c.is_dir()), None)
        if match is None and name in HUB_TASKS:
            match = fetch_task(name)  # by MTEB name: needs `datasets` and the hub, says so otherwise
        if match is None:
            known = sorted(d.name for d in data.iterdir() if d.is_dir()) if data is not None and data.is_dir() else []
            hint = f"; tasks in {data}: {', '.join(known)}" if known else "; pass --data DIR"
            raise FileNotFoundError(f"no task folder {name!r}{hint}")
        dirs.append(match)
    return dirs


def cmd_eval(args: argparse.Namespace) -> int:
    from allmpnet.evaluate import CachedEncoder, load_task, read_card, run_tasks, table_rows
    from allmpnet.evaluate.card import card_for_model, markdown_table
    from allmpnet.evaluate.data import read_task

    tasks = [load_task(d) for d in task_dirs(args.tasks, args.data)]
    for task in tasks:
        read_task(task)  # every file checked before the first (slow) encoding, not after it
    encoder = load_encoder(args)
    if args.card:
        card, card_source = read_card(args.card), str(args.card)
    else:
        card, card_source = card_for_model(encoder.model_dir)
        print(f"card comparison: {card_source}" if card else f"no card comparison: {card_source}", file=sys.stderr)
    model = encoder if args.no_cache else CachedEncoder(encoder, args.cache_dir)
    results = run_tasks(tasks, model, encoder.name, args.out, card, batch_size=args.batch_size)
    print(markdown_table(table_rows(results, card), card_source if card else None), end="")
    print(f"results: {args.out}/<task>.json and {args.out}/table.md", file=sys.stderr)
    return 0
