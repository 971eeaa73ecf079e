"""Bulk embedding: shard planning and reading (no Ray), then whole jobs on a small local Ray instance."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from allmpnet import Encoder  # noqa: E402
from allmpnet.bulk import BulkConfig, BulkJobError, embed_corpus, read_embeddings  # noqa: E402
from allmpnet.bulk.cluster import MAX_THREADS_PER_WORKER, plan_layout  # noqa: E402
from allmpnet.bulk.plan import auto_shard_rows, find_inputs, plan_shards  # noqa: E402
from allmpnet.bulk.readers import read_shard  # noqa: E402
from allmpnet.bulk.shards import MANIFEST, OutputDir, shard_table  # noqa: E402

WORDS = "the cat sat on a mat while the dog ran to the car in the sun".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 30)))) for _ in range(n)]


def read_all(path: Path, shard_rows: int, **fields):
    files = find_inputs([str(path)])
    shards = plan_shards(files, shard_rows, fields.get("id_field", "id"), fields.get("text_field", "text"),
                         fields.get("keep", ()))
    rows = [read_shard(s, fields.get("id_field", "id"), fields.get("text_field", "text"), fields.get("keep", ()))
            for s in shards]
    return shards, rows


def test_core_install_does_not_import_ray_or_pyarrow():
    code = ("import argparse, sys, allmpnet, allmpnet.bulk, allmpnet.cli.bulk, allmpnet.encode; "
            "allmpnet.cli.bulk.register(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('ray', 'pyarrow') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ---- planning and reading: no Ray ----------------------------------------------------------------------------

def test_jsonl_shards_cover_every_line_and_name_bad_rows(tmp_path):
    lines = [json.dumps({"id": "a", "text": "first"}).encode(),
             b'{"id": "b", "text": 5}',                      # line 2: text not a string
             json.dumps({"id": 3, "text": "third \u00e9"}).encode(),
             b"",                                             # line 4: empty
             b'{"text": "no id"}',                            # line 5
             b'{"id": true, "text": "bool id"}',              # line 6
             b'{"id": "g", "text": "caf\xe9"}',               # line 7: Latin-1, not UTF-8
             b"not json",                                     # line 8
             b'["a", "list"]',                                # line 9
             json.dumps({"id": "j", "text": ""}).encode(),    # line 10: empty text is still a text
             json.dumps({"id": "k", "text": "no newline at the end"}).encode()]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last record has no closing newline
    shards, rows = read_all(path, shard_rows=3)
    assert [(s.row_start, s.row_stop, s.first_line) for s in shards] == [(0, 3, 1), (3, 6, 4), (6, 9, 7),
                                                                         (9, 11, 10)]
    assert [i for r in rows for i in r.ids] == ["a", "3", "j", "k"]
    assert [t for r in rows for t in r.texts] == ["first", "third \u00e9", "", "no newline at the end"]
    bad = {where: why for r in rows for where, why in r.bad}
    assert sorted(bad) == sorted(f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8, 9))
    assert bad[f"{path}:2"] == "text 'text' is int, expected a string"
    assert bad[f"{path}:4"] == "empty line"
    assert "missing id" in bad[f"{path}:5"] and "bool" in bad[f"{path}:6"]
    assert "UTF-8" in bad[f"{path}:7"] and "not JSON" in bad[f"{path}:8"] and "list" in bad[f"{path}:9"]


def test_csv_quoted_newlines_stay_in_their_record(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b'id,text,lang\r\n'
                     b'1,plain,en\r\n'
                     b'2,"two\nlines, and ""quotes""",en\r\n'   # lines 3-4
                     b'3,after,fr\r\n'                          # line 5
                     b'4,too,many,cells\r\n'                    # line 6: bad
                     b',no id,en\r\n'                           # line 7: bad
                     b'6,"last\n\nrecord",de')                  # lines 8-10, no newline at the end
    shards, rows = read_all(path, shard_rows=2, keep=("lang",))
    assert [(s.row_start, s.row_stop, s.first_line) for s in shards] == [(0, 2, 2), (2, 4, 5), (4, 6, 7)]
    assert [i for r in rows for i in r.ids] == ["1", "2", "3", "6"]
    assert [t for r in rows for t in r.texts] == ["plain", 'two\nlines, and "quotes"', "after", "last\n\nrecord"]
    assert [m for r in rows for m in r.meta["lang"]] == ["en", "en", "fr", "de"]
    assert [b for r in rows for b in r.bad] == [(f"{path}:6", "4 columns, header has 3"),
                                                (f"{path}:7", "missing id 'id'")]
    for content, ids in [(b"id,text\n7,only row", ["7"]), (b"id,text\n", []), (b"id,text", [])]:
        path.write_bytes(content)
        assert [i for r in read_all(path, shard_rows=2)[1] for i in r.ids] == ids


