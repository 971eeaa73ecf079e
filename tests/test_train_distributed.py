"""Two CPU processes (gloo) with batch B each behave as one process with batch 2B: same loss, same gradients."""
import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from allmpnet import Encoder
from allmpnet.testing import TINY, build_random_model
from allmpnet.train import TrainConfig, train
from allmpnet.train.distributed import Context, sum_gradients
from allmpnet.train.gradcache import forward_backward

ANCHORS = ["the cat", "a dog on the car", "sun and moon", "hello world", "this is a test", "plant"]
POSITIVES = ["cat", "the dog", "the moon", "world hello", "a test text", "the plant is green"]
NEGATIVES = ["car", "sun", "query", "search", "example sentence", "it was"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def step_grads(model_dir, columns, context, chunk_size):
    model = Encoder(model_dir, device="cpu").eval()  # eval: no dropout, so both layouts compute one function
    tokens = [model.tokenizer(c).ids for c in columns]
    loss = forward_backward(model, tokens, context, 20.0, chunk_size)
    params = list(model.model.parameters())
    sum_gradients(params, context)
    return loss, {n: p.grad for n, p in model.model.named_parameters() if p.grad is not None}


CASES = [(2, None), (3, None), (3, 2)]  # pairs; triplets; triplets with GradCache chunks of 2


def grad_worker(rank, world, port, model_dir, out):
    join_group(rank, world, port)
    half = len(ANCHORS) // world
    for n_columns, chunk_size in CASES:
        columns = [c[rank * half:(rank + 1) * half] for c in (ANCHORS, POSITIVES, NEGATIVES)[:n_columns]]
        loss, grads = step_grads(model_dir, columns, Context(rank, world, rank), chunk_size)
        torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}-{n_columns}-{chunk_size}.pt")
    dist.destroy_process_group()


def test_two_processes_equal_one_process_with_twice_the_batch(tiny_model_dir, tmp_path):
    mp.spawn(grad_worker, args=(2, free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    for n_columns, chunk_size in CASES:
        single_loss, single = step_grads(tiny_model_dir, [ANCHORS, POSITIVES, NEGATIVES][:n_columns], Context(),
                                         None)
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}-{n_columns}-{chunk_size}.pt")
            assert got["loss"] == pytest.approx(single_loss, abs=1e-6)
            assert got["grads"].keys() == single.keys()
            for name, grad in single.items():
                torch.testing.assert_close(got["grads"][name], grad, atol=1e-6, rtol=1e-4,
                                           msg=f"{name} ({n_columns} columns, chunk {chunk_size})")


def train_worker(rank, world, port, cfg_dict):
    join_group(rank, world, port)
    train(TrainConfig(**cfg_dict))
    dist.destroy_process_group()


def test_distributed_training_run_matches_single_process(tmp_path):
    # dropout off, so one process and two processes run the same computation step after step
    cfg = dataclasses.replace(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model_dir = build_random_model(tmp_path / "model", cfg)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps([f"query {i} the cat", f"text {i} a dog {i % 7}"]) + "\n"
                            for i in range(40)))
    (tmp_path / "data.json").write_text(json.dumps([{"name": "pairs.jsonl", "weight": 1}]))
    common = dict(data_config=str(tmp_path / "data.json"), model=str(model_dir), steps=3, batch_size=8,
                  lr=1e-3, warmup_steps=1, max_seq_length=16, save_steps=0, precision="fp32", progress=False)
    mp.spawn(train_worker, args=(2, free_port(), dict(common, out=str(tmp_path / "two"))), nprocs=2, join=True)
    train(TrainConfig(**common, out=str(tmp_path / "one")))

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(losses("one")) == 3
    assert losses("two") == pytest.approx(losses("one"), abs=1e-5)
    assert losses("one")[0] != pytest.approx(losses("one")[2], abs=1e-4)  # weights moved between steps
    a, b = Encoder(tmp_path / "one"), Encoder(tmp_path / "two")
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
