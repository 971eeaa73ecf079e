"""The network: the MPNet encoder and the pooling that turns its token vectors into one sentence vector."""
from allmpnet.model.mpnet import MPNet, MPNetConfig, WeightsError
from allmpnet.model.pooling import Pooling

__all__ = ["MPNet", "MPNetConfig", "Pooling", "WeightsError"]