def test_parquet_shards_cross_row_groups_and_name_null_rows(tmp_path):
    path = tmp_path / "rows.parquet"
    texts = [f"text {i}" for i in range(25)]
    texts[11] = None
    pq.write_table(pa.table({"doc": list(range(100, 125)), "body": texts, "n": [i * 1.5 for i in range(25)]}),
                   path, row_group_size=7)
    shards, rows = read_all(path, shard_rows=10, id_field="doc", text_field="body", keep=("n",))
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 10), (10, 20), (20, 25)]
    assert [i for r in rows for i in r.ids] == [str(100 + i) for i in range(25) if i != 11]
    assert [t for r in rows for t in r.texts] == [t for t in texts if t is not None]
    assert rows[1].bad == [(f"{path} row 12", "missing text 'body'")]
    assert rows[1].meta["n"].to_pylist() == [i * 1.5 for i in range(10, 20) if i != 11]


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "x.csv").write_text("id,text\n1,a\n")
    with pytest.raises(ValueError, match="no column 'body' in the header"):
        plan_shards(find_inputs([str(tmp_path / "x.csv")]), 5, "id", "body")
    pq.write_table(pa.table({"id": [1], "text": [2]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match="text column 'text' is int64"):
        plan_shards(find_inputs([str(tmp_path / "n.parquet")]), 5, "id", "text")
    (tmp_path / "c.jsonl.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="decompress it first"):
        find_inputs([str(tmp_path / "c.jsonl.gz")])
    with pytest.raises(FileNotFoundError):
        find_inputs([str(tmp_path / "missing.jsonl")])


def test_default_shard_size_follows_the_input_and_cuts_where_explicit_sizes_do(tmp_path):
    assert [auto_shard_rows(n) for n in (0, 500, 16_000, 100_000, 640_000, 10**8)] == [1000, 1000, 1000, 2000,
                                                                                        10_000, 10_000]
    texts = sentences(5_500, seed=4)
    write_jsonl(tmp_path / "a.jsonl", texts)
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(2_300)], "text": sentences(2_300, seed=5)}),
                   tmp_path / "b.parquet", row_group_size=700)
    files = find_inputs([str(tmp_path)])
    auto = plan_shards(files, None, "id", "text")  # 7,800 rows: the smallest default size, 1,000
    assert auto == plan_shards(files, 1000, "id", "text")  # the same cuts, bytes and lines as asked explicitly
    assert [(s.row_start, s.row_stop) for s in auto if s.format == "jsonl"] == [(k * 1000, min(5500, k * 1000 + 1000))
                                                                              for k in range(6)]
    many = [f"{t} {i}" for i in range(14) for t in texts]  # 77,000 rows: shards of 2,000
    write_jsonl(tmp_path / "a.jsonl", many)
    files = find_inputs([str(tmp_path / "a.jsonl")])
    assert plan_shards(files, None, "id", "text") == plan_shards(files, 2000, "id", "text")
    rows = read_shard(plan_shards(files, None, "id", "text")[7], "id", "text", ())
    assert rows.ids[0] == "doc-14000" and len(rows.ids) == 2000


