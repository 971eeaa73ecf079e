"""allmpnet: the all-mpnet-base-v2 sentence-embedding model, end to end."""
from allmpnet.encode import Encoder, NonFiniteOutputError, TruncationWarning
from allmpnet.encode.quantize import Quantizer, calibration_ranges, quantize_embeddings
from allmpnet.errors import AllmpnetError, InvalidInput, InvalidInputType, PrecisionUnavailable
from allmpnet.model import ModelFileError, WeightsError
from allmpnet.similarity import cos_sim, dot_score, pairwise_cos_sim, pairwise_dot_score
from allmpnet.weights import ChecksumError, ModelNotFoundError

__version__ = "0.1.0"
__all__ = ["Encoder", "TruncationWarning", "NonFiniteOutputError", "Quantizer", "calibration_ranges",
           "quantize_embeddings", "AllmpnetError", "InvalidInput", "InvalidInputType", "PrecisionUnavailable",
           "ModelFileError", "WeightsError", "ChecksumError", "ModelNotFoundError",
           "cos_sim", "dot_score", "pairwise_cos_sim", "pairwise_dot_score"]
