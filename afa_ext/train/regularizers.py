"""The regularisers of the trainer: one table, and the loss terms built on afa_ext's public losses.

Total loss = CE + alpha * R + beta * 0.5 * ||W_head||^2 (the head's weight and bias), with
R the stage's regulariser, summed over the hooked layers where it reads features
(D = F_t - F_s per layer, B the batch, C channels, P positions):

- ``none``:    R = 0
- ``l2sp``:    R = 0.5 * sum over non-head parameters of ||w - w_source||^2
- ``fea_map``: R = 0.5 * sum_{n,j,p} D^2                          (a sum over the batch)
- ``delta``:   R = 0.5 * sum_{n,j} C * w_j * sum_p D^2 / P         (a sum over the batch)
- ``ast``:     R = (0.5 / B) * sum_{n,p} (P * a[n,p])^2 * sum_j D^2 (a mean over the batch)
- ``act``:     R = (0.5 / B) * sum_{n,j} C * g[n,j] * sum_p D^2     (a mean over the batch)
- ``afa``:     AST in stage 1, then ACT in stage 2

The feature terms are afa_ext's loss modules (fused kernels, one call for all layers);
their attention modules (AST, ACT) are trained with the model. ``REGULARIZERS`` is the one
table the command line, the configuration's validation and defaults, the stage plan, the
step and the distributed scaling read.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import afa_ext
from afa_ext import reference

__all__ = ["Regularizer", "REGULARIZERS", "check_channel_weights", "head_l2", "l2sp_term", "source_parameters"]

Shapes = Sequence[tuple[int, ...]]
# (backend, (C, H, W) of each hooked layer, DELTA's channel weights or None) -> the loss module
LossModuleBuilder = Callable[[str, Shapes, list[Tensor] | None], nn.Module]


@dataclass(frozen=True)
class Regularizer:
    """What the trainer needs to know of one regulariser.

    ``loss_module`` builds its feature term (None for ``none``, ``l2sp`` and the two-stage
    ``afa``); ``alpha`` is its default weight, unless ``preset_alpha`` names which of the
    architecture's (stage-1, stage-2) AFA alphas it takes; ``batch_sum`` says that R sums
    over the batch instead of averaging (distributed.py scales the two apart);
    ``stage_regularizers`` are the regularisers of the stages of a multi-stage method.
    """

    name: str
    loss_module: LossModuleBuilder | None = None
    alpha: float = 0.0
    preset_alpha: int | None = None
    batch_sum: bool = False
    needs_channel_weights: bool = False
    reads_source_parameters: bool = False
    stage_regularizers: tuple[str, ...] = ()

    @property
    def default_stages(self) -> int:
        return max(1, len(self.stage_regularizers))

    def default_alpha(self, preset_alphas: tuple[float, float]) -> float:
        """The default alpha, given the architecture's (stage-1, stage-2) AFA alphas."""
        return self.alpha if self.preset_alpha is None else preset_alphas[self.preset_alpha]


def _delta_module(backend: str, shapes: Shapes, channel_weights: list[Tensor] | None) -> nn.Module:
    if channel_weights is None:
        raise ValueError("the delta regulariser needs DELTA channel weights")
    check_channel_weights(channel_weights, shapes)
    return afa_ext.DeltaAlignment(channel_weights, backend=backend)


REGULARIZERS: dict[str, Regularizer] = {
    regularizer.name: regularizer
    for regularizer in (
        Regularizer("none"),
        Regularizer("l2sp", alpha=0.01, reads_source_parameters=True),
        Regularizer(
            "fea_map",
            lambda backend, shapes, weights: afa_ext.FeatureMapAlignment(backend=backend),
            alpha=0.01,
            batch_sum=True,
        ),
        Regularizer("delta", _delta_module, alpha=0.01, batch_sum=True, needs_channel_weights=True),
        Regularizer(
            "ast",
            lambda backend, shapes, weights: afa_ext.AttentiveSpatialAlignment(backend=backend, feature_shapes=shapes),
            preset_alpha=0,
        ),
        Regularizer(
            "act",
            lambda backend, shapes, weights: afa_ext.AttentiveChannelAlignment(backend=backend, feature_shapes=shapes),
            preset_alpha=1,
        ),
        Regularizer("afa", stage_regularizers=("ast", "act")),
    )
}


def check_channel_weights(channel_weights: Sequence[Tensor], feature_shapes: Shapes) -> None:
    """ValueError unless there is one (C,) weight vector per hooked layer of C channels."""
    if len(channel_weights) != len(feature_shapes):
        raise ValueError(f"expected DELTA channel weights for {len(feature_shapes)} layers, got {len(channel_weights)}")
    for index, (weights, shape) in enumerate(zip(channel_weights, feature_shapes)):
        if tuple(weights.shape) != (shape[0],):
            raise ValueError(
                f"layer {index} has {shape[0]} channels, so its DELTA channel weights must have shape "
                f"({shape[0]},), got {tuple(weights.shape)}"
            )


def head_l2(model: nn.Module, head: str) -> Tensor:
    """0.5 * sum over the head's parameters p of ||p||^2."""
    return 0.5 * sum(torch.sum(p.float() ** 2) for p in model.get_submodule(head).parameters())


def source_parameters(source: nn.Module, head: str) -> dict[str, Tensor]:
    """The source model's non-head parameters, detached copies: what L2-SP pulls towards."""
    prefix = head + "."
    return {name: p.detach().clone() for name, p in source.named_parameters() if not name.startswith(prefix)}


def l2sp_term(model: nn.Module, source_values: dict[str, Tensor], head: str) -> Tensor:
    """0.5 * sum over non-head parameters of ||w - w_source||^2."""
    return reference.l2sp_loss(model, source_values, exclude=(head + ".",))