def test_default_layout_uses_every_core():
    cap = MAX_THREADS_PER_WORKER
    # one node of 2 cores (this machine): one actor with both, not one 1-thread actor (the old default)
    assert (plan_layout([2.0], [0.0]).workers, plan_layout([2.0], [0.0]).threads) == (1, 2)
    assert (plan_layout([32.0], [0.0]).workers, plan_layout([32.0], [0.0]).threads) == (32 // cap, cap)
    two_nodes = plan_layout([16.0, 4.0], [0.0, 0.0])  # one actor size for the pool: every node holds some
    assert (two_nodes.workers, two_nodes.threads) == (5, 4)
    # workers given: the cores shared among them, never more than one node holds
    assert (plan_layout([2.0], [0.0], workers=2).threads, plan_layout([2.0], [0.0], workers=1).threads) == (1, 2)
    assert plan_layout([8.0, 8.0], [0.0, 0.0], workers=1).threads == 8
    # CPUs per worker given: as many workers as fit
    assert plan_layout([8.0, 4.0], [0.0, 0.0], cpus_per_worker=4).workers == 3
    gpu = plan_layout([16.0, 16.0], [2.0, 2.0], gpus_per_worker=0.5)
    assert (gpu.workers, gpu.cpus_per_worker, gpu.gpus_per_worker) == (8, 1.0, 0.5)


def test_an_address_nothing_answers_on_is_refused_at_once():
    import socket

    from allmpnet.bulk.cluster import check_reachable
    from allmpnet.errors import InvalidInput
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")  # closed now: refused, not retried for minutes as Ray would
    assert time.monotonic() - started < 5
    check_reachable("auto")  # Ray's own forms are left to Ray


def test_manifest_only_accepts_the_shard_it_describes(tmp_path):
    out = OutputDir(str(tmp_path))
    out.makedirs()
    table = shard_table(["a", "b"], np.ones((2, 4), np.float32), {})
    entry = out.commit_shard("shard-x.parquet", table, {"rows": 2})
    assert out.finished("shard-x.parquet") == entry
    data = (tmp_path / "shard-x.parquet").read_bytes()
    (tmp_path / "shard-x.parquet").write_bytes(data[: len(data) // 2])  # half-written
    assert out.finished("shard-x.parquet") is None
    (tmp_path / "shard-x.parquet").write_bytes(data)
    (tmp_path / MANIFEST / "shard-x.parquet.json").unlink()  # killed before its manifest entry
    assert out.finished("shard-x.parquet") is None
    assert not [p for p in tmp_path.rglob(".tmp-*")]


# ---- whole jobs on Ray ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": t, "tag": i % 3}) + "\n")
    return path


def test_job_matches_encoder_and_resume_skips_finished_shards(ray_cluster, tiny_model_dir, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    jsonl_texts, parquet_texts = sentences(230, seed=1), sentences(70, seed=2)
    write_jsonl(data / "a.jsonl", jsonl_texts)
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(70)], "text": parquet_texts,
                             "tag": [str(i) for i in range(70)]}), data / "b.parquet")
    config = BulkConfig(model=str(tiny_model_dir), shard_rows=50, workers=2, keep=("tag",))
    result = embed_corpus(str(data), str(tmp_path / "out"), config, progress=False)
    assert (result.shards, result.written, result.skipped, result.rows, result.bad_rows) == (7, 7, 0, 300, 0)
    assert 1 <= len(result.workers) <= 2 and sum(w["rows"] for w in result.workers.values()) == 300
    assert all(w["peak_rss_mb"] > 0 for w in result.workers.values())
    # 2 workers on 2 CPUs: 1 thread each, the CPU each reserved (Ray's OMP_NUM_THREADS and torch's count agree)
    assert [w["threads"] for w in result.workers.values()] == [1] * len(result.workers)

    ids, vectors, meta = read_embeddings(str(tmp_path / "out"))
    assert ids == [f"doc-{i}" for i in range(230)] + [f"p{i}" for i in range(70)]
    want = Encoder(tiny_model_dir, device="cpu").encode(jsonl_texts + parquet_texts)
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    assert meta["tag"][:4] == ["0", "1", "2", "0"] and meta["tag"][230:232] == ["0", "1"]
    assert pq.read_table(tmp_path / "out").num_rows == 300  # the directory reads as one dataset

    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")}
    again = embed_corpus(str(data), str(tmp_path / "out"), config, progress=False)
    assert (again.written, again.skipped, again.rows) == (0, 7, 300)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")} == stamps


