"""The "before" of the benchmarks: a transcription of the published AFA regularisers
in pure PyTorch, as they run in its trainer.

Per layer, each loss builds the difference map, its scaled copies and torch.norm, and
accumulates into a zero tensor; the attention modules keep the published parameters and
state_dict keys (so afa_ext.compat's modules load their state_dict with strict=True).
Used by compat_speed.py (the losses alone) and train_step.py (inside a training step).

The accumulators start from new_zeros(()): the original's torch.tensor(0.) for float32
maps, and float64 for the float64 value the errors are measured against.
"""

from __future__ import annotations

import torch
from torch import nn


def _flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.reshape(maps.shape[0], maps.shape[1], maps.shape[2] * maps.shape[3])


class OriginalPixelAttention(nn.Module):
    """The published pixel attention: mean over C, Linear(P, k), ReLU, Linear(k, P), softmax."""

    def __init__(self, in_channels: int, feature_size: int):
        super().__init__()
        self.fc1 = nn.Linear(feature_size * feature_size, feature_size, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(feature_size, feature_size * feature_size, bias=True)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        b, c, h, w = maps.shape
        logits = self.fc2(self.relu1(self.fc1(torch.mean(maps.view(b, c, h * w), dim=1))))
        return self.softmax(logits.view(b, h * w)).reshape(b, 1, h * w)


class OriginalChannelAttention(nn.Module):
    """The published channel attention: Linear(P, k), ReLU, Linear(k, 1) per channel, + bias, softmax."""

    def __init__(self, in_channels: int, feature_size: int):
        super().__init__()
        self.fc1 = nn.Linear(feature_size * feature_size, feature_size, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(feature_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(in_channels))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        b, c, h, w = maps.shape
        logits = self.fc2(self.relu1(self.fc1(maps.view(b, c, h * w))))
        return self.softmax(logits.view(b, c) + self.bias)


def original_reg_fea_map(sources, targets):
    loss = targets[0].new_zeros(())
    for source, target in zip(sources, targets):
        loss += 0.5 * torch.norm(target - source.detach()) ** 2
    return loss


def original_reg_att_fea_map(sources, targets, channel_weights):
    loss = targets[0].new_zeros(())
    for index, (source, target) in enumerate(zip(sources, targets)):
        b, c, h, w = source.shape
        distance = torch.norm(_flat(target) - _flat(source).detach(), 2, 2)
        loss += 0.5 * torch.sum(c * torch.mul(channel_weights[index], distance**2) / (h * w))
    return loss


def original_reg_pixel_att_fea_map_learn(sources, targets, criterions):
    loss = targets[0].new_zeros(())
    for source, target, criterion in zip(sources, targets, criterions):
        attention = criterion(source)
        b, c, h, w = source.shape
        diff = torch.mul(attention, _flat(target) - _flat(source).detach()) * (h * w)
        loss += 0.5 * torch.sum(torch.norm(diff, 2, 1) ** 2) / b
    return loss


def original_reg_channel_att_fea_map_learn(sources, targets, criterions):
    loss = targets[0].new_zeros(1)
    for source, target, criterion in zip(sources, targets, criterions):
        attention = criterion(source)
        b, c, h, w = source.shape
        distance = torch.norm(_flat(target) - _flat(source).detach(), 2, 2)
        loss += 0.5 * torch.sum(torch.mul(attention, distance**2) * c) / b
    return loss


ORIGINAL_LOSSES = {
    "reg_fea_map": original_reg_fea_map,
    "reg_att_fea_map": original_reg_att_fea_map,
    "reg_pixel_att_fea_map_learn": original_reg_pixel_att_fea_map_learn,
    "reg_channel_att_fea_map_learn": original_reg_channel_att_fea_map_learn,
}
