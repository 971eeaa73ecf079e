"""The trainer: resume exactness, logs, eval hook, checkpoints, masked-LM start, CLI, bad data."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from allmpnet import Encoder
from allmpnet.cli import main as cli_main
from allmpnet.testing import TINY, build_random_model
from allmpnet.train import DataError, TrainConfig, train
from allmpnet.train.checkpoint import latest_checkpoint


@pytest.fixture()
def data_config(tmp_path):
    rows = [[f"query {i} the cat", f"text {i} a dog {i % 5} moon"] for i in range(30)]
    rows += [[f"question {i}", f"answer {i} sun", f"wrong {i} car"] for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (tmp_path / "triplets.jsonl").write_text("".join(json.dumps({"texts": r}) + "\n" for r in rows[30:]))
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"name": "pairs.jsonl", "weight": 2}, {"name": "triplets.jsonl", "weight": 1}]))
    return path


def config(data_config, model, out, **kw):
    base = dict(data_config=str(data_config), model=str(model), out=str(out), steps=6, batch_size=4, lr=1e-3,
                warmup_steps=2, max_seq_length=16, precision="fp32", save_steps=3, progress=False)
    return TrainConfig(**{**base, **kw})


def log_rows(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tiny_model_dir, data_config, tmp_path):
    full = train(config(data_config, tiny_model_dir, tmp_path / "full"))
    expected = [r["loss"] for r in log_rows(full) if "loss" in r]
    assert len(expected) == 6

    class Crash(Exception):
        pass

    def crash_at_step_4(model):
        if len(calls) == 1:
            raise Crash  # step 4 is done and logged, but the newest checkpoint is step 3's
        calls.append(1)
        return {}

    calls = []
    stopped = config(data_config, tiny_model_dir, tmp_path / "stopped", eval_steps=2)
    with pytest.raises(Crash):
        train(stopped, evaluator=crash_at_step_4)
    assert latest_checkpoint(tmp_path / "stopped").name == "checkpoint-0000003"
    assert [r["step"] for r in log_rows(tmp_path / "stopped") if "loss" in r] == [1, 2, 3, 4]
    train(config(data_config, tiny_model_dir, tmp_path / "stopped", resume=True))
    got = [r["loss"] for r in log_rows(tmp_path / "stopped") if "loss" in r]
    assert got == expected  # steps 1-3 before the stop, 4-6 redone after the resume: bit for bit
    assert [r["step"] for r in log_rows(tmp_path / "stopped") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    a, b = Encoder(full), Encoder(tmp_path / "stopped")
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_a_changed_recipe(tiny_model_dir, data_config, tmp_path):
    train(config(data_config, tiny_model_dir, tmp_path / "run", steps=3))
    with pytest.raises(ValueError, match="lr"):
        train(config(data_config, tiny_model_dir, tmp_path / "run", steps=3, lr=5e-4, resume=True))


def test_log_eval_hook_and_saved_model(tiny_model_dir, data_config, tmp_path):
    seen = []

    def evaluator(model):
        seen.append(model.training)
        return {"score": float(model.encode("the cat")[0])}

    out = train(config(data_config, tiny_model_dir, tmp_path / "run", eval_steps=2, eval_at_start=True,
                       keep_checkpoints=1), evaluator)
    rows = log_rows(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"loss", "lr", "examples_per_s", "tokens_per_s", "memory_mb", "grad_norm"} <= r.keys()
        assert r["examples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["memory_mb"] > 0
    assert [r["step"] for r in rows if "eval" in r] == [0, 2, 4, 6]
    assert seen == [False] * 4  # the evaluator sees the model in eval mode
    assert steps[-1]["lr"] < steps[2]["lr"]  # decaying after warm-up
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-0000006"]  # keep_checkpoints=1
    model = Encoder(out)
    assert model.normalize and model.max_seq_length == Encoder(tiny_model_dir).max_seq_length
    assert not torch.equal(model.model.network.embeddings.word_embeddings.weight,
                           Encoder(tiny_model_dir).model.network.embeddings.word_embeddings.weight)


def test_gradient_checkpointing_and_gradcache_train_the_same(data_config, tmp_path):
    # dropout off, so the three ways of computing a step must agree step after step
    cfg = dataclasses.replace(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model_dir = build_random_model(tmp_path / "model", cfg)
    runs = {name: log_rows(train(config(data_config, model_dir, tmp_path / name, steps=3, save_steps=0, **kw)))
            for name, kw in {"plain": {}, "cached": {"chunk_size": 3},
                             "checkpointed": {"gradient_checkpointing": True}}.items()}
    expected = [r["loss"] for r in runs["plain"]]
    assert expected[0] != pytest.approx(expected[2], abs=1e-3)
    for name in ("cached", "checkpointed"):
        assert [r["loss"] for r in runs[name]] == pytest.approx(expected, abs=1e-5), name


def test_start_from_masked_lm_checkpoint(tiny_model_dir, data_config, tmp_path):
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    tensors = {f"mpnet.{k}": v for k, v in load_file(tiny_model_dir / "model.safetensors").items()}
    tensors["lm_head.bias"] = torch.zeros(8)
    save_file(tensors, str(mlm / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (mlm / name).write_bytes((tiny_model_dir / name).read_bytes())
    start = Encoder(mlm)
    assert not start.normalize
    out = train(config(data_config, mlm, tmp_path / "run", steps=2, save_steps=0))
    trained = Encoder(out)
    assert trained.normalize
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert abs(float(torch.from_numpy(trained.encode("the cat")).norm()) - 1) < 1e-5


def test_bad_data_stops_naming_file_and_line(tiny_model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text('["a", "b"]\n["c", "d"]\n["e"]\n' + '["f", "g"]\n' * 5)
    (tmp_path / "data.json").write_text(json.dumps([{"name": "d.jsonl", "weight": 1}]))
    with pytest.raises(DataError, match=r"d\.jsonl:3: expected 2 texts"):
        train(config(tmp_path / "data.json", tiny_model_dir, tmp_path / "run", steps=2, batch_size=2,
                     dedup_window=1))


def test_cli_trains_and_reports_bad_data(tiny_model_dir, data_config, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["train", "--data-config", str(data_config), "--model", str(tiny_model_dir), "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--max-seq-length", "16", "--precision", "fp32",
                     "--chunk-size", "2", "--warmup-steps", "1"])
    assert code == 0 and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["lr"] == 2e-5 and cfg["scale"] == 20.0 and cfg["adam_eps"] == 1e-6 and cfg["weight_decay"] == 0.0
    assert cfg["max_grad_norm"] == 1.0 and cfg["chunk_size"] == 2

    (tmp_path / "bad.json").write_text(json.dumps([{"name": "missing.jsonl", "weight": 1}]))
    code = cli_main(["train", "--data-config", str(tmp_path / "bad.json"), "--model", str(tiny_model_dir),
                     "--out", str(tmp_path / "x"), "--steps", "1"])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err


def test_cli_eval_task_scores_retrieval_during_training(tiny_model_dir, data_config, tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({"name": "Tiny", "type": "Retrieval", "main_score": "ndcg_at_10"}))
    docs = ["the cat sat", "a dog ran", "the sun is hot", "moon and car"]
    (task / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    (task / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "cat"}) + "\n"
                                        + json.dumps({"_id": "q1", "text": "sun"}) + "\n")
    (task / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td2\t1\n")
    out = tmp_path / "run"
    code = cli_main(["train", "--data-config", str(data_config), "--model", str(tiny_model_dir), "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--max-seq-length", "16", "--precision", "fp32",
                     "--eval-task", str(task), "--eval-steps", "1"])
    assert code == 0
    evals = [r for r in log_rows(out) if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(0 <= r["eval"]["ndcg_at_10"] <= 100 for r in evals)
