"""index build|add|info, search, cluster, mine-paraphrases."""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import warnings
from pathlib import Path
from typing import Iterator

from allmpnet.cli.core import add_precision_arg
from allmpnet.errors import InvalidInput
from allmpnet.weights import DEFAULT_MODEL

SHOWN_CHARS = 160  # text shown per hit or example on the terminal; --json gives whole texts
CHUNK_TOKENS, OVERLAP = 128, 16  # encode/documents.py's defaults (not imported: `--help` stays free of torch)
PLAIN_MAX_CHARS = 100_000  # a plain index embeds 384 word pieces of a row: longer rows are almost all unembedded
DOCUMENT_MAX_CHARS = 10_000_000  # a document index embeds every character: this only guards memory


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build, extend or describe a persistent vector index")
    sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    p = sub.add_parser("build", help="embed a corpus (.txt/.jsonl/.csv) into a new index folder")
    p.add_argument("corpus", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True, help="index folder (created; must be new or empty)")
    add_corpus_args(p)
    p.add_argument("--vectors", type=Path, help="precomputed embeddings (.npy, one row per good corpus row, in "
                   "order) instead of encoding; the model is still recorded for text queries")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "i8", "b1"],
                   help="how the HNSW graph stores vectors (i8/b1: smaller; hits are re-scored in float32)")
    p.add_argument("--connectivity", type=int, default=16, help="HNSW links per node (M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out (atomically)")
    p.add_argument("--chunk", action="store_true",
                   help="a document index: embed each row whole as chunks (nothing truncated); search returns "
                        "documents ranked by their best chunk, with the passage and its span; recorded in the "
                        "index, so `index add` chunks the same way")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help=f"with --chunk: model tokens per chunk, at most the model's max_seq_length (default "
                        f"{CHUNK_TOKENS}, or the model's max_seq_length if shorter)")
    p.add_argument("--overlap", type=int, default=None,
                   help=f"with --chunk: word pieces a chunk repeats from the one before (default {OVERLAP})")
    add_encoder_args(p, default_model=DEFAULT_MODEL)
    p.set_defaults(func=cmd_index_build)

    p = sub.add_parser("add", help="add rows with new ids to an index (a new version, written atomically)")
    p.add_argument("index", type=Path)
    p.add_argument("corpus", type=Path)
    add_corpus_args(p)
    add_encoder_args(p, default_model=None)
    p.set_defaults(func=cmd_index_add)

    p = sub.add_parser("info", help="describe an index (rows, model, dimension, storage); checks every checksum")
    p.add_argument("index", type=Path)
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_index_info)

    p = subparsers.add_parser("search", help="top-k hits from an index for one or more queries")
    p.add_argument("index", type=Path)
    p.add_argument("query", nargs="*", help="query text(s)")
    p.add_argument("--queries", type=Path, help="a file of queries (.txt lines, or .jsonl/.csv with --query-field)")
    p.add_argument("--query-field", default="text", help="JSONL field or CSV column of --queries")
    p.add_argument("-k", type=int, default=10, help="hits per query")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--exact", dest="exact", action="store_true", default=None,
                     help="score every row (default for indexes of at most 20,000 rows)")
    how.add_argument("--ann", dest="exact", action="store_false", help="re-score HNSW candidates, whatever the size")
    p.add_argument("--json", action="store_true", help="one JSON object per query (whole texts and metadata)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the index files on open")
    add_encoder_args(p, default_model=None)
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser("cluster", help="cluster the texts of a file: community detection or k-means")
    p.add_argument("input", type=Path)
    add_corpus_args(p)
    p.add_argument("--method", choices=["community", "kmeans"], default="community")
    p.add_argument("--threshold", type=float, default=0.75, help="community: cosine to the centre")
    p.add_argument("--min-size", type=int, default=10, help="community: smallest community kept")
    p.add_argument("--clusters", "-n", type=int, default=8, help="kmeans: number of clusters")
    p.add_argument("--examples", type=int, default=3, help="texts shown per cluster")
    p.add_argument("--out", "-o", type=Path, help="assignments CSV (id,line,cluster); default INPUT.clusters.csv")
    add_encoder_args(p, default_model=DEFAULT_MODEL)
    p.set_defaults(func=cmd_cluster)

    p = subparsers.add_parser("mine-paraphrases", help="the most similar pairs of texts in a file")
    p.add_argument("input", type=Path)
    add_corpus_args(p)
    p.add_argument("--top-k", type=int, default=100, help="neighbours considered per text")
    p.add_argument("--max-pairs", type=int, default=500_000)
    p.add_argument("--min-score", type=float, default=None, help="drop pairs below this cosine")
    p.add_argument("--show", type=int, default=20, help="pairs printed")
    p.add_argument("--out", "-o", type=Path, help="all pairs as CSV (score,id1,id2,text1,text2)")
    add_encoder_args(p, default_model=DEFAULT_MODEL)
    p.set_defaults(func=cmd_mine)


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text",
                   help="JSONL field(s)/CSV column(s) with the text; several, comma-separated, are joined by a space")
    p.add_argument("--id-field", default=None,
                   help="field with each row's id (default: 'id' or '_id' when present, else the line number)")
    p.add_argument("--meta-fields", default=None, help="fields kept as metadata, comma-separated (default: all others)")
    p.add_argument("--max-chars", type=int, default=None,
                   help=f"longer texts are bad rows (default {PLAIN_MAX_CHARS:,}; {DOCUMENT_MAX_CHARS:,} in a "
                        "document index)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--batch-size", type=int, default=32)


