"""Training data: parsing and bad lines, the weighted sampler, batch purity, the duplicate window, state."""
import gzip
import json

import numpy as np
import pytest
from scipy.stats import chisquare

from allmpnet.train import DataError, build_sampler, load_data_config
from allmpnet.train.data import DatasetSpec, JsonlDataset


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_config(tmp_path, entries, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def pairs(prefix, n):
    return [[f"{prefix} anchor {i}", f"{prefix} positive {i}"] for i in range(n)]


def triplets(prefix, n):
    return [{"texts": [f"{prefix} a {i}", f"{prefix} p {i}", f"{prefix} n {i}"]} for i in range(n)]


def test_config_resolves_paths_next_to_it_and_reads_gz(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", pairs("a", 5))
    cfg = write_config(tmp_path, [{"name": "a.jsonl.gz", "weight": 3, "lines": 5}])
    (spec,) = load_data_config(cfg)
    assert spec.path == tmp_path / "a.jsonl.gz" and spec.weight == 3 and spec.lines == 5
    dataset = JsonlDataset(spec, buffer_size=2)
    got = {next(dataset) for _ in range(5)}
    assert got == {tuple(p) for p in pairs("a", 5)}


def test_missing_data_file_is_named(tmp_path):
    cfg = write_config(tmp_path, [{"name": "nope.jsonl", "weight": 1}])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_data_config(cfg)


@pytest.mark.parametrize("entry, message", [({"name": "a.jsonl", "weight": 0}, "positive integer"),
                                            ({"name": "a.jsonl", "weight": 1.5}, "positive integer"),
                                            ({"weight": 2}, "name")])
def test_bad_config_entries(tmp_path, entry, message):
    write_jsonl(tmp_path / "a.jsonl", pairs("a", 2))
    with pytest.raises(DataError, match=message):
        load_data_config(write_config(tmp_path, [entry]))


@pytest.mark.parametrize("line, message", [
    ('["only one"]', "expected 2 texts"),
    ('["a", "b", "c", "d"]', "expected 2 texts"),
    ('["a", ""]', "text 1 is empty"),
    ('["a", "   "]', "text 1 is empty"),
    ('["a", 3]', "text 1 is int"),
    ('{"texts": "ab"}', "expected a list"),
    ('{"text": ["a", "b"]}', "expected a list"),
    ('["a", "b"', "malformed JSON"),
    ('["x", "y", "z"]', "wrong column count"),
])
def test_bad_line_stops_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [["good", "pair"], line, ["another", "pair"]])
    dataset = JsonlDataset(DatasetSpec(path, 1))
    with pytest.raises(DataError, match=message) as info:
        for _ in range(3):
            next(dataset)
    assert f"{path}:2:" in str(info.value)


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'["good", "pair"]\n["bad \xff", "x"]\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
        list(next(JsonlDataset(DatasetSpec(path, 1))) for _ in range(2))


def test_skip_bad_counts_every_skipped_line(tmp_path):
    rows = [["a0", "b0"], "not json", ["a1", "b1"], '["x"]', ["a2", ""], ["a3", "b3"]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset = JsonlDataset(DatasetSpec(path, 1), skip_bad=True)
    got = [next(dataset) for _ in range(6)]  # two passes over the 3 good lines
    assert sorted(set(got)) == [("a0", "b0"), ("a1", "b1"), ("a3", "b3")]
    assert dataset.bad.count == 3  # each bad line counted once, however many passes
    assert f"{path}:2:" in dataset.bad.first[0]


def test_file_without_good_lines_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["nope", "[1]"])
    with pytest.raises(DataError, match="no usable example"):
        next(JsonlDataset(DatasetSpec(path, 1), skip_bad=True))


def test_small_file_is_reshuffled_each_pass(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pairs("x", 30))
    dataset = JsonlDataset(DatasetSpec(path, 1), seed=1)
    first = [next(dataset) for _ in range(30)]
    second = [next(dataset) for _ in range(30)]
    assert sorted(first) == sorted(second) == sorted(tuple(p) for p in pairs("x", 30))
    assert first != second
    assert first != [tuple(p) for p in pairs("x", 30)]


def test_sampler_frequencies_follow_weights(tmp_path):
    weights = [1, 2, 5]
    entries = []
    for k, w in enumerate(weights):
        write_jsonl(tmp_path / f"d{k}.jsonl", pairs(f"d{k}", 50))
        entries.append({"name": f"d{k}.jsonl", "weight": w})
    sampler = build_sampler(write_config(tmp_path, entries), batch_size=2, seed=7, dedup_window=1)
    draws = 4000
    counts = np.bincount([sampler.choose_dataset() for _ in range(draws)], minlength=3)
    expected = np.array(weights) / sum(weights) * draws
    assert chisquare(counts, expected).pvalue > 0.001
    # a uniform sampler would be rejected by the same test
    assert chisquare(np.full(3, draws / 3), expected).pvalue < 1e-6


def test_batches_come_from_one_dataset_and_never_mix_pairs_and_triplets(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", pairs("p", 40))
    write_jsonl(tmp_path / "t.jsonl", triplets("t", 40))
    sampler = build_sampler(write_config(tmp_path, [{"name": "p.jsonl", "weight": 1},
                                                    {"name": "t.jsonl", "weight": 1}]), batch_size=4, seed=0)
    kinds = set()
    for _ in range(50):
        batch = sampler.next_batch()
        prefix = "p" if batch.dataset == 0 else "t"
        assert len(batch.columns) == (2 if prefix == "p" else 3)
        assert all(len(c) == 4 for c in batch.columns)
        assert all(t.startswith(prefix + " ") for column in batch.columns for t in column)
        kinds.add(len(batch.columns))
    assert kinds == {2, 3}


def test_dedup_window_holds(tmp_path):
    # few distinct texts, many repeats: anchors cycle through 12 values, positives through 7
    rows = [[f"anchor {i % 12}", f"positive {i % 7}"] for i in range(200)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    window = 2
    sampler = build_sampler(write_config(tmp_path, [{"name": "d.jsonl", "weight": 1}]), batch_size=3, seed=0,
                            dedup_window=window)
    batches = [sampler.next_batch() for _ in range(30)]
    for b, batch in enumerate(batches):
        texts = [t for column in batch.columns for t in column]
        assert len(texts) == len(set(texts)), "a text repeats within a batch"
        if b > 0:
            previous = {t for column in batches[b - 1].columns for t in column}
            assert not previous & set(texts), "a text repeats within the window"
    assert sum(sampler.skipped.values()) > 0


def test_sampler_that_cannot_fill_a_batch_says_so(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [["same", f"p{i}"] for i in range(5)])
    sampler = build_sampler(write_config(tmp_path, [{"name": "d.jsonl", "weight": 1}]), batch_size=2)
    with pytest.raises(DataError, match="cannot fill a batch"):
        sampler.next_batch()


def test_sampler_state_restores_the_exact_stream(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", pairs("a", 23))
    write_jsonl(tmp_path / "b.jsonl", triplets("b", 17))
    cfg = write_config(tmp_path, [{"name": "a.jsonl", "weight": 2}, {"name": "b.jsonl", "weight": 1}])
    sampler = build_sampler(cfg, batch_size=4, seed=3, buffer_size=5)
    for _ in range(9):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict(), default=lambda b: b.hex()))  # survives serialisation?
    state["recent"] = [[bytes.fromhex(k) for k in keys] for keys in state["recent"]]
    expected = [sampler.next_batch() for _ in range(12)]
    restored = build_sampler(cfg, batch_size=4, seed=3, buffer_size=5)
    restored.load_state_dict(state)
    assert [restored.next_batch() for _ in range(12)] == expected
