"""The names ``training`` accepts, importable without torch: the training config's allowed values
and ``lookalike train --help`` are derived from these registries, which are the only definition
of each name."""

from __future__ import annotations

from models.lazy import Registry

#: Distances the losses and miners compute (training.distances).
DISTANCES = ("cosine", "euclidean")

#: How tuple losses are reduced to one number (training.losses).
REDUCTIONS = ("mean", "nonzero_mean", "sum")

LOSSES = Registry("loss", {
    "contrastive": "training.losses:ContrastiveLoss",
    "triplet": "training.losses:TripletLoss",
})

#: Hard-negative miners; ``none`` (not a registered miner) uses every pair / triplet of the batch.
MINERS = Registry("miner", {
    "batch_hard": "training.miners:BatchHardMiner",
    "semi_hard": "training.miners:SemiHardMiner",
    "hard": "training.miners:HardMiner",
    "batch_all": "training.miners:BatchAllMiner",
})

#: Miners of the cross-batch memory (training.xbm).
MEMORY_MINERS = ("none", "batch_hard")

#: P×K batch samplers (``data.sampler``).
SAMPLERS = Registry("sampler", {
    "random": "training.data:PKSampler",
    "confusable": "training.confusable:ConfusablePKSampler",
})

#: torch.optim optimizers by name (training.trainer.build_optimizer).
OPTIMIZERS = ("sgd", "sgd_momentum", "sgd_nesterov", "adagrad", "adadelta", "rmsprop", "adam", "adamw")