def add_encoder_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", "-m", default=default_model,
                   help="model name, hub id or directory" + ("" if default_model else " (default: the index's)"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    add_precision_arg(p)


def corpus_spec(args: argparse.Namespace, documents: bool = False):
    from allmpnet.search import CorpusSpec
    split = lambda s: tuple(f.strip() for f in s.split(",") if f.strip())  # noqa: E731
    max_chars = args.max_chars if args.max_chars is not None else (DOCUMENT_MAX_CHARS if documents
                                                                   else PLAIN_MAX_CHARS)
    if max_chars < 1:
        raise InvalidInput("--max-chars must be at least 1")
    return CorpusSpec(text_fields=split(args.text_field), id_field=args.id_field,
                      meta_fields=split(args.meta_fields) if args.meta_fields is not None else None,
                      max_chars=max_chars)


def load_encoder(args: argparse.Namespace, model: str):
    from allmpnet.encode import Encoder
    return Encoder(model, device=args.device, precision=args.precision)


def batched(items: Iterator, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"… (+{len(text) - SHOWN_CHARS} chars)"


def read_corpus(args: argparse.Namespace, path: Path, existing_ids=frozenset(), documents: bool = False):
    from allmpnet.search import iter_records, scan
    spec = corpus_spec(args, documents)
    report = scan(path, spec, existing_ids, skip_bad=args.skip_bad)
    return report, spec, iter_records(path, report, spec)


def append_corpus(writer, encoder, records, report, batch_size: int, vectors=None) -> int:
    """Encode and append the rows in chunks with one progress bar; returns how many texts were truncated.

    The bar moves after every model batch, not every chunk: a chunk of 4,096 rows is minutes of the real model on
    a CPU, and a corpus of a few hundred rows would otherwise sit at 0 until its one chunk is done."""
    from tqdm.auto import tqdm
    truncated, done = 0, 0
    with tqdm(total=report.rows, desc="indexing", unit="row") as bar:
        for chunk in batched(records, 4096):
            texts = [r.text for r in chunk]
            if vectors is None:
                # tokenized once: the truncation count and the model's inputs come from the same pass
                tokenized = encoder.tokenizer(texts)
                truncated += sum(tokenized.truncated)
                # encode()'s own path for a chunk below its sort window: the same batches, the same vectors
                chunk_vectors = encoder.encode_ids(tokenized.ids, batch_size, progress=bar.update).numpy()
            else:
                chunk_vectors = vectors[done:done + len(chunk)]
                bar.update(len(chunk))
            writer.append([r.id for r in chunk], texts, [r.metadata for r in chunk], chunk_vectors)
            done += len(chunk)
    return truncated


def append_documents(writer, encoder, records, report, batch_size: int) -> int:
    """Chunk, encode and append documents in groups with one progress bar (in documents, moving after every model
    batch by the share of the group's chunks done); returns the number of chunks."""
    import numpy as np
    from tqdm.auto import tqdm

    from allmpnet.encode.documents import ChunkSettings, DocumentChunks, chunk_token_ranges
    from allmpnet.encode.encoder import check_texts
    settings = ChunkSettings.for_model(encoder.max_seq_length, writer.chunking["chunk_tokens"],
                                       writer.chunking["overlap"])
    chunks_written = 0
    with tqdm(total=report.rows, desc="indexing documents", unit="doc") as bar:
        for group in document_groups(records):
            texts = check_texts([r.text for r in group])
            # what Encoder.encode_documents does for one window (a group is smaller than its 2M-character window)
            ids, documents, spans = chunk_token_ranges(encoder.tokenizer, texts, settings)
            progress = GroupProgress(bar, len(group), len(ids))
            vectors = encoder.encode_ids(ids, batch_size, progress=progress).numpy() if ids else \
                np.zeros((0, encoder.dim), np.float32)
            progress.finish()
            chunks = DocumentChunks(vectors, np.asarray(documents, dtype=np.int64).reshape(-1),
                                    np.asarray(spans, dtype=np.int64).reshape(-1, 2))
            writer.append_documents([r.id for r in group], texts, [r.metadata for r in group], chunks)
            chunks_written += len(chunks)
    return chunks_written


class GroupProgress:
    """Advances a bar counted in documents as a group's chunks are embedded: whole documents' worth at a time."""

    def __init__(self, bar, documents: int, chunks: int):
        self.bar, self.documents, self.chunks = bar, documents, chunks
        self.rows_done, self.shown = 0, 0

    def __call__(self, rows: int) -> None:
        self.rows_done += rows
        self._show(self.documents * self.rows_done // max(self.chunks, 1))

    def finish(self) -> None:
        self._show(self.documents)

    def _show(self, documents: int) -> None:
        if documents > self.shown:
            self.bar.update(documents - self.shown)
            self.shown = documents


def document_groups(records, max_chars: int = 1_000_000, max_docs: int = 1024) -> Iterator[list]:
    """Consecutive records of about max_chars characters together (one longer document is a group alone)."""
    group, size = [], 0
    for record in records:
        if group and (size + len(record.text) > max_chars or len(group) == max_docs):
            yield group
            group, size = [], 0
        group.append(record)
        size += len(record.text)
    if group:
        yield group


def report_read(report, truncated: int, encoder) -> None:
    print(f"read {report.path}: {report.summary()}; ids from "
          f"{repr(report.id_field) if report.id_field else 'line numbers'}")
    if truncated:
        print(f"note: {truncated} text(s) were longer than {encoder.max_seq_length} word pieces; only their first "
              f"{encoder.max_seq_length} are embedded (the whole text is stored)")


def cmd_index_build(args: argparse.Namespace) -> None:
    import numpy as np

    from allmpnet.search import AnnConfig, Index, open_writer
    from allmpnet.search.index import check_build_target, model_signature
    ann = AnnConfig(dtype=args.dtype, connectivity=args.connectivity)
    if not args.chunk and (args.chunk_tokens is not None or args.overlap is not None):
        raise InvalidInput("--chunk-tokens and --overlap shape a document index: add --chunk")
    if args.chunk and args.vectors is not None:
        raise InvalidInput("--vectors gives one vector per row; a document index (--chunk) embeds its chunks itself")
    check_build_target(args.out, args.overwrite)  # before reading or embedding anything
    report, _, records = read_corpus(args, args.corpus, documents=args.chunk)
    encoder = load_encoder(args, args.model)
    if args.chunk:
        build_document_index(args, ann, report, records, encoder)
        return
    vectors = None
    if args.vectors is not None:
        vectors = np.load(args.vectors, mmap_mode="r")
        if vectors.ndim != 2 or vectors.shape != (report.rows, encoder.dim):
            raise InvalidInput(f"{args.vectors} has shape {vectors.shape}; expected ({report.rows}, {encoder.dim}): "
                               "one row per good corpus row from this model")
    with open_writer(args.out, dim=encoder.dim, model=model_signature(encoder), ann=ann,
                     overwrite=args.overwrite) as writer:
        truncated = append_corpus(writer, encoder, records, report, args.batch_size, vectors)
    report_read(report, truncated, encoder)
    info = Index.open(args.out, verify=False).info()
    print(f"built {args.out}: {info['count']} rows, {info['dim']}-d, HNSW {info['ann_dtype']}, "
          f"{info['bytes'] / 1e6:.1f} MB ({info['version']})")


def build_document_index(args: argparse.Namespace, ann, report, records, encoder) -> None:
    from allmpnet.encode.documents import ChunkSettings
    from allmpnet.search import Index, open_writer
    from allmpnet.search.index import model_signature
    settings = ChunkSettings.for_model(encoder.max_seq_length, args.chunk_tokens, args.overlap)
    settings.text_tokens(len(sum(encoder.tokenizer.special_ids, [])))  # a bad overlap fails before any encoding
    with open_writer(args.out, dim=encoder.dim, model=model_signature(encoder), ann=ann, overwrite=args.overwrite,
                     chunking=settings) as writer:
        chunks = append_documents(writer, encoder, records, report, args.batch_size)
    report_read(report, 0, encoder)
    info = Index.open(args.out, verify=False).info()
    print(f"built {args.out}: {info['documents']} documents as {chunks} chunks of at most {settings.chunk_tokens} "
          f"tokens (overlap {settings.overlap}), {info['dim']}-d, HNSW {info['ann_dtype']}, "
          f"{info['bytes'] / 1e6:.1f} MB ({info['version']})")


def open_for_text(args: argparse.Namespace, verify: bool = True):
    """The index plus the encoder for its model (or --model, refused if it is not the index's model)."""
    from allmpnet.search import Index
    index = Index.open(args.index, verify=verify)
    signature = index.manifest["model"]
    if signature is None and args.model is None:
        raise InvalidInput(f"{args.index} was built from vectors without a model; pass --model to embed queries "
                           "(it is taken on trust: nothing records which model made the vectors)")
    index.use_encoder(load_encoder(args, args.model or signature["name"]))
    return index


def cmd_index_add(args: argparse.Namespace) -> None:
    from allmpnet.search import Index, open_writer
    index = open_for_text(args, verify=False)
    documents = bool(index.chunking)
    report, _, records = read_corpus(args, args.corpus, existing_ids=set(index.ids()), documents=documents)
    before, records_before = len(index), index.record_count
    with open_writer(args.index, extend=True) as writer:
        if documents:  # chunked as the index records
            append_documents(writer, index.encoder, records, report, args.batch_size)
            truncated = 0
        else:
            truncated = append_corpus(writer, index.encoder, records, report, args.batch_size)
    report_read(report, truncated, index.encoder)
    after = Index.open(args.index, verify=False)
    if documents:
        print(f"added {after.record_count - records_before} documents ({len(after) - before} chunks) to "
              f"{args.index}: {after.record_count} documents ({after.version.name})")
    else:
        print(f"added {len(after) - before} rows to {args.index}: {len(after)} rows ({after.version.name})")


def cmd_index_info(args: argparse.Namespace) -> None:
    from allmpnet.search import Index
    info = Index.open(args.index, verify=True).info()
    info["checksums"] = "ok"
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def cmd_search(args: argparse.Namespace) -> None:
    queries = list(args.query)
    if args.queries is not None:
        from allmpnet.cli.inputs import read_texts
        from_file = read_texts(args.queries, args.query_field).texts
        queries += [q for q in from_file if q.strip()]
        if len(queries) < len(args.query) + len(from_file):
            print(f"skipped {len(args.query) + len(from_file) - len(queries)} blank query line(s) of {args.queries}",
                  file=sys.stderr)
    if not queries:
        raise InvalidInput("give at least one query (positional text or --queries FILE)")
    index = open_for_text(args, verify=not args.no_verify)
    results = index.search(queries, k=args.k, exact=args.exact)
    for query, hits in zip(queries, results):
        if args.json:
            print(json.dumps({"query": query, "hits": [hit_json(h) for h in hits]}, ensure_ascii=False))
            continue
        print(f"query: {shown(query)}")
        for rank, hit in enumerate(hits, start=1):
            where = f" chars {hit.span[0]}-{hit.span[1]}" if hit.span is not None else ""
            print(f"  {rank:>2}. {hit.score:.4f}  [{hit.id}]{where}  {shown(hit.text)}")


def hit_json(hit) -> dict:
    """A hit as JSON: a document index's hits also carry the passage's span (their text is the passage)."""
    record = {"id": hit.id, "score": round(hit.score, 6), "text": hit.text, "metadata": hit.metadata}
    if hit.span is not None:
        record["span"] = list(hit.span)
    return record


def embed_file(args: argparse.Namespace):
    """Good rows of args.input and their vectors, with the read report printed."""
    report, _, records = read_corpus(args, args.input)
    rows = list(records)
    encoder = load_encoder(args, args.model)
    truncated = len(encoder.truncated_indices([r.text for r in rows]))
    from allmpnet.encode import TruncationWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        vectors = encoder.encode([r.text for r in rows], batch_size=args.batch_size, show_progress_bar=True)
    report_read(report, truncated, encoder)
    return rows, vectors


def cmd_cluster(args: argparse.Namespace) -> None:
    import numpy as np

    from allmpnet.search import community_detection, kmeans
    rows, vectors = embed_file(args)
    labels = np.full(len(rows), -1, dtype=np.int64)
    if args.method == "kmeans":
        result = kmeans(vectors, args.clusters)
        labels = result.labels
        # centre-first order: members by cosine to their centroid, so examples are the most typical texts
        sims = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (
            result.centroids / np.linalg.norm(result.centroids, axis=1, keepdims=True)).T
        clusters = [sorted(np.flatnonzero(labels == c).tolist(), key=lambda r: -sims[r, c])
                    for c in range(args.clusters)]
        order = sorted(range(len(clusters)), key=lambda c: -len(clusters[c]))
        clusters = [clusters[c] for c in order]
        labels = np.empty_like(labels)
        for new, members in enumerate(clusters):
            labels[members] = new
    else:
        clusters = community_detection(vectors, threshold=args.threshold, min_community_size=args.min_size,
                                       show_progress_bar=len(rows) > 10_000)
        for c, members in enumerate(clusters):
            labels[members] = c
    out = args.out or args.input.with_name(args.input.name + ".clusters.csv")
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "line", "cluster"])
        for row, label in zip(rows, labels):
            writer.writerow([row.id, row.line, int(label)])
    unassigned = int((labels == -1).sum())
    print(f"{len(clusters)} cluster(s) over {len(rows)} texts" +
          (f"; {unassigned} texts in no community (threshold {args.threshold}, min size {args.min_size})"
           if args.method == "community" else ""))
    for c, members in enumerate(clusters):
        print(f"\ncluster {c}: {len(members)} texts")
        for r in members[:args.examples]:
            print(f"  [{rows[r].id}] {shown(rows[r].text)}")
    print(f"\nassignments (id,line,cluster; -1 = none) written to {out}")


def cmd_mine(args: argparse.Namespace) -> None:
    from allmpnet.search import paraphrase_mining
    rows, vectors = embed_file(args)
    pairs = paraphrase_mining(vectors, top_k=args.top_k, max_pairs=args.max_pairs, min_score=args.min_score)
    print(f"{len(pairs)} pair(s) among {len(rows)} texts")
    for pair in pairs[:args.show]:
        print(f"  {pair.score:.4f}  [{rows[pair.i].id}] {shown(rows[pair.i].text)}\n"
              f"          [{rows[pair.j].id}] {shown(rows[pair.j].text)}")
    if args.out is not None:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["score", "id1", "id2", "text1", "text2"])
            for pair in pairs:
                writer.writerow([f"{pair.score:.6f}", rows[pair.i].id, rows[pair.j].id, rows[pair.i].text,
                                 rows[pair.j].text])
        print(f"all pairs written to {args.out}")
    elif len(pairs) > args.show:
        print(f"({len(pairs) - args.show} more; --out FILE writes them all)")
