"""One training step's losses: source features, target forward, the loss terms.

``StepModule`` is what DistributedDataParallel wraps: the target model and the stage's
feature term (with its attention modules), so that both get their gradients averaged.
``step_losses`` scales each term so that, averaged over W ranks, the gradient is the
one-process gradient of the global batch (distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .regularizers import Regularizer, head_l2, l2sp_term

__all__ = ["StepModule", "StepLosses", "step_losses"]


class StepModule(nn.Module):
    """target model + feature term: forward(images, source_features) -> (logits, R)."""

    def __init__(self, model: nn.Module, forward_model: Callable, hooks, term: nn.Module | None):
        super().__init__()
        self.model = model
        self.term = term
        # Not a submodule: its parameters are the model's.
        object.__setattr__(self, "_forward_model", forward_model)  # the model, or its torch.compile
        self._hooks = hooks

    def forward(self, images: Tensor, source_features: list[Tensor]):
        logits = self._forward_model(images)
        if self.term is None:
            return logits, None
        return logits, self.term(self._hooks.features, source_features)


@dataclass
class StepLosses:
    """The terms of one step: ``total`` is what is differentiated (scaled for this rank);
    the others carry their global, one-process meaning once summed over the ranks.
    ``regularizer`` is R, the regulariser's value before alpha."""

    total: Tensor
    ce: Tensor
    regularizer: Tensor
    head: Tensor
    correct: Tensor


def step_losses(
    logits: Tensor,
    labels: Tensor,
    feature_term: Tensor | None,
    *,
    regularizer: Regularizer,
    alpha: float,
    beta: float,
    model: nn.Module,
    head: str,
    source_values: dict[str, Tensor] | None,
    mean_scale: float,
    sum_scale: float,
    world: int,
) -> StepLosses:
    """CE + alpha * R + beta * 0.5 * ||W_head||^2, each term scaled for this rank.

    R is ``feature_term`` (the loss module's value), or L2-SP's distance to ``source_values``.
    """
    ce = F.cross_entropy(logits.float(), labels)
    if regularizer.reads_source_parameters:
        value, scale = l2sp_term(model, source_values, head), 1.0
    elif feature_term is None:
        value, scale = logits.new_zeros((), dtype=torch.float32), 1.0
    else:
        value, scale = feature_term, (sum_scale if regularizer.batch_sum else mean_scale)
    head_term = head_l2(model, head)
    total = mean_scale * ce + (alpha * scale) * value + beta * head_term
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return StepLosses(
        total=total,
        ce=(mean_scale / world) * ce.detach(),
        regularizer=(scale / world) * value.detach().float(),
        head=head_term.detach() / world,
        correct=correct,
    )
