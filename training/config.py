"""Training configuration: YAML validated by pydantic; every field overridable from the CLI.

Unknown keys are rejected with the allowed set; bad values are rejected with a message
naming the field and the value. The resolved config is written into the run directory
(``config.yaml``), its digest into the model card and the full config into checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.registry import ACTIVATIONS, HEADS, available_backbones
from training.registry import DISTANCES, LOSSES, MEMORY_MINERS, MINERS, OPTIMIZERS, REDUCTIONS, SAMPLERS

# The allowed names come from the registries (torch-free), so validation imports no torch and a
# newly registered name is accepted (and listed by --help and the README reference) at once.
Backbone = Literal[tuple(available_backbones())]  # type: ignore[valid-type]
Head = Literal[HEADS]  # type: ignore[valid-type]
Activation = Literal[ACTIVATIONS.names]  # type: ignore[valid-type]
Sampler = Literal[SAMPLERS.names]  # type: ignore[valid-type]
Distance = Literal[DISTANCES]  # type: ignore[valid-type]
Loss = Literal[LOSSES.names]  # type: ignore[valid-type]
Reduction = Literal[REDUCTIONS]  # type: ignore[valid-type]
Miner = Literal[("none", *MINERS.names)]  # type: ignore[valid-type]
MemoryMiner = Literal[MEMORY_MINERS]  # type: ignore[valid-type]
Optimizer = Literal[OPTIMIZERS]  # type: ignore[valid-type]

#: The default recipe: what ``lookalike train`` runs when no ``--config`` is given.
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The embedding network (see models.ModelCard)."""

    backbone: Backbone = Field("resnet18", description="backbone architecture (README: Pretrained backbones); efficientnet_lite0 (lite1/lite2 with their weights package) have ImageNet weights that install with lookalike and work offline")
    weights: str | None = Field(None, description="null (from scratch), DEFAULT (ImageNet: shipped offline for efficientnet_lite*, downloaded by torchvision for the others), a torchvision weights name, or a local .safetensors file")
    embedding_dim: int = Field(128, ge=2, le=4096, description="output dimension D (head none: the backbone's feature size, this is ignored)")
    image_size: int = Field(112, ge=16, le=1024, description="square crop fed to the network")
    resize_size: int | None = Field(None, description="shorter side before the centre crop; default image_size * 8/7")
    head: Head = Field("linear", description="projection head (none: the pooled backbone features are the embedding)")
    head_hidden: int = Field(512, ge=1, description="hidden width of the mlp head")
    activation: Activation = Field("relu", description="activation of the mlp head")
    neck_bn: bool = Field(True, description="BatchNorm on backbone features before the head")
    trainable_stages: int = Field(-1, ge=-1, description="-1: train the whole backbone on images; k >= 0: freeze all but the last k stages and train on their cached inputs (fast; k=0 trains only the head)")
    freeze_bn: bool = Field(False, description="keep the backbone's BatchNorm statistics fixed while training")

    @model_validator(mode="after")
    def _resize(self) -> "ModelConfig":
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        return self

    @property
    def effective_resize(self) -> int:
        return self.resize_size or int(round(self.image_size * 8 / 7))


class DataConfig(_Section):
    """ImageFolder data and its class-disjoint split."""

    root: str = Field("../shared/data/cub100", description="dataset root: ImageFolder in <root>/images/ or <root> itself")
    train_classes: str | None = Field("splits/cub_train_classes.txt", description="file listing training classes (relative to root); null: hold out test_fraction of the classes (also what happens when the dataset has neither class list)")
    test_classes: str | None = Field("splits/cub_test_classes.txt", description="file listing held-out test classes (relative to root)")
    test_fraction: float = Field(0.4, gt=0, lt=1, description="fraction of classes held out for test when no class files are given")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of TRAIN classes carved out for validation (hyperparameter choice)")
    split_seed: int = Field(0, description="seed of the class split")
    p: int = Field(16, ge=2, description="classes per batch (P of PxK)")
    k: int = Field(4, ge=2, description="images per class per batch (K of PxK)")
    batches_per_epoch: int | None = Field(None, ge=1, description="default: training images // (P*K)")
    cache_images: Literal["auto", "always", "never"] = Field("auto", description="keep decoded, resized images in RAM (auto: if they fit in cache_budget_mb)")
    cache_budget_mb: int = Field(2048, ge=0, description="RAM for decoded images and cached trunk features, in MB")
    workers: int = Field(2, ge=0, description="DataLoader workers when images are not cached")
    scale_min: float = Field(0.25, gt=0, le=1, description="RandomResizedCrop minimum area fraction")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter strength (0: off)")
    sampler: Sampler = Field("random", description="P×K class choice: random, or confusable (each epoch, classes grouped with their nearest classes by FAISS over class centroids)")
    confusable_group: int = Field(4, ge=2, description="confusable sampler: classes per group of look-alikes")
    confusable_random_share: float = Field(0.5, ge=0, le=1, description="confusable sampler: share of each batch's classes drawn at random (coverage)")
    feedback: str | None = Field(None, description="index directory whose relevance feedback (right/wrong marks) is added to training as hard pairs (CLI: --feedback INDEX)")
    cached_views: int = Field(4, ge=1, le=64, description="trainable_stages >= 0: augmented views cached per training image (the first is the plain centre crop); fewer when the budget is short")


