"""The state of a run that a checkpoint holds, besides the modules' and optimizer's own states."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["BestModel", "EpochSums", "EpochRecord", "StageResult", "RunState"]


@dataclass
class BestModel:
    """The stage's best model so far on validation (epoch 0: the model the stage started from)."""

    val_acc: float = -1.0
    epoch: int = -1
    model: dict | None = None
    term: dict | None = None


@dataclass
class EpochSums:
    """Per-epoch sums of each term (global meaning once reduced over ranks)."""

    ce: float = 0.0
    regularizer: float = 0.0
    head: float = 0.0
    correct: int = 0
    steps: int = 0
    seconds: float = 0.0


@dataclass
class EpochRecord:
    """One row of metrics.csv: the epoch's mean loss terms (``feature`` is R, the regulariser's
    value before alpha), accuracies and seconds."""

    stage: int
    reg: str
    epoch: int
    lr: float
    ce: float
    feature: float
    head_l2: float
    total: float
    train_acc: float
    val_acc: float
    best_val_acc: float
    seconds: float


@dataclass
class StageResult:
    """What result.json reports of a finished stage."""

    reg: str
    lr: float
    alpha: float
    epochs: int
    steps: int
    best_epoch: int
    best_val_acc: float


@dataclass
class RunState:
    """Where a run stands: stage, epoch and step done, the sums of the epoch under way, the
    stage's best model, the finished stages, every epoch's record, the seconds spent, and
    DELTA's channel weights with how they were had."""

    stage: int = 0
    epoch: int = 0
    step: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    best: BestModel = field(default_factory=BestModel)
    stage_results: list[StageResult] = field(default_factory=list)
    records: list[EpochRecord] = field(default_factory=list)
    elapsed: float = 0.0
    channel_weights: list[Tensor] | None = None
    delta_info: dict = field(default_factory=dict)
