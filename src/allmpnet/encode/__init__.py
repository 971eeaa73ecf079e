"""Turning texts into vectors: tokenizer, batch planner, precision plans, inference copies and the `Encoder`."""
from allmpnet.encode.encoder import Encoder, TruncationWarning
from allmpnet.encode.pool import EncodePool, PoolWorkerError
from allmpnet.encode.precision import Capabilities, PrecisionPlan, plan_precision
from allmpnet.encode.tokenizer import TextTokenizer, Tokenized
from allmpnet.errors import NonFiniteOutputError

__all__ = ["Capabilities", "Encoder", "EncodePool", "NonFiniteOutputError", "PoolWorkerError", "PrecisionPlan", "TextTokenizer", "Tokenized",
           "TruncationWarning", "plan_precision"]
