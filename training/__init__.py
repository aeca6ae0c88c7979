"""lookalike.training: config, data, losses, miners, metrics and the train loop.

Names are loaded on first use, so importing ``training`` (or ``training.cli``, which the
``lookalike`` command registers for every subcommand) does not import torch: a process that
only serves must not initialise torch in its main thread (a forward pass from another thread
then ran 1.7x slower here).
"""

from models.lazy import lazy_getattr

_LAZY = {
    "TrainConfig": "training.config",
    "load_config": "training.config",
    "pairwise_distances": "training.distances",
    "BaseMetricLoss": "training.losses",
    "ContrastiveLoss": "training.losses",
    "TripletLoss": "training.losses",
    "build_loss": "training.losses",
    "retrieval_metrics": "training.metrics",
    "BatchAllMiner": "training.miners",
    "BatchHardMiner": "training.miners",
    "HardMiner": "training.miners",
    "SemiHardMiner": "training.miners",
    "all_pairs": "training.miners",
    "build_miner": "training.miners",
    "triplets_to_pairs": "training.miners",
    "train": "training.trainer",
}

__getattr__ = lazy_getattr("training", _LAZY)


__all__ = list(_LAZY)
