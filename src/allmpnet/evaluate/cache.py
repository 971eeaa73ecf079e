"""An on-disk embedding cache so a re-run of an evaluation does not encode the same texts again.

One SQLite file per model configuration (weights hash, precision, max length, pooling, normalisation);
inside it, one row per text keyed by the text's SHA-1. New vectors are committed chunk by chunk, so an
interrupted run over a large corpus keeps what it has already encoded.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from allmpnet.errors import InvalidInputType
from allmpnet.weights import STAMP, WEIGHTS, cache_root, sha256_of

WRITE_CHUNK = 512  # texts encoded and committed together (and the progress bar step)
_weights_hashes: dict[tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    return cache_root() / "embeddings"


def weights_sha256(model_dir: Path) -> str:
    """The weights file's hash: from the download stamp when the file is unchanged, else computed once."""
    weights = Path(model_dir) / WEIGHTS
    stat = weights.stat()
    key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _weights_hashes:
        stamp_path = Path(model_dir) / STAMP
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
        if stamp.get("mtime_ns") == stat.st_mtime_ns and stamp.get("size") == stat.st_size:
            _weights_hashes[key] = stamp["sha256"]
        else:
            _weights_hashes[key] = sha256_of(weights, progress=True)
    return _weights_hashes[key]


def model_key(encoder) -> str:
    """What determines an allmpnet Encoder's vectors, hashed into a short file name."""
    for attr in ("model_dir", "precision", "max_seq_length", "normalize", "pooling"):
        if not hasattr(encoder, attr):
            raise InvalidInputType(f"cannot derive a cache key from {type(encoder).__name__} (no .{attr}); "
                                   "pass key= explicitly")
    parts = {"weights": weights_sha256(encoder.model_dir), "precision": encoder.precision,
             "max_seq_length": encoder.max_seq_length, "normalize": encoder.normalize,
             "pooling": list(encoder.pooling.modes)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class CachedEncoder:
    """Wraps anything with `.encode(texts, batch_size=..., show_progress_bar=...)`; same call, cached vectors.

    The cache is only as good as its key: pass `key` for encoders whose weights it cannot hash
    (and never cache a model that is still training).
    """

    def __init__(self, encoder, cache_dir: str | os.PathLike | None = None, key: str | None = None):
        self.encoder = encoder
        self.key = key or model_key(encoder)
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{self.key}.sqlite"
        self.db = sqlite3.connect(self.path, timeout=120)  # another run may be writing the same model's file
        self.db.execute("CREATE TABLE IF NOT EXISTS vectors (text_sha1 BLOB PRIMARY KEY, vector BLOB NOT NULL)")
        self.hits = self.misses = 0

    def __getattr__(self, name: str):
        if name == "encoder":  # not set yet (a failed __init__): no endless recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)  # name, dim, max_seq_length … of the wrapped encoder

    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress_bar: bool | None = None
               ) -> np.ndarray:
        """(N, D) float32 for N texts; only texts never seen with this model are encoded."""
        if isinstance(texts, str):
            return self.encode([texts], batch_size, show_progress_bar)[0]
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        keys = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).digest() for t in texts]
        found = self._lookup(set(keys))
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        self.hits += len(texts) - sum(k not in found for k in keys)
        self.misses += len(missing)
        show = len(missing) > 256 if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(missing), desc="encoding (not cached)", unit="text", disable=not show) as bar:
            for start in range(0, len(missing), WRITE_CHUNK):
                chunk = missing[start:start + WRITE_CHUNK]
                vectors = np.asarray(self.encoder.encode(chunk, batch_size=batch_size, show_progress_bar=False),
                                    dtype=np.float32)
                rows = [(hashlib.sha1(t.encode("utf-8", "surrogatepass")).digest(), v.tobytes())
                        for t, v in zip(chunk, vectors)]
                with self.db:
                    self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)
                found.update((k, v) for k, v in zip((r[0] for r in rows), vectors))
                bar.update(len(chunk))
        return np.stack([found[k] for k in keys])

    def _lookup(self, keys: set[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        wanted = list(keys)
        for start in range(0, len(wanted), 900):  # SQLite caps the number of bound parameters
            part = wanted[start:start + 900]
            marks = ",".join("?" * len(part))
            for key, blob in self.db.execute(f"SELECT text_sha1, vector FROM vectors WHERE text_sha1 IN ({marks})",
                                             part):
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def close(self) -> None:
        self.db.close()
