"""Writes the package's built-in card scores (src/allmpnet/evaluate/card_scores.json) from the model card.

    .venv/bin/python benchmarks/card_scores.py       # reads ../shared/seed/all-mpnet-base-v2-model-card.md

The published model's README carries no model-index, so `allmpnet eval` would have nothing to compare the
published weights with; these are the model card's own figures (68 results: the 56 MTEB English tasks, with
CQADupstack as its 12 forums and their mean), kept as published facts. Run once; tests/test_evaluate_card.py
checks the file against the card whenever the card is at hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from allmpnet.evaluate.card import BUILTIN_CARD_FILE, model_index_results

ROOT = Path(__file__).resolve().parents[1]
SEED_CARD = ROOT.parent / "shared" / "seed" / "all-mpnet-base-v2-model-card.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, default=SEED_CARD)
    parser.add_argument("--out", type=Path, default=BUILTIN_CARD_FILE)
    args = parser.parse_args()
    results = model_index_results(args.card)
    document = {"model": "sentence-transformers/all-mpnet-base-v2",
                "source": "the model card's model-index (huggingface.co/sentence-transformers/all-mpnet-base-v2)",
                "results": results}
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(results)} results, {sum(len(r['metrics']) for r in results)} metric values")


if __name__ == "__main__":
    main()
