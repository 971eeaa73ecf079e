"""Long documents: chunking on the tokenizer's offsets (sizes, breaks, overlap, spans), document indexes ranked by
their best chunk (API, CLI, server), and plain indexes left as they were (tiny model)."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from allmpnet import Encoder
from allmpnet.cli import main
from allmpnet.cli import search as cli_search
from allmpnet.encode import documents
from allmpnet.encode.documents import ChunkSettings, break_levels, split_points
from allmpnet.search import Index
from allmpnet.serve import ServeConfig, create_app
from allmpnet.serve.background import BackgroundServer
from boundaries import EPS, assert_top_k, cosines64

WORDS = "the cat dog car plant sun moon world text search query sentence example hello test".split()


def sentence(rng, n_words: int) -> str:
    words = [str(w) for w in rng.choice(WORDS, size=n_words)]
    return " ".join(words).capitalize() + "."


def document(seed: int, paragraphs: int = 6, sentences: int = 5) -> str:
    rng = np.random.default_rng(seed)
    return "\n\n".join(" ".join(sentence(rng, int(rng.integers(4, 12))) for _ in range(sentences))
                       for _ in range(paragraphs))


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    return Encoder(tiny_model_dir, device="cpu")  # max_seq_length 64


def test_chunks_fit_cover_the_text_and_come_from_its_offsets(tiny_encoder):
    docs = [document(0), document(1, paragraphs=1, sentences=30), "short text."]
    settings = ChunkSettings(chunk_tokens=40, overlap=8)
    ids, positions, spans = documents.chunk_token_ranges(tiny_encoder.tokenizer, docs, settings)
    whole = tiny_encoder.tokenizer.tokenize_whole(docs)
    assert positions == sorted(positions) and set(positions) == {0, 1, 2}
    for d, doc in enumerate(docs):
        rows = [i for i, p in enumerate(positions) if p == d]
        doc_spans = [spans[i] for i in rows]
        # every chunk fits the budget with its two special tokens, and nothing is cut
        assert all(len(ids[i]) <= 40 and ids[i][0] == 0 and ids[i][-1] == 2 for i in rows)
        # the word pieces of the chunks are runs of the document's own tokenization
        pieces = whole[d].ids
        starts = [whole[d].offsets.index(next(o for o in whole[d].offsets if o[0] == s)) for s, _ in doc_spans]
        for i, start in zip(rows, starts):
            body = ids[i][1:-1]
            assert pieces[start:start + len(body)] == body
        # every non-space character is inside some chunk; consecutive chunks overlap by at most 8 word pieces
        covered = np.zeros(len(doc), bool)
        for s, e in doc_spans:
            covered[s:e] = True
        assert all(covered[i] or doc[i].isspace() for i in range(len(doc)))
        for (s0, e0), (s1, e1), first in zip(doc_spans, doc_spans[1:], starts[1:]):
            assert s0 < s1 <= e0 + 2 and e1 > e0
            previous_end = whole[d].offsets.index(next(o for o in whole[d].offsets if o[1] == e0)) + 1
            assert previous_end - first <= 8
    assert [spans[i] for i, p in enumerate(positions) if p == 2] == [(0, len("short text."))]


def test_chunks_end_at_paragraphs_then_sentences(tiny_encoder):
    docs = [document(2), document(3, paragraphs=1, sentences=40)]
    ids, positions, spans = documents.chunk_token_ranges(tiny_encoder.tokenizer, docs, ChunkSettings(60, 0))
    paragraph_ends = {len(p) + docs[0].find(p) for p in docs[0].split("\n\n")}
    chunk_ends = [e for (s, e), p in zip(spans, positions) if p == 0]
    # paragraphs here are shorter than a chunk: every chunk ends at a paragraph end
    assert set(chunk_ends) <= paragraph_ends
    one_paragraph = [docs[1][s:e] for (s, e), p in zip(spans, positions) if p == 1]
    assert len(one_paragraph) > 3 and all(p.endswith(".") for p in one_paragraph)
    assert all(p[0].isupper() for p in one_paragraph)  # and starts at a sentence start


def test_break_levels_and_split_points_by_hand(tiny_encoder):
    text = "Hello world. The cat\n\nsat.x-y"
    encoding = tiny_encoder.tokenizer.tokenize_whole([text])[0]
    assert encoding.tokens == ["hello", "world", ".", "the", "cat", "s", "##a", "##t", ".", "x", "-", "y"]
    levels = break_levels(text, encoding.offsets, encoding.word_ids)
    assert levels.tolist() == [documents.PARAGRAPH,  # the document's start
                               documents.SPACE,      # hello | world
                               documents.NO_SPACE,   # world | .
                               documents.SENTENCE,   # . | The
                               documents.SPACE,      # the | cat
                               documents.PARAGRAPH,  # cat | (blank line) sat
                               documents.INSIDE_WORD, documents.INSIDE_WORD,  # s | ##a | ##t
                               documents.NO_SPACE, documents.NO_SPACE, documents.NO_SPACE, documents.NO_SPACE,
                               documents.PARAGRAPH]  # the document's end
    assert documents.ends_sentence('He said "stop."', 15) and not documents.ends_sentence("e.g", 3)
    # a run of pieces with no break at all is still cut, at the limit
    assert split_points(np.array([4] + [0] * 9 + [4], np.int8), room=4, overlap=0) == [(0, 4), (4, 8), (8, 10)]
    # the latest best break in the second half wins; overlap restarts at the earliest best break it covers
    levels = np.array([4, 2, 2, 3, 2, 3, 2, 2, 2, 2, 4], np.int8)
    assert split_points(levels, room=6, overlap=0) == [(0, 5), (5, 10)]
    assert split_points(levels, room=6, overlap=2) == [(0, 5), (3, 9), (7, 10)]
    assert split_points(np.array([4, 4], np.int8), room=6, overlap=2) == [(0, 1)]
    assert split_points(np.array([4], np.int8), room=6, overlap=2) == [(0, 0)]


def test_encode_documents_vectors_and_errors(tiny_encoder):
    docs = [document(4), "", "one more short document."]
    chunks = tiny_encoder.encode_documents(docs, chunk_tokens=48, overlap=8)
    assert chunks.vectors.shape == (len(chunks), tiny_encoder.dim) and chunks.vectors.dtype == np.float32
    assert chunks.documents.tolist() == sorted(chunks.documents.tolist())
    assert chunks.documents.tolist().count(1) == 1 and chunks.spans[chunks.of(1)].tolist() == [[0, 0]]
    passages = chunks.passages(docs)
    # each chunk's vector is the vector of its passage (these passages tokenize alone as they did in place)
    np.testing.assert_allclose(chunks.vectors, tiny_encoder.encode(passages), atol=1e-5)
    assert chunks.of(0) == slice(0, int((chunks.documents == 0).sum()))
    single = tiny_encoder.encode_documents(docs[0], chunk_tokens=48, overlap=8)
    np.testing.assert_allclose(single.vectors, chunks.vectors[chunks.of(0)], atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_length"):
        tiny_encoder.encode_documents(docs, chunk_tokens=65)
    with pytest.raises(ValueError, match="at most half"):
        tiny_encoder.encode_documents(docs, chunk_tokens=40, overlap=20)
    with pytest.raises(ValueError, match="at least 8"):
        tiny_encoder.encode_documents(docs, chunk_tokens=4)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tiny_encoder.encode_documents(["a", 3])
    assert (documents.DEFAULT_CHUNK_TOKENS, documents.DEFAULT_OVERLAP) == (cli_search.CHUNK_TOKENS,
                                                                           cli_search.OVERLAP)


def best_chunks(encoder, docs, query, settings):
    """Each document's best chunk cosine (float64, from encode_documents' vectors, by hand), and the spans of its
    chunks that score within EPS of that best (any of them may be reported as the best: boundaries.py)."""
    chunks = encoder.encode_documents(docs, settings.chunk_tokens, settings.overlap)
    cos = cosines64(encoder.encode(query), chunks.vectors)[0]
    best = {d: float(cos[chunks.of(d)].max()) for d in range(len(docs))}
    spans = {d: {tuple(span) for span, c in zip(chunks.spans[chunks.of(d)], cos[chunks.of(d)]) if c >= best[d] - EPS}
             for d in range(len(docs))}
    return best, spans


@pytest.mark.parametrize("exact", [True, False])
def test_document_index_ranks_documents_by_best_chunk(tmp_path, tiny_encoder, exact):
    docs = [document(10 + i, paragraphs=2 + i % 4) for i in range(12)]
    ids = [f"doc-{i}" for i in range(len(docs))]
    settings = ChunkSettings(32, 4)
    index = Index.build(tmp_path / "ix", texts=docs, ids=ids, metadata=[{"n": i} for i in range(len(docs))],
                        encoder=tiny_encoder, chunking=settings)
    assert index.chunking == {"chunk_tokens": 32, "overlap": 4, "documents": 12}
    assert index.record_count == 12 and len(index) > 12 and index.ids() == ids
    assert index.info()["documents"] == 12
    for query in ["the cat and the moon", "hello world example"]:
        best, spans = best_chunks(tiny_encoder, docs, query, settings)
        hits = index.search(query, k=5, exact=exact)
        found = [ids.index(h.id) for h in hits]
        assert_top_k(found, best, k=5)  # documents by their best chunk, in order but for near-ties
        for hit, d in zip(hits, found):
            assert hit.score == pytest.approx(best[d], abs=1e-5)
            assert len(spans[d]) <= 2, f"doc {d}: {len(spans[d])} chunks tie for the best"
            assert hit.span in spans[d] and hit.text == docs[d][hit.span[0]:hit.span[1]]
            assert hit.metadata == {"n": d}
            assert index.document_text(hit.row) == docs[d]
    # more documents asked than the first row window holds: the window widens until k documents are found
    assert len(index.search("the cat", k=12, exact=exact)) == 12
    assert len(index.search("the cat", k=50, exact=exact)) == 12


def test_add_chunks_as_recorded_and_plain_indexes_unchanged(tmp_path, tiny_encoder):
    docs = [document(20), document(21)]
    index = Index.build(tmp_path / "ix", texts=docs, ids=["a", "b"], encoder=tiny_encoder,
                        chunking=ChunkSettings(40, 0))
    new = document(22, paragraphs=3)
    index = index.add(texts=[new], ids=["c"])
    assert index.chunking["documents"] == 3 and index.ids() == ["a", "b", "c"]
    expected = tiny_encoder.encode_documents([new], 40, 0)
    rows = [h for h in index.search(expected.vectors[0], k=3) if h.id == "c"]
    assert rows and rows[0].span == tuple(expected.spans[0]) and rows[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="duplicate id"):
        index.add(texts=[new], ids=["c"])
    with pytest.raises(ValueError, match="not vectors"):
        index.add(vectors=np.ones((1, tiny_encoder.dim), np.float32), ids=["d"])
    plain = Index.build(tmp_path / "plain", texts=docs, ids=["a", "b"], encoder=tiny_encoder)
    manifest = json.loads((plain.version / "manifest.json").read_text())
    assert "chunking" not in manifest and plain.chunking is None and plain.record_count == len(plain) == 2
    hit = plain.search(docs[0], k=1)[0]
    assert hit.span is None and hit.text == docs[0]
    assert [json.loads(line) for line in (plain.version / "docs.jsonl").read_text().splitlines()][0] == \
        {"id": "a", "text": docs[0], "metadata": {}}


def test_cli_chunked_build_search_add(tmp_path, tiny_model_dir, capsys):
    docs = [document(30 + i) for i in range(4)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "source": "test"}) + "\n"
                              for i, t in enumerate(docs)))
    model = ["--model", str(tiny_model_dir)]
    assert main(["index", "build", str(corpus), "--out", str(tmp_path / "ix"), "--chunk", "--chunk-tokens", "40",
                 "--overlap", "4"] + model) == 0
    assert "4 documents as" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "ix"), "the moon", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and len({h["id"] for h in hits}) == 3
    for h in hits:
        d = int(h["id"][1:])
        assert h["text"] == docs[d][h["span"][0]:h["span"][1]] and h["metadata"] == {"source": "test"}
    assert main(["search", str(tmp_path / "ix"), "the moon", "-k", "1"]) == 0
    assert " chars " in capsys.readouterr().out

    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"id": "d9", "text": document(39)}) + "\n")
    assert main(["index", "add", str(tmp_path / "ix"), str(more)]) == 0
    assert "added 1 documents" in capsys.readouterr().out
    index = Index.open(tmp_path / "ix")
    assert index.chunking == {"chunk_tokens": 40, "overlap": 4, "documents": 5}
    expected = Encoder(tiny_model_dir, device="cpu").encode_documents([document(39)], 40, 4)
    assert sum(1 for d in index.iter_docs() if d["id"] == "d9") == len(expected)

    assert main(["index", "build", str(corpus), "--out", str(tmp_path / "x"), "--chunk-tokens", "40"] + model) == 2
    assert "add --chunk" in capsys.readouterr().err
    assert main(["index", "build", str(corpus), "--out", str(tmp_path / "y"), "--chunk", "--chunk-tokens", "100"]
                + model) == 2
    assert "max_seq_length" in capsys.readouterr().err


def test_server_search_returns_documents_with_spans(tmp_path, tiny_encoder):
    docs = [document(40 + i) for i in range(5)]
    index = Index.build(tmp_path / "ix", texts=docs, ids=[f"d{i}" for i in range(5)], encoder=tiny_encoder,
                        chunking=ChunkSettings(32, 0))
    with BackgroundServer(create_app(tiny_encoder, ServeConfig(), index)) as url:
        r = httpx.post(f"{url}/search", json={"query": "hello moon", "k": 3})
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        expected = index.search("hello moon", k=3)
        assert [h["id"] for h in hits] == [h.id for h in expected]
        assert [tuple(h["span"]) for h in hits] == [h.span for h in expected]
        assert all(h["text"] == docs[int(h["id"][1:])][h["span"][0]:h["span"][1]] for h in hits)
