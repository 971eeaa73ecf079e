"""Turning texts into vectors: tokenization, batching and the `Encoder` front door."""
from allmpnet.encode.encoder import Encoder, TruncationWarning
from allmpnet.encode.pool import EncodePool, PoolWorkerError
from allmpnet.encode.tokenizer import TextTokenizer, Tokenized

__all__ = ["Encoder", "EncodePool", "PoolWorkerError", "TextTokenizer", "Tokenized", "TruncationWarning"]
