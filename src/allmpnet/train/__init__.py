"""Training: the contrastive recipe of the all-* models (data, loss, GradCache, distributed, trainer)."""
from allmpnet.train.data import BatchSampler, DataError, JsonlDataset, build_sampler, load_data_config
from allmpnet.train.loss import contrastive_loss
from allmpnet.train.trainer import TrainConfig, lr_factor, train

__all__ = ["BatchSampler", "DataError", "JsonlDataset", "TrainConfig", "build_sampler", "contrastive_loss",
           "load_data_config", "lr_factor", "train"]
