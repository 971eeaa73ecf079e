"""The network: the MPNet encoder on packed tokens, pooling, and the sentence model that joins them."""
from allmpnet.model.files import ModelFileError
from allmpnet.model.mpnet import MPNet, MPNetConfig, WeightsError
from allmpnet.model.packing import PackedBatch
from allmpnet.model.pooling import Pooling
from allmpnet.model.sentence import SentenceModel

__all__ = ["ModelFileError", "MPNet", "MPNetConfig", "PackedBatch", "Pooling", "SentenceModel", "WeightsError"]
