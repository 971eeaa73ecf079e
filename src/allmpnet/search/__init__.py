"""Search and clustering over sentence embeddings: exact chunked top-k, a persistent HNSW index, paraphrase
mining, community detection and k-means."""
from allmpnet.search.cluster import KMeansResult, community_detection, kmeans
from allmpnet.search.exact import Match, semantic_search, topk_scores
from allmpnet.search.index import AnnConfig, Hit, Index, IndexMismatchError, open_writer
from allmpnet.search.paraphrase import Pair, paraphrase_mining
from allmpnet.search.records import CorpusSpec, Record, ScanReport, iter_records, scan
from allmpnet.search.storage import IndexFormatError

__all__ = ["semantic_search", "topk_scores", "Match", "paraphrase_mining", "Pair", "community_detection", "kmeans",
           "KMeansResult", "Index", "Hit", "AnnConfig", "IndexFormatError", "IndexMismatchError", "open_writer",
           "CorpusSpec", "Record", "ScanReport", "scan", "iter_records"]