class LossConfig(_Section):
    """Metric loss, miner and the optional auxiliary classification head."""

    name: Loss = Field("contrastive", description="metric loss")
    distance: Distance = Field("cosine", description="distance the loss and miner use")
    margin: float = Field(0.5, ge=0, description="contrastive: negative margin m; triplet: margin g")
    pos_margin: float = Field(0.0, ge=0, description="contrastive: positive pairs closer than this cost nothing")
    reduction: Reduction = Field("nonzero_mean", description="how tuple losses are averaged")
    squared: bool = Field(True, description="contrastive: the seed's ½·max(0, ·)² terms (False: plain hinge, PML's form)")
    balance: bool = Field(True, description="contrastive: reduce positive and negative pairs separately and add them")
    soft: bool = Field(False, description="triplet: soft-margin softplus instead of the hinge")
    miner: Miner = Field("none", description="hard-negative miner (none: all pairs/triplets in the batch; hard: every triplet with d(a,n) < d(a,p))")
    miner_margin: float | None = Field(None, ge=0, description="margin of semi_hard/batch_all miners (default: loss margin)")
    miner_warmup_epochs: int = Field(0, ge=0, description="epochs with no miner (all tuples) before the miner starts")
    memory_size: int = Field(0, ge=0, description="cross-batch memory: past embeddings the contrastive loss also pairs with (0: off; e.g. 4096)")
    memory_miner: MemoryMiner = Field("none", description="with memory: every pair (none; the margin selects hard negatives) or each anchor's hardest positive and negative")
    memory_warmup_steps: int = Field(0, ge=0, description="steps with the in-batch loss only while the memory fills")
    feedback_weight: float = Field(1.0, ge=0, description="weight of the relevance-feedback pair loss (with data.feedback)")
    feedback_pairs: int = Field(16, ge=1, description="feedback pairs sampled per step")
    aux: Literal["none", "softmax", "hinge"] = Field("none", description="auxiliary classification head on the embedding")
    aux_weight: float = Field(1.0, ge=0, description="weight of the auxiliary loss")
    aux_temperature: float = Field(0.05, gt=0, description="softmax: cosine logits are divided by this (normalised softmax)")
    aux_init: Literal["random", "centroids"] = Field("random", description="aux class weights: random, or the class centroids of the starting embedding (a warm head for a pretrained start)")

    @model_validator(mode="after")
    def _memory_needs_contrastive(self) -> "LossConfig":
        if self.memory_size and self.name != "contrastive":
            raise ValueError(f"loss.memory_size needs loss.name contrastive (got {self.name!r})")
        return self


class OptimConfig(_Section):
    """Optimizer (torch.optim, by name) and LR schedule."""

    name: Optimizer = Field("adam", description="torch.optim optimizer")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warmup)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (L2; decoupled for adamw)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd_momentum / sgd_nesterov / rmsprop")
    schedule: Literal["none", "cosine", "step"] = Field("cosine", description="LR schedule after warmup: constant (none), cosine decay to 0, or step decay")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup from lr/100")
    step_size: int = Field(10, ge=1, description="step schedule: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")
    head_lr_mult: float = Field(1.0, gt=0, description="LR multiplier of the head and aux classifier")
    grad_clip: float | None = Field(10.0, gt=0, description="max global gradient norm (None: off)")


