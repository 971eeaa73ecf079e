"""A persistent vector index: HNSW (usearch) for candidates, exact cosine re-scoring from float32 vectors.

One committed version of an index folder (see storage.py for how versions are swapped atomically) holds:
    manifest.json   format, model (name, dimension, probe vector), count, HNSW settings, size + sha256 of each file
    vectors.f32     (count, dim) float32, row-major: the full-precision vectors used for exact re-scoring
    ann.usearch     the HNSW graph over the rows (keys = row numbers), stored as f32, f16, i8 or b1
    docs.jsonl      one {"id", "text", "metadata"} line per row
    offsets.u64     (count + 1) byte offsets of the docs lines, for random access

A document index (`build(..., chunking=...)`, `allmpnet index build --chunk`) has the same files, one row per
chunk of a document, and its manifest records the chunking; search/documents.py describes its rows.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from array import array
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from allmpnet.errors import AllmpnetError, InvalidInput
from allmpnet.search import storage
from allmpnet.search.documents import as_settings, chunk_rows, documents_in, search_documents
from allmpnet.search.exact import as_matrix, cosine_scores, topk_scores
from allmpnet.search.storage import IndexFormatError
from allmpnet.weights import sha256_of

FORMAT = "allmpnet-index"
FORMAT_VERSION = 1
VECTORS, ANN, DOCS, OFFSETS, MANIFEST = "vectors.f32", "ann.usearch", "docs.jsonl", "offsets.u64", "manifest.json"
DATA_FILES = (VECTORS, ANN, DOCS, OFFSETS)
# embedded in the manifest: a model that embeds this text differently is not the model the index was built with
PROBE_TEXT = "allmpnet index probe: a short sentence whose vector identifies the model that built this index."
PROBE_MIN_COSINE = 0.99  # fp32 vs bf16 of the same model agree to ~0.999; different models fall far below
ANN_DTYPES = ("f32", "f16", "i8", "b1")


class IndexMismatchError(AllmpnetError, ValueError):
    """Vectors or a model that do not match the index (other dimension, other model)."""


@dataclass
class AnnConfig:
    dtype: str = "f32"          # stored HNSW vectors: f32, f16, i8 (scalar-quantised) or b1 (sign bits)
    connectivity: int = 16      # HNSW M
    expansion_add: int = 128    # efConstruction
    expansion_search: int = 256  # ef; raised per query to at least the number of candidates
    oversample: int = 0          # candidates per result for re-scoring; 0 = by dtype (4 floats and i8, 20 b1)
    exact_below: int = 20_000    # smaller indexes are searched exactly by default: as fast, and never a miss

    def __post_init__(self) -> None:
        if self.dtype not in ANN_DTYPES:
            raise InvalidInput(f"index dtype must be one of {ANN_DTYPES}, got {self.dtype!r}")

    @property
    def candidates_per_result(self) -> int:
        return self.oversample or (20 if self.dtype == "b1" else 4)


@dataclass
class Hit:
    id: str
    score: float        # cosine similarity, exact (re-scored from float32)
    text: str
    metadata: dict = field(default_factory=dict)
    row: int = -1
    span: tuple[int, int] | None = None  # document index: the passage's [start, end) characters in its document


def encode_probe(encoder) -> np.ndarray:
    with warnings.catch_warnings():  # a model with a short max_seq_length truncates the probe: that is fine here
        warnings.simplefilter("ignore")
        return encoder.encode(PROBE_TEXT)


def model_signature(encoder) -> dict:
    probe = encode_probe(encoder)
    return {"name": encoder.name, "dim": int(encoder.dim), "normalize": bool(encoder.normalize),
            "probe": [round(float(v), 6) for v in probe]}


def check_model(signature: dict, encoder, where: Path) -> None:
    """Refuse an encoder that is not the model the index was built with."""
    if encoder.dim != signature["dim"]:
        raise IndexMismatchError(f"{where} holds {signature['dim']}-d vectors from {signature['name']!r}; "
                                 f"the model {encoder.name!r} gives {encoder.dim}-d vectors")
    probe = torch.as_tensor(encode_probe(encoder))
    cosine = float(cosine_scores(probe[None], torch.tensor([signature["probe"]]))[0, 0])
    if cosine < PROBE_MIN_COSINE:
        raise IndexMismatchError(f"{where} was built with the model {signature['name']!r}; {encoder.name!r} is a "
                                 f"different model (probe cosine {cosine:.3f} < {PROBE_MIN_COSINE}); "
                                 "rebuild the index or search it with the model that built it")


def _new_ann(dim: int, cfg: AnnConfig):
    from usearch.index import Index as UsearchIndex
    if cfg.dtype == "b1":
        return UsearchIndex(ndim=dim, metric="hamming", dtype="b1", connectivity=cfg.connectivity,
                            expansion_add=cfg.expansion_add, expansion_search=cfg.expansion_search)
    return UsearchIndex(ndim=dim, metric="cos", dtype=cfg.dtype, connectivity=cfg.connectivity,
                        expansion_add=cfg.expansion_add, expansion_search=cfg.expansion_search)


def _ann_vectors(vectors: np.ndarray, cfg: AnnConfig) -> np.ndarray:
    """What the HNSW graph stores: unit vectors (so i8's fixed scale fits), or their sign bits for b1."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.packbits(unit > 0, axis=1) if cfg.dtype == "b1" else np.ascontiguousarray(unit, dtype=np.float32)


class Index:
    """An opened, read-only view of the live version of an index folder. Thread-safe for search."""

    def __init__(self, root: Path, version: Path, manifest: dict, vectors: np.ndarray, ann, docs_fd: int,
                 offsets: np.ndarray, encoder=None):
        self.root, self.version, self.manifest = root, version, manifest
        self.vectors = vectors    # (count, dim) float32 memmap
        self.ann = ann
        self._docs_fd = docs_fd   # kept open: the version stays readable even if a writer replaces it
        self.offsets = offsets
        self._encoder = encoder
        self.ann_config = AnnConfig(**{**asdict(AnnConfig()), **manifest["ann"]})

    # ----- opening -----
    @classmethod
    def open(cls, root: str | os.PathLike, encoder=None, model: str | None = None, verify: bool = True) -> "Index":
        """Open the live version; with verify, every file's sha256 is checked against the manifest.

        encoder (an allmpnet.Encoder) or model (a name/dir to load) is used for text queries and is checked
        against the index's model at once; without either, the index's own model is loaded on the first text query.
        """
        root = Path(root)
        for attempt in range(3):
            version = storage.current_version(root)
            try:
                index = cls._load(root, version, verify)
                break
            except FileNotFoundError:  # a writer removed this version between reading CURRENT and opening it
                if attempt == 2:
                    raise IndexFormatError(f"{version}: files are missing")
        if model is not None and encoder is None:
            from allmpnet.encode import Encoder
            encoder = Encoder(model)
        if encoder is not None:
            index.use_encoder(encoder)
        return index

    @classmethod
    def _load(cls, root: Path, version: Path, verify: bool) -> "Index":
        manifest = read_manifest(version)
        count, dim = manifest["count"], manifest["dim"]
        for name in DATA_FILES:
            expected = manifest["files"][name]
            path = version / name
            if not path.is_file():
                raise IndexFormatError(f"{version} is corrupt: {name} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise IndexFormatError(f"{version} is corrupt: {name} has {size} bytes, the manifest says "
                                       f"{expected['bytes']}")
            if verify and sha256_of(path) != expected["sha256"]:
                raise IndexFormatError(f"{version} is corrupt: {name} does not match its sha256 in the manifest")
        if manifest["files"][VECTORS]["bytes"] != count * dim * 4:
            raise IndexFormatError(f"{version} is corrupt: {VECTORS} does not hold {count} x {dim} float32")
        vectors = np.memmap(version / VECTORS, dtype="<f4", mode="r", shape=(count, dim))
        offsets = np.fromfile(version / OFFSETS, dtype="<u8")
        if len(offsets) != count + 1:
            raise IndexFormatError(f"{version} is corrupt: {OFFSETS} has {len(offsets)} entries, expected {count + 1}")
        from usearch.index import Index as UsearchIndex
        try:
            ann = UsearchIndex.restore(str(version / ANN))
        except Exception as e:  # usearch raises plain RuntimeError/ValueError on damaged files
            raise IndexFormatError(f"{version} is corrupt: {ANN} cannot be read ({e})") from e
        if ann is None or ann.size != count or ann.ndim != dim:
            raise IndexFormatError(f"{version} is corrupt: {ANN} does not hold {count} vectors of dimension {dim}")
        return cls(root, version, manifest, vectors, ann, os.open(version / DOCS, os.O_RDONLY), offsets)

    def close(self) -> None:
        if self._docs_fd >= 0:
            os.close(self._docs_fd)
            self._docs_fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __len__(self) -> int:
        return self.manifest["count"]

    @property
    def chunking(self) -> dict | None:
        """{"chunk_tokens", "overlap", "documents"} for a document index (rows are chunks), None for a plain one."""
        return self.manifest.get("chunking")

    @property
    def record_count(self) -> int:
        """What a search ranks: documents in a document index, rows otherwise."""
        return self.chunking["documents"] if self.chunking else len(self)

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def use_encoder(self, encoder) -> None:
        """Embed text queries with `encoder`; refused unless it is the model that built the index.

        An index built from bare vectors records no model: any encoder of its dimension is taken on trust.
        """
        if self.manifest["model"] is None:
            if encoder.dim != self.dim:
                raise IndexMismatchError(f"{self.root} holds {self.dim}-d vectors; the model {encoder.name!r} "
                                         f"gives {encoder.dim}-d vectors")
        else:
            check_model(self.manifest["model"], encoder, self.root)
        self._encoder = encoder

    @property
    def encoder(self):
        if self._encoder is None:
            signature = self.manifest["model"]
            if signature is None:
                raise IndexMismatchError(f"{self.root} was built from vectors without a model; "
                                         "search it with vectors or pass encoder=")
            from allmpnet.encode import Encoder
            self.use_encoder(Encoder(signature["name"]))
        return self._encoder

    def is_stale(self) -> bool:
        """True when a writer has committed a newer version since this one was opened (reopen to see it)."""
        try:
            return storage.current_version(self.root) != self.version
        except (OSError, IndexFormatError):
            return False

    # ----- reading -----
    def doc(self, row: int) -> dict:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return json.loads(os.pread(self._docs_fd, end - start, start))

    def iter_docs(self) -> Iterator[dict]:
        for row in range(len(self)):
            yield self.doc(row)

    def ids(self) -> list[str]:
        """Record ids in index order (a document index: each document once)."""
        ids = [d["id"] for d in self.iter_docs()]
        return list(dict.fromkeys(ids)) if self.chunking else ids

    def document_text(self, row: int) -> str:
        """The whole text of the record row `row` belongs to (in a document index, its document)."""
        line = self.doc(row)
        if "first" in line:
            line = self.doc(line["first"])
        return line.get("document", line.get("text", ""))

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"path": str(self.root), "version": self.version.name, "count": m["count"], "dim": m["dim"],
                "model": m["model"]["name"] if m["model"] else None, "metric": "cosine",
                "ann_dtype": m["ann"]["dtype"], "connectivity": m["ann"]["connectivity"],
                "bytes": sum(f["bytes"] for f in m["files"].values()), "created": m["created"],
                "updated": m["updated"],
                **({"documents": m["chunking"]["documents"], "chunk_tokens": m["chunking"]["chunk_tokens"],
                    "overlap": m["chunking"]["overlap"]} if m.get("chunking") else {})}

    # ----- searching -----
    def query_vectors(self, queries: str | Sequence[str] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(queries, str) or (isinstance(queries, (list, tuple)) and queries
                                        and all(isinstance(q, str) for q in queries)):
            texts = [queries] if isinstance(queries, str) else list(queries)
            vectors = self.encoder.encode(texts)
        else:
            vectors = as_matrix(queries, "queries").float().cpu().numpy()
        if vectors.shape[1] != self.dim:
            raise IndexMismatchError(f"query vectors have dimension {vectors.shape[1]}, the index holds {self.dim}")
        if not np.isfinite(vectors).all():
            raise InvalidInput("query vectors hold NaN or infinite values")
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def search(self, queries: str | Sequence[str] | np.ndarray | torch.Tensor, k: int = 10,
               exact: bool | None = None) -> list[Hit] | list[list[Hit]]:
        """Top-k hits by cosine for a text, a list of texts, a vector or a (Q, dim) matrix.

        A single text or 1-D vector gives one list of hits; several give one list per query. exact=True scores
        every row (chunked); exact=False re-scores HNSW candidates; None (default) is exact for indexes of at
        most `exact_below` rows, where scoring everything costs about as much as the graph walk, else HNSW.
        """
        if k < 1:
            raise InvalidInput(f"k must be at least 1, got {k}")
        if isinstance(queries, (list, tuple)) and not queries:
            return []
        single = isinstance(queries, str) or (hasattr(queries, "ndim") and queries.ndim == 1)
        q = self.query_vectors(queries)
        if exact is None:
            exact = len(self) <= self.ann_config.exact_below
        if self.chunking:
            hits = [[self._hit(row, score) for row, score in best] for best in search_documents(self, q, k, exact)]
        else:
            hits = [[self._hit(int(r), float(s)) for s, r in zip(scores, rows)]
                    for scores, rows in self.search_rows(q, k, exact)]
        return hits[0] if single else hits

    def search_rows(self, q: np.ndarray, k: int, exact: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """(scores, rows) of the top-k rows of each (Q, dim) query vector, best first."""
        if exact:
            scores, rows = topk_scores(q, self.vectors, k)
            return list(zip(scores.numpy(), rows.numpy()))
        return self._ann_search(q, k)

    def _ann_search(self, q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        cfg = self.ann_config
        n_candidates = min(len(self), max(k * cfg.candidates_per_result, k + 16))
        self.ann.expansion_search = max(cfg.expansion_search, n_candidates)
        matches = self.ann.search(_ann_vectors(q, cfg), n_candidates)
        if hasattr(matches, "counts"):  # BatchMatches
            keys, counts = matches.keys, matches.counts
        else:  # usearch answers a one-row batch with a plain Matches
            keys, counts = matches.keys[None], np.array([len(matches.keys)])
        unit_q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        results = []
        for i in range(len(q)):
            # re-score in numpy: for a few dozen rows, torch's per-call overhead dominates
            rows = np.sort(keys[i, :counts[i]].astype(np.int64))
            candidates = np.asarray(self.vectors[rows], dtype=np.float32)  # (C, dim)
            exact = candidates @ unit_q[i] / np.maximum(np.linalg.norm(candidates, axis=1), 1e-12)  # (C,)
            top = np.argsort(-exact, kind="stable")[:k]
            results.append((exact[top], rows[top]))
        return results

    def _hit(self, row: int, score: float) -> Hit:
        doc = self.doc(row)
        span = doc.get("span")
        return Hit(id=doc["id"], score=score, text=doc.get("text", ""), metadata=doc.get("metadata", {}), row=row,
                   span=tuple(span) if span is not None else None)

    # ----- writing: each call commits a new version atomically and returns the reopened index -----
    @classmethod
    def build(cls, root: str | os.PathLike, texts: Sequence[str] | None = None, ids: Sequence[str] | None = None,
              metadata: Sequence[dict] | None = None, vectors: np.ndarray | None = None, encoder=None,
              ann: AnnConfig = AnnConfig(), overwrite: bool = False, batch_size: int = 32,
              chunking=None) -> "Index":
        """Build an index from texts (embedded with encoder) and/or precomputed vectors; ids default to "0".."n-1".

        chunking (True, or an allmpnet.encode.documents.ChunkSettings) makes a document index: each text is
        embedded whole as chunks, and search ranks documents by their best chunk (search/documents.py).
        """
        root = Path(root)
        if chunking:
            texts, ids, metadata = documents_in(texts, ids, metadata, vectors, encoder)
            settings = as_settings(chunking, encoder.max_seq_length)
            chunks = encoder.encode_documents(texts, settings.chunk_tokens, settings.overlap, batch_size=batch_size)
            with open_writer(root, dim=encoder.dim, model=model_signature(encoder), ann=ann, overwrite=overwrite,
                             chunking=settings) as writer:
                writer.append_documents(ids, texts, metadata, chunks)
            return cls.open(root, encoder=encoder)
        ids, texts, metadata, vectors = _check_rows(texts, ids, metadata, vectors, encoder, batch_size)
        with open_writer(root, dim=vectors.shape[1], model=model_signature(encoder) if encoder else None,
                         ann=ann, overwrite=overwrite) as writer:
            writer.append(ids, texts, metadata, vectors)
        return cls.open(root, encoder=encoder)

    def add(self, texts: Sequence[str] | None = None, ids: Sequence[str] | None = None,
            metadata: Sequence[dict] | None = None, vectors: np.ndarray | None = None,
            batch_size: int = 32) -> "Index":
        """Append rows (ids must be new) as a new version; returns the reopened index (this one is unchanged)."""
        encoder = self.encoder if texts is not None and vectors is None else self._encoder
        if ids is None:
            raise InvalidInput("add needs ids for the new rows")
        if self.chunking:
            texts, ids, metadata = documents_in(texts, ids, metadata, vectors, self.encoder)
            settings = as_settings(self.chunking, self.encoder.max_seq_length)
            chunks = self.encoder.encode_documents(texts, settings.chunk_tokens, settings.overlap,
                                                   batch_size=batch_size)
            with open_writer(self.root, extend=True) as writer:
                writer.append_documents(ids, texts, metadata, chunks)
            return Index.open(self.root, encoder=self._encoder)
        ids, texts, metadata, vectors = _check_rows(texts, ids, metadata, vectors, encoder, batch_size)
        with open_writer(self.root, extend=True) as writer:
            writer.append(ids, texts, metadata, vectors)
        return Index.open(self.root, encoder=self._encoder)


def _check_rows(texts, ids, metadata, vectors, encoder, batch_size):
    if texts is None and vectors is None:
        raise InvalidInput("give texts (with an encoder) or vectors")
    n = len(texts) if texts is not None else len(vectors)
    if n == 0:
        raise InvalidInput("nothing to index: no rows given")
    if vectors is None:
        if encoder is None:
            raise InvalidInput("texts need an encoder to be embedded (or pass vectors)")
        vectors = encoder.encode(list(texts), batch_size=batch_size)
    vectors = as_matrix(vectors, "vectors").float().cpu().numpy()
    if not np.isfinite(vectors).all():
        raise InvalidInput("vectors hold NaN or infinite values")
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    texts = [""] * n if texts is None else list(texts)
    metadata = [{}] * n if metadata is None else list(metadata)
    if not len(ids) == len(texts) == len(metadata) == len(vectors):
        raise InvalidInput(f"ids, texts, metadata and vectors differ in length "
                           f"({len(ids)}, {len(texts)}, {len(metadata)}, {len(vectors)})")
    return ids, texts, metadata, vectors


def read_manifest(version: Path) -> dict:
    path = version / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{version} is corrupt: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path} is not an allmpnet index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: index format version {manifest.get('format_version')} is not supported "
                               f"by this allmpnet (reads version {FORMAT_VERSION})")
    missing = [k for k in ("count", "dim", "model", "ann", "files") if k not in manifest]
    missing += [f"files.{n}" for n in DATA_FILES if n not in manifest.get("files", {})]
    if missing:
        raise IndexFormatError(f"{path} is corrupt: missing {missing}")
    return manifest


class IndexWriter:
    """Fills a staging folder: a copy of the base version (for add) plus appended rows."""

    def __init__(self, root: Path, staging: Path, dim: int, model: dict | None, ann: AnnConfig,
                 base: Index | None = None, chunking: dict | None = None):
        self.root, self.staging, self.dim, self.model, self.ann_config = root, staging, dim, model, ann
        # a document index: {"chunk_tokens", "overlap", "documents"}; rows are written by append_documents
        self.chunking = dict(base.chunking) if base is not None and base.chunking else chunking
        self.created = base.manifest["created"] if base else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if base is not None:
            for name in (VECTORS, DOCS):
                shutil.copyfile(base.version / name, staging / name)
            self.ann = _load_ann_copy(base.version / ANN)
            self.offsets = array("Q", base.offsets.tolist())
            self.count = len(base)
            self.ids = set(base.ids())
        else:
            self.ann = _new_ann(dim, ann)
            self.offsets, self.count, self.ids = array("Q", [0]), 0, set()
        self._vectors = open(staging / VECTORS, "ab")
        self._docs = open(staging / DOCS, "ab")

    def append(self, ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict], vectors: np.ndarray) -> None:
        if self.chunking:
            raise InvalidInput(f"{self.root} is a document index: its rows are chunks (use append_documents)")
        self._claim_ids(ids)
        self.write_rows([{"id": doc_id, "text": text, "metadata": meta}
                         for doc_id, text, meta in zip(ids, texts, metadata)], vectors)

    def _claim_ids(self, ids: Sequence[str]) -> None:
        for doc_id in ids:
            if doc_id in self.ids:
                raise InvalidInput(f"duplicate id {doc_id!r}: ids must be unique in an index")
            self.ids.add(doc_id)

    def append_documents(self, ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict], chunks) -> None:
        """Documents as rows of chunks (a DocumentChunks from Encoder.encode_documents over `texts`)."""
        if not self.chunking:
            raise InvalidInput(f"{self.root} is a plain index: one vector per record (use append)")
        self._claim_ids(ids)
        self.write_rows(chunk_rows(ids, texts, metadata, chunks, self.count), chunks.vectors)
        self.chunking["documents"] += len(ids)

    def write_rows(self, lines: Sequence[dict], vectors: np.ndarray) -> None:
        """One docs.jsonl line and one vector per row."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")  # (n, dim)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexMismatchError(f"vectors of shape {vectors.shape} do not fit a {self.dim}-d index")
        if len(lines) != len(vectors):
            raise InvalidInput(f"{len(lines)} rows but {len(vectors)} vectors")
        for record in lines:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            self._docs.write(line)
            self.offsets.append(self.offsets[-1] + len(line))
        self._vectors.write(vectors.tobytes())
        keys = np.arange(self.count, self.count + len(vectors), dtype=np.uint64)
        self.ann.add(keys, _ann_vectors(vectors, self.ann_config))
        self.count += len(vectors)

    def finish(self) -> None:
        """Write the remaining files and the manifest (last, with every checksum) into the staging folder."""
        if self.count == 0:
            raise InvalidInput("nothing to index: no rows were added")
        self._vectors.close()
        self._docs.close()
        np.frombuffer(self.offsets, dtype=np.uint64).astype("<u8").tofile(self.staging / OFFSETS)
        self.ann.save(str(self.staging / ANN))
        files = {name: {"bytes": (self.staging / name).stat().st_size,
                        "sha256": sha256_of(self.staging / name)} for name in DATA_FILES}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "count": self.count, "dim": self.dim,
                    "model": self.model, "ann": asdict(self.ann_config), "files": files, "created": self.created,
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.chunking:
            manifest["chunking"] = self.chunking
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    def abort(self) -> None:
        self._vectors.close()
        self._docs.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _load_ann_copy(path: Path):
    from usearch.index import Index as UsearchIndex
    ann = UsearchIndex.restore(str(path))
    if ann is None:
        raise IndexFormatError(f"{path} cannot be read")
    return ann


def check_build_target(root: Path, overwrite: bool) -> None:
    """A new index may go to a new or empty folder, or replace an index with overwrite; nothing else is touched."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise IndexFormatError(f"{root} is a file, not an index directory")
    if root.is_dir() and not storage.is_index_dir(root):
        # a killed first build leaves only writer folders (cleared by the next writer): building again is the cure
        ours = set(storage.writer_leftovers(root))
        leftovers = [p.name for p in root.iterdir() if p.name not in ours]
        if leftovers:
            raise IndexFormatError(f"{root} exists and is not an allmpnet index (holds {sorted(leftovers)[:3]}); "
                                   "choose an empty or new --out")
    if storage.is_index_dir(root) and not overwrite:
        raise IndexFormatError(f"{root} already holds an index; use `allmpnet index add` to add rows, "
                               "or --overwrite to replace it")


@contextmanager
def open_writer(root: Path, dim: int | None = None, model: dict | None = None, ann: AnnConfig = AnnConfig(),
                overwrite: bool = False, extend: bool = False, chunking=None) -> Iterator[IndexWriter]:
    """A writer on a staging folder, committed as the new live version when the block ends without error.

    extend=True appends to the live version (read under the lock, so concurrent adds never lose rows);
    otherwise a fresh index is written, replacing an existing one only with overwrite=True. chunking (a
    ChunkSettings) makes the new index a document index; an extended one keeps the live version's.
    """
    root = Path(root)
    if not extend:
        check_build_target(root, overwrite)
    with storage.writer_lock(root):
        storage.remove_stale(root)
        base = Index.open(root, verify=False) if extend else None
        staging = storage.new_staging(root)
        writer = IndexWriter(root, staging, base.dim if base else dim, base.manifest["model"] if base else model,
                             base.ann_config if base else ann, base,
                             {**chunking.as_dict(), "documents": 0} if chunking else None)
        try:
            yield writer
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            if base is not None:
                base.close()
        storage.commit(root, staging)
        storage.remove_stale(root)
