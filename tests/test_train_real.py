"""The recipe's loss and a GradCache step on the published weights and real SciFact training pairs (short)."""
import json

import pytest
import torch

from allmpnet import Encoder
from allmpnet.train import contrastive_loss
from allmpnet.train.distributed import Context
from allmpnet.train.gradcache import forward_backward


@pytest.fixture()
def scifact_pairs(shared_data):
    folder = shared_data / "SciFact"
    claims = {}
    with (folder / "train_queries.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            claims[row["_id"]] = row["text"]
    cited = {}
    for line in (folder / "train_qrels.tsv").read_text().splitlines()[1:]:
        qid, did, _ = line.split("\t")
        cited.setdefault(qid, did)
        if len(cited) == 4:
            break
    docs = {}
    with (folder / "corpus.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if row["_id"] in cited.values():
                docs[row["_id"]] = (row["title"] + " " + row["text"]).strip()
    return [claims[q] for q in cited], [docs[d] for d in cited.values()]


def test_real_pairs_give_low_loss_and_a_gradcache_step(real_model_dir, scifact_pairs):
    claims, abstracts = scifact_pairs
    enc = Encoder(real_model_dir, device="cpu", max_seq_length=128)  # the recipe's training truncation
    claim_ids, abstract_ids = enc.tokenize(claims).ids, enc.tokenize(abstracts).ids
    a, p = enc.encode_ids(claim_ids), enc.encode_ids(abstract_ids)
    right = float(contrastive_loss(a, p))
    wrong = float(contrastive_loss(a, p.roll(1, dims=0)))
    assert right < 0.5 < 2 < wrong  # the trained model already pairs claims with their cited abstracts
    loss = forward_backward(enc, [claim_ids, abstract_ids], Context(), 20.0, chunk_size=4)
    assert loss == pytest.approx(right, abs=1e-4)
    grads = [p.grad for p in enc.model.parameters() if p.grad is not None]
    assert len(grads) > 100 and all(torch.isfinite(g).all() for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0
