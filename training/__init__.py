"""lookalike.training: config, data, losses, miners, metrics and the train loop (imports torch)."""

from training.config import TrainConfig, load_config
from training.distances import pairwise_distances
from training.losses import BaseMetricLoss, ContrastiveLoss, TripletLoss, build_loss
from training.metrics import retrieval_metrics
from training.miners import BatchAllMiner, BatchHardMiner, HardMiner, SemiHardMiner, all_pairs, build_miner, triplets_to_pairs

__all__ = [
    "TrainConfig", "load_config", "pairwise_distances", "BaseMetricLoss", "ContrastiveLoss", "TripletLoss",
    "build_loss", "retrieval_metrics", "BatchAllMiner", "BatchHardMiner", "HardMiner", "SemiHardMiner", "all_pairs",
    "build_miner", "triplets_to_pairs",
]
