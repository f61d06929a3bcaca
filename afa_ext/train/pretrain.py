"""The digits demo's source model: a small CNN pretrained on digits 0-4, cached.

It plays the part ImageNet weights play for a real transfer. Training is seeded (seed 0,
SGD with momentum, a fixed schedule), so the cached file is the same on every machine
with the same torch; it is kept in the cache folder under a name that holds the image
size and a version of this recipe.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import checkpoint
from .data import GlobalBatchSampler, load_digits_pretraining
from .models import DigitsCNN

__all__ = ["digits_source_path", "digits_source_weights", "pretrain_digits_cnn"]

RECIPE_VERSION = 1
EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 0.05


def pretrain_digits_cnn(image_size: int, log: Callable[[str], None] = print) -> tuple[dict, float]:
    """Train DigitsCNN on digits 0-4; return its state_dict and its held-out accuracy."""
    data = load_digits_pretraining(image_size)
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = DigitsCNN(num_classes=data.num_classes, in_channels=data.in_channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    sampler = GlobalBatchSampler(len(data.train), BATCH_SIZE, seed=0, shuffle=True)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        data.train.set_epoch(epoch)
        model.train()
        for images, labels in torch.utils.data.DataLoader(data.train, batch_sampler=sampler):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(data.val, batch_size=256):
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    torch.set_rng_state(generator_state)
    return model.state_dict(), correct / max(total, 1)


def digits_source_path(cache_dir: str, image_size: int) -> str:
    """Where the digits 0-4 model for this image size is cached (whether or not it is yet)."""
    return str(Path(cache_dir) / f"digits_cnn_source_v{RECIPE_VERSION}_{image_size}px.pt")


def digits_source_weights(cache_dir: str, image_size: int, log: Callable[[str], None] = print) -> str:
    """The path of the cached digits 0-4 model for this image size, training it if needed."""
    path = Path(digits_source_path(cache_dir, image_size))
    if path.is_file():
        return str(path)
    log(f"pretraining the digits source model (digits 0-4, {image_size} px) once; cached in {path}")
    state_dict, accuracy = pretrain_digits_cnn(image_size, log)
    log(f"source model: {accuracy:.4f} accuracy on held-out digits 0-4")
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, state_dict)
    return str(path)