class TrainConfig(_Section):
    """A whole training run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    epochs: int = Field(30, ge=1, description="epochs to train (with budget: the most epochs; the budget decides)")
    budget: str | None = Field(None, description="wall-time budget of the whole run, e.g. 8m, 90s, 1h: throughput is measured on the first steps and the epochs/steps are planned so the LR schedule ends on time (null: run all epochs)")
    select_best: bool = Field(True, description="keep the epoch (0 = the starting model) with the best validation R@1; needs data.val_fraction > 0")
    seed: int = Field(0, description="seed of initialisation, batches and augmentation")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N")
    amp: Literal["auto", "bf16", "none"] = Field("auto", description="bf16 autocast: auto = where the hardware supports it")
    channels_last: bool = Field(True, description="NHWC memory layout (faster convolutions on CPU)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores)")
    eval_every: int = Field(5, ge=0, description="evaluate on the held-out classes every N epochs (0: only at the end)")
    collapse_cosine: float = Field(0.95, gt=0, le=1, description="warn when the mean pairwise cosine of a batch exceeds this")
    out: str = Field("runs/default", description="run directory")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    def budget_seconds(self) -> float | None:
        """The budget in seconds, or None."""
        return parse_duration(self.budget) if self.budget else None

    def digest(self) -> str:
        """sha256 of the canonical JSON of this config."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def parse_duration(text: str) -> float:
    """``"8m"`` -> 480.0; accepts ``h``, ``m``, ``s`` parts (``1h30m``, ``90s``) or plain seconds."""
    import re

    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", t)
        if not t or m is None or not any(m.groups()):
            raise ValueError(f"budget {text!r} is not a duration; use e.g. 8m, 90s, 1h30m")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = 3600 * h + 60 * mi + s
    if seconds <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    return seconds


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parent = TrainConfig
            for part in err["loc"][:-1]:
                parent = parent.model_fields[str(part)].annotation  # type: ignore[assignment]
            allowed = sorted(parent.model_fields)  # type: ignore[union-attr]
            lines.append(f"{loc}: unknown key; allowed: {allowed}")
        elif err["type"] == "literal_error":
            lines.append(f"{loc}: {err.get('input')!r} is not allowed; allowed: {err['ctx']['expected']}")
        else:
            value = err.get("input")
            lines.append(f"{loc}: {err['msg']} (got {value!r})")
    return f"invalid training config ({source}):\n  " + "\n  ".join(lines)


def flat_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted names of every leaf field -> its FieldInfo (for CLI overrides and docs)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(flat_fields(ann, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def allowed_values(info: Any) -> tuple[str, ...] | None:
    """The values a Literal field accepts (None for other fields), e.g. ('cosine', 'euclidean')."""
    ann = info.annotation
    lit = [ann] if get_origin(ann) is Literal else [a for a in get_args(ann) if get_origin(a) is Literal]
    return tuple(v for a in lit for v in get_args(a)) if lit else None


def field_help(info: Any) -> str:
    """One field's help for ``--help``: what it means, the allowed values, what null means, the default."""
    parts = [info.description or ""]
    allowed = allowed_values(info)
    if allowed:
        parts.append("one of: " + ", ".join(map(str, allowed)))
    if type(None) in get_args(info.annotation):
        parts.append("null: none (Python None)")
    default = info.default
    parts.append(f"field default: {'null' if default is None else default}")
    return "; ".join(p for p in parts if p)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ValueError(f"cannot set {dotted}: {part} is not a section")
    d[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.margin=0.3"`` -> ("loss.margin", 0.3); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip().removeprefix("--")
    if key not in flat_fields():
        raise ValueError(f"unknown config field {key!r}; allowed: {sorted(flat_fields())}")
    return key, (yaml.safe_load(raw) if raw.strip() != "" else None)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML config (or the defaults), apply dotted overrides, validate.

    Raises:
        ValueError: naming every bad or unknown field and the allowed set.
        FileNotFoundError: if ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{p}: a training config must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
        source = str(p)
    for key, value in (overrides or {}).items():
        if key not in flat_fields():
            raise ValueError(f"unknown config field {key!r}; allowed: {sorted(flat_fields())}")
        _set_dotted(data, key, value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_format_error(exc, source)) from None


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
