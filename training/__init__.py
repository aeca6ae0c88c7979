"""lookalike.training: config, data, losses, miners, metrics and the train loop.

Names are loaded on first use, so importing ``training`` (or ``training.cli``, which the
``lookalike`` command registers for every subcommand) does not import torch: a process that
only serves must not initialise torch in its main thread (a forward pass from another thread
then ran 1.7x slower here).
"""

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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = list(_LAZY)