def test_texts_holding_special_tokens_get_the_reference_vectors(ray_cluster, tiny_model_dir, tmp_path):
    from special_texts import SPECIAL_TEXTS, sentence_transformers_vectors
    data = write_jsonl(tmp_path / "special.jsonl", SPECIAL_TEXTS)
    result = embed_corpus(str(data), str(tmp_path / "out"), BulkConfig(model=str(tiny_model_dir), shard_rows=4,
                                                                       workers=1), progress=False)
    # one worker gets every core of the 2-CPU instance as its threads (it used to get 1 of them)
    assert [w["threads"] for w in result.workers.values()] == [2]
    ids, vectors, _ = read_embeddings(str(tmp_path / "out"))
    assert ids == [f"doc-{i}" for i in range(len(SPECIAL_TEXTS))]
    np.testing.assert_allclose(vectors, sentence_transformers_vectors(tiny_model_dir), atol=1e-5)

    with pytest.raises(ValueError, match="different settings"):
        embed_corpus(str(data), str(tmp_path / "out"), BulkConfig(model=str(tiny_model_dir), shard_rows=60),
                     progress=False)


def test_a_successful_run_prints_only_its_own_lines(tiny_model_dir, tmp_path):
    """No Ray start-up noise (a token-auth notice, the core worker's ERROR line about restartable actors, Ray
    Data's INFO lines) around the job's own output, on a Ray instance the command starts itself."""
    path = write_jsonl(tmp_path / "c.jsonl", sentences(30))
    cli = "import sys; from allmpnet.cli import main; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL")}
    run = subprocess.run([sys.executable, "-c", cli, "embed-corpus", str(path), "--out", str(tmp_path / "out"),
                          "--model", str(tiny_model_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("30 rows embedded into 1 shard(s)") and len(run.stdout.splitlines()) == 1
    assert "worker(s) x" in run.stdout and "starting Ray" in run.stdout
    noise = [line for line in run.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.lstrip().startswith("embedding:")]  # the progress bar's own lines
    assert noise == []


def test_bad_rows_fail_or_are_skipped_and_counted(ray_cluster, tiny_model_dir, tmp_path, capsys):
    from allmpnet.cli import main
    path = write_jsonl(tmp_path / "c.jsonl", sentences(40))
    with open(path, "a") as f:
        f.write('{"id": "x", "text": null}\n{"text": "orphan"}\n')  # lines 41, 42
    args = ["embed-corpus", str(path), "--out", str(tmp_path / "out"), "--model", str(tiny_model_dir),
            "--shard-rows", "16"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{path}:41: missing text 'text'" in err and f"{path}:42: missing id 'id'" in err
    assert main(args + ["--on-bad", "skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad row(s)" in out and "40 rows embedded into 3 shard(s)" in out
    ids, vectors, _ = read_embeddings(str(tmp_path / "out"))
    assert ids == [f"doc-{i}" for i in range(40)] and vectors.shape == (40, 32)


def test_worker_that_cannot_load_the_model_fails_the_job_with_its_reason(ray_cluster, tiny_model_dir, tmp_path,
                                                                          capsys):
    import shutil
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the driver resolves the directory; workers load it
    path = write_jsonl(tmp_path / "c.jsonl", sentences(5))
    with pytest.raises(BulkJobError, match="damaged or truncated"):
        embed_corpus(str(path), str(tmp_path / "out"), BulkConfig(model=str(broken), workers=1), progress=False)
    assert not list((tmp_path / "out").glob("shard-*"))
    # the same failure through the command: one line naming the cause, exit status 1
    from allmpnet.cli import main
    assert main(["embed-corpus", str(path), "--out", str(tmp_path / "out"), "--model", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "allmpnet embed-corpus: error:" in err and "damaged or truncated" in err


def test_killed_run_resumes_without_recomputing(ray_cluster, tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", sentences(3000, seed=3))
    cli = "import sys; from allmpnet.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", cli, "embed-corpus", str(path), "--model", str(tiny_model_dir),
               "--shard-rows", "100", "--address", ray_cluster]
    config = BulkConfig(model=str(tiny_model_dir), shard_rows=100)
    embed_corpus(str(path), str(tmp_path / "whole"), config, progress=False)  # uninterrupted, for comparison

    log = open(tmp_path / "log", "w")
    run = subprocess.Popen(command + ["--out", str(tmp_path / "out")], stdout=log, stderr=log)
    manifest = tmp_path / "out" / MANIFEST
    deadline = time.monotonic() + 120
    while not (manifest.is_dir() and len(list(manifest.glob("*.json"))) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    time.sleep(3)  # let Ray stop the dead driver's actors
    out = OutputDir(str(tmp_path / "out"))
    names = [f"shard-00000-{s:012d}-{s + 100:012d}.parquet" for s in range(0, 3000, 100)]
    finished = {n: (tmp_path / "out" / MANIFEST / f"{n}.json").read_text() for n in names if out.finished(n)}
    assert 2 <= len(finished) < len(names)

    result = embed_corpus(str(path), str(tmp_path / "out"), config, progress=False)
    assert (result.skipped, result.written, result.rows) == (len(finished), len(names) - len(finished), 3000)
    for name, entry in finished.items():  # untouched: not recomputed
        assert (tmp_path / "out" / MANIFEST / f"{name}.json").read_text() == entry
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    ids, _, _ = read_embeddings(str(tmp_path / "out"))
    assert ids == [f"doc-{i}" for i in range(3000)]
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_an_actor_killed_mid_job_is_restarted_and_every_row_is_written_once(ray_cluster, tiny_model_dir, tmp_path):
    """SIGKILL the one actor as soon as it has written a shard: Ray starts it again, the shard it held is run
    again, and the output is the uninterrupted job's, row for row."""
    texts = sentences(2000, seed=4)
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    manifest = tmp_path / "out" / MANIFEST
    killed = []

    def kill_the_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for entry in (manifest.glob("*.json") if manifest.is_dir() else []):
                pid = int(json.loads(entry.read_text())["worker"].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_actor)
    killer.start()
    result = embed_corpus(str(path), str(tmp_path / "out"), BulkConfig(model=str(tiny_model_dir), shard_rows=50,
                                                                       workers=1), progress=False)
    killer.join()
    assert killed, "no shard was written within 120 s"
    assert (result.shards, result.written, result.rows) == (40, 40, 2000)
    pids = [int(name.rsplit(":", 1)[1]) for name in result.workers]
    assert killed[0] in pids and len(pids) == 2  # the killed process and the one Ray started in its place
    ids, vectors, _ = read_embeddings(str(tmp_path / "out"))
    assert ids == [f"doc-{i}" for i in range(2000)]
    np.testing.assert_allclose(vectors, Encoder(tiny_model_dir, device="cpu").encode(texts), atol=1e-5)
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_a_shard_whose_worker_keeps_dying_fails_the_job_naming_it(ray_cluster, tiny_model_dir, tmp_path):
    """The worker killed whenever it is embedding the shard: the job stops after SHARD_RETRIES reruns with an
    error naming the shard, rather than restarting workers forever. (The killing stops after 90 s, so that a
    job that kept retrying would end, and fail the test, rather than hang it.)"""
    path = write_jsonl(tmp_path / "in.jsonl", sentences(20))
    done = threading.Event()
    deadline = time.monotonic() + 90

    def kill_workers() -> None:
        while not done.is_set() and time.monotonic() < deadline:
            for pid in os.listdir("/proc"):
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if pid.isdigit() and title.startswith(b"ray::ShardWorker.embed_shard"):  # Ray's title in a call
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)

    killer = threading.Thread(target=kill_workers)
    killer.start()
    try:
        with pytest.raises(BulkJobError, match=r"failed on shard-00000-000000000000-000000000020\.parquet"):
            embed_corpus(str(path), str(tmp_path / "out"), BulkConfig(model=str(tiny_model_dir), workers=1),
                         progress=False)
    finally:
        done.set()
        killer.join()
    assert not list((tmp_path / "out").glob("shard-*"))


@pytest.mark.real_weights
def test_real_weights_match_encoder(ray_cluster, real_encoder, shared_data, tmp_path):
    with open(shared_data / "STSBenchmark" / "sts.tsv") as f:
        texts = [line.split("\t")[0] for line in list(f)[1:25]]
    path = write_jsonl(tmp_path / "sts.jsonl", texts)
    result = embed_corpus(str(path), str(tmp_path / "out"),
                          BulkConfig(model=str(real_encoder.model_dir), shard_rows=12, workers=1), progress=False)
    assert (result.rows, result.written) == (24, 2)
    ids, vectors, _ = read_embeddings(str(tmp_path / "out"))
    assert ids == [f"doc-{i}" for i in range(24)] and vectors.shape == (24, 768)
    np.testing.assert_allclose(vectors, real_encoder.encode(texts), atol=1e-5)
