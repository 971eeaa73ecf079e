"""Bulk embedding of whole corpora on a pool of Ray actors: resumable Parquet shards of (id, embedding, kept columns).

Ray is optional (`pip install 'allmpnet[ray]'`): it is imported only when a job runs.
"""
from allmpnet.bulk.job import BadRowsError, BulkConfig, BulkJobError, BulkResult, embed_corpus
from allmpnet.bulk.shards import read_embeddings

__all__ = ["BadRowsError", "BulkConfig", "BulkJobError", "BulkResult", "embed_corpus", "read_embeddings"]
