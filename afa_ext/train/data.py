"""Data for the AFA trainer: turns a data spec into seeded train/val/test sample sources.

A spec is either ``"digits"`` (scikit-learn's bundled 8x8 digits: a small CNN is pretrained
on digits 0-4 and fine-tuned on a few shots of digits 5-9) or the path of an image folder
(``DIR/train/<class>/*.png`` and optional ``DIR/val/``, ``DIR/test/``).

Every random draw is seeded explicitly, never taken from the global RNG:

* the split of a data set into train/val/test comes from a ``torch.Generator`` seeded by
  ``mix_seed(seed)``;
* the augmentation of training sample ``index`` in ``epoch`` comes from a generator seeded by
  ``mix_seed(seed, epoch, index)``, so a sample looks the same whichever process or
  DataLoader worker loads it;
* the order of the samples in an epoch comes from ``mix_seed(seed, epoch)``
  (``GlobalBatchSampler``), and each rank takes a fixed slice of every global batch, so the
  union over ranks of step k is the one-process batch k.

scikit-learn, torchvision and PIL are imported lazily, only here.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .identity import file_identity, fingerprint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DIGITS_IMAGE_SIZE = 16
FOLDER_IMAGE_SIZE = 224
DIGITS_SHIFT = 2
TARGET_DIGITS = (5, 6, 7, 8, 9)
PRETRAINING_DIGITS = (0, 1, 2, 3, 4)
PRETRAINING_SEED = 0
PRETRAINING_HELD_OUT_FRACTION = 0.1

_MASK64 = (1 << 64) - 1


class DataError(ValueError):
    """The data spec or the files it names cannot be used; the message says what and where."""


# ----------------------------------------------------------------------------- seeds


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers: h = 0; h = splitmix64(h xor (p mod 2^64)) for each p; h mod 2^63.

    Explicit arithmetic, so the same parts give the same seed in every process.
    """
    mixed = 0
    for part in parts:
        mixed = _splitmix64(mixed ^ (int(part) & _MASK64))
    return mixed & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


# ----------------------------------------------------------------------------- samples


class SampleSource(torch.utils.data.Dataset):
    """A list of samples with a transform; ``source[i] -> (float32 tensor (C, H, W), int label)``.

    ``transform(items[i], generator)`` makes the image tensor. For a training source
    (``train=True``) ``generator`` is a ``torch.Generator`` seeded by
    ``mix_seed(seed, epoch, i)`` and every augmentation draw comes from it; for an eval source
    it is ``None`` (no augmentation) and the epoch is ignored.

    With a DataLoader, call ``set_epoch`` before iterating: without persistent workers each
    iterator hands the workers this object as it is at that moment, so they see the epoch.
    Do not use ``persistent_workers=True``: persistent workers keep the epoch of their start.
    """

    def __init__(
        self,
        items: Sequence,
        labels: Sequence[int],
        transform: Callable[[object, torch.Generator | None], Tensor],
        *,
        train: bool,
        seed: int = 0,
    ):
        if len(items) != len(labels):
            raise ValueError(f"SampleSource: expected one label per item ({len(items)}), got {len(labels)}")
        self.items = items
        self.labels = [int(label) for label in labels]
        self.transform = transform
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"SampleSource: index {index} out of range [0, {len(self)})")
        generator = _generator(self.seed, self.epoch, index) if self.train else None
        return self.transform(self.items[index], generator), self.labels[index]


@dataclass
class DataSplits:
    """The three splits of a data set and what a model needs to know about it."""

    train: SampleSource
    val: SampleSource
    test: SampleSource
    num_classes: int
    class_names: list[str]
    in_channels: int
    fingerprint: str
    test_is_val: bool = False


def _check_image_size(image_size: int | None, default: int) -> int:
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"expected image_size to be a positive int or None, got {image_size!r}")
    return image_size


def _check_val_fraction(val_fraction: float) -> float:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"expected val_fraction in the open interval (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def load_data(spec: str, *, image_size: int | None, val_fraction: float, seed: int, shots: int = 10) -> DataSplits:
    """The splits of ``spec``: ``"digits"`` (the few-shot digits 5-9 task) or an image folder path.

    ``image_size`` None means 16 for digits, 224 for folders. ``shots`` is used by digits
    only (training images per class); ``val_fraction`` by folders without ``val/`` only, but
    it is checked to lie in (0, 1) for every spec.
    """
    _check_val_fraction(val_fraction)
    if str(spec) == "digits":
        return _load_target_digits(_check_image_size(image_size, DIGITS_IMAGE_SIZE), seed=seed, shots=shots)
    return _load_folder(
        Path(spec), image_size=_check_image_size(image_size, FOLDER_IMAGE_SIZE), val_fraction=val_fraction, seed=seed
    )


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Tensor, Tensor, float, float]:
    """scikit-learn's 1797 digits as (N, 1, 8, 8) float32 in [0, 1] (= value / 16), the labels,
    and the mean and std of all their pixels (every digit 0-9), used to normalise both tasks."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64) / 16.0
    mean, std = images.mean().item(), images.std(unbiased=False).item()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images.unsqueeze(1).to(torch.float32), labels, mean, std


class DigitsTransform:
    """Digit image (1, S, S) in [0, 1] -> (x - mean) / std, shifted first when a generator is given.

    The shift pads ``shift`` blank (zero) pixels on every side and crops S x S back at an
    offset (dy, dx) drawn uniformly from {0..2*shift}^2 with the generator. No flips.
    """

    def __init__(self, mean: float, std: float, shift: int = DIGITS_SHIFT):
        self.mean, self.std, self.shift = mean, std, shift

    def __call__(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        if generator is not None and self.shift > 0:
            image = self._random_shift(image, generator)
        return (image - self.mean) / self.std

    def _random_shift(self, image: Tensor, generator: torch.Generator) -> Tensor:
        size = image.shape[-1]
        top, left = torch.randint(0, 2 * self.shift + 1, (2,), generator=generator).tolist()
        padded = F.pad(image, (self.shift,) * 4)
        return padded[:, top : top + size, left : left + size]


def _resize_digits(images: Tensor, image_size: int) -> Tensor:
    """Bilinear resize (no antialias) of (N, 1, 8, 8) to (N, 1, image_size, image_size)."""
    return F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False
    ).contiguous()


def _stratified_split(
    labels: Tensor, counts: Callable[[int], Sequence[int]], generator: torch.Generator
) -> list[list[int]]:
    """Indices of ``labels`` cut per class into len(counts(n)) + 1 parts.

    For each class (ascending label) its n indices are permuted with ``generator``; part k
    takes the next ``counts(n)[k]`` of them and the last part takes the rest. Returns one
    sorted index list per part.
    """
    parts: list[list[int]] | None = None
    for label in sorted(set(labels.tolist())):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        bounds = [0, *itertools.accumulate(counts(len(members))), len(members)]
        if parts is None:
            parts = [[] for _ in range(len(bounds) - 1)]
        for part, start, stop in zip(parts, bounds[:-1], bounds[1:]):
            part.extend(members[start:stop])
    return [sorted(part) for part in parts or []]


def _digits_source(
    indices: list[int],
    images: Tensor,
    labels: Tensor,
    label_offset: int,
    transform: DigitsTransform,
    *,
    train: bool,
    seed: int,
) -> SampleSource:
    picked = torch.as_tensor(indices, dtype=torch.int64)
    return SampleSource(images[picked], (labels[picked] - label_offset).tolist(), transform, train=train, seed=seed)


def _digits_splits(
    digits: Sequence[int], image_size: int, counts: Callable[[int], Sequence[int]], seed: int, payload: dict
) -> DataSplits:
    """The digits in ``digits`` (consecutive), relabelled 0.., split per class by ``counts``."""
    all_images, all_labels, mean, std = _digits_arrays()
    chosen = torch.nonzero((all_labels >= digits[0]) & (all_labels <= digits[-1])).flatten()
    images = _resize_digits(all_images[chosen], image_size)
    labels = all_labels[chosen]
    train, val, test = _stratified_split(labels, counts, _generator(seed))
    transform = DigitsTransform(mean, std)
    sources = [
        _digits_source(part, images, labels, digits[0], transform, train=is_train, seed=seed)
        for part, is_train in ((train, True), (val, False), (test, False))
    ]
    return DataSplits(
        *sources,
        num_classes=len(digits),
        class_names=[str(d) for d in digits],
        in_channels=1,
        fingerprint=fingerprint(**payload),
    )


def _load_target_digits(image_size: int, *, seed: int, shots: int) -> DataSplits:
    """Digits 5-9 relabelled 0-4: ``shots`` training images per class, the rest halved
    (per class, floor for val) into val and test."""
    _, all_labels, _, _ = _digits_arrays()
    smallest = min(int((all_labels == d).sum()) for d in TARGET_DIGITS)
    if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= smallest - 2:
        raise DataError(
            f"digits: expected shots to be an int in [1, {smallest - 2}] "
            f"(the smallest class has {smallest} images, 2 kept for val/test), got {shots!r}"
        )

    def counts(n: int) -> tuple[int, int]:
        return shots, (n - shots) // 2

    payload = {
        "kind": "digits",
        "digits": list(TARGET_DIGITS),
        "shots": shots,
        "seed": int(seed),
        "image_size": image_size,
    }
    return _digits_splits(TARGET_DIGITS, image_size, counts, seed, payload)


def load_digits_pretraining(image_size: int | None = None) -> DataSplits:
    """All digits 0-4 (labels 0-4), the source domain for pretraining a small CNN.

    Split per class with the fixed seed 0: val and test get round(0.1 n) images each, train
    the rest. Train is augmented (shift) with augmentation seed 0. in_channels 1.
    """
    size = _check_image_size(image_size, DIGITS_IMAGE_SIZE)

    def counts(n: int) -> tuple[int, int]:
        held_out = round(PRETRAINING_HELD_OUT_FRACTION * n)
        return n - 2 * held_out, held_out

    payload = {
        "kind": "digits-pretraining",
        "digits": list(PRETRAINING_DIGITS),
        "seed": PRETRAINING_SEED,
        "held_out_fraction": PRETRAINING_HELD_OUT_FRACTION,
        "image_size": size,
    }
    return _digits_splits(PRETRAINING_DIGITS, size, counts, PRETRAINING_SEED, payload)


# ----------------------------------------------------------------------------- image folders


class FolderTransform:
    """Image path -> normalised float32 (3, S, S) tensor, S = image_size.

    The image is read as RGB and resized (bilinear) to (R, R), R = round(S * 256 / 224).
    With a generator (training): horizontal flip when u < 0.5 (u uniform in [0, 1)), then an
    S x S crop at (top, left) uniform in {0..R-S}^2. Without (eval): the centre S x S crop.
    Then to_tensor (values / 255) and ImageNet normalisation (x - mean) / std per channel.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.resize_to = round(image_size * 256 / 224)

    def __call__(self, path: str, generator: torch.Generator | None) -> Tensor:
        import torchvision.transforms.functional as TF
        from PIL import Image

        with Image.open(path) as image:
            resized = TF.resize(image.convert("RGB"), [self.resize_to, self.resize_to])
        tensor = TF.to_tensor(resized)
        if generator is None:
            tensor = TF.center_crop(tensor, [self.image_size, self.image_size])
        else:
            tensor = self._random_flip_and_crop(tensor, generator)
        return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)

    def _random_flip_and_crop(self, tensor: Tensor, generator: torch.Generator) -> Tensor:
        import torchvision.transforms.functional as TF

        if torch.rand((), generator=generator).item() < 0.5:
            tensor = TF.hflip(tensor)
        top, left = torch.randint(0, self.resize_to - self.image_size + 1, (2,), generator=generator).tolist()
        return TF.crop(tensor, top, left, self.image_size, self.image_size)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    """The image files (by extension, case-insensitive, hidden files skipped) of a class folder, sorted."""
    files = sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(
            f"class folder {class_dir} has no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _scan_split(split_dir: Path, known_classes: list[str] | None) -> dict[str, list[Path]]:
    """{class name: image files} of one split folder; classes must be among ``known_classes``."""
    class_dirs = _visible_dirs(split_dir)
    if not class_dirs:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image files>)")
    if known_classes is not None:
        unknown = sorted({d.name for d in class_dirs} - set(known_classes))
        if unknown:
            raise DataError(f"{split_dir} has classes not in train/: {unknown} (train classes: {known_classes})")
    return {d.name: _image_files(d) for d in class_dirs}


def _check_readable(files: list[Path]) -> None:
    """Open the header of every image with PIL (only headers: pixels are decoded when loaded)."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                _ = image.size
        except Exception as error:  # PIL raises many types for broken files; all mean unreadable
            raise DataError(f"unreadable image {path}: {error}") from error


def _samples(by_class: dict[str, list[Path]], class_index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """Files and labels in train's class order, files sorted within a class."""
    files, labels = [], []
    for name in sorted(by_class, key=class_index.__getitem__):
        files.extend(by_class[name])
        labels.extend([class_index[name]] * len(by_class[name]))
    return files, labels


def _val_count(n: int, val_fraction: float) -> int:
    """Validation images of a class of n: min(n - 1, max(1, floor(n * f + 1/2))) for n >= 2, else 0."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(n * val_fraction + 0.5)))


def _load_folder(root: Path, *, image_size: int, val_fraction: float, seed: int) -> DataSplits:
    if not root.is_dir():
        raise DataError(
            f"data folder not found: {root} (expected a folder with train/<class>/ image folders, or the spec 'digits')"
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"missing train split: expected folder {train_dir}")
    train_by_class = _scan_split(train_dir, None)
    class_names = list(train_by_class)
    class_index = {name: i for i, name in enumerate(class_names)}
    extra = {split: _scan_split(root / split, class_names) for split in ("val", "test") if (root / split).is_dir()}
    all_files = [f for by_class in (train_by_class, *extra.values()) for files in by_class.values() for f in files]
    _check_readable(all_files)

    train_files, train_labels = _samples(train_by_class, class_index)
    transform = FolderTransform(image_size)
    payload = {"kind": "folder", "files": [file_identity(f, root) for f in all_files], "image_size": image_size}
    if "val" in extra:
        val_files, val_labels = _samples(extra["val"], class_index)
    else:
        labels = torch.as_tensor(train_labels, dtype=torch.int64)
        val_part, train_part = _stratified_split(labels, lambda n: (_val_count(n, val_fraction),), _generator(seed))
        val_files, val_labels = [train_files[i] for i in val_part], [train_labels[i] for i in val_part]
        train_files, train_labels = [train_files[i] for i in train_part], [train_labels[i] for i in train_part]
        payload["val_split"] = {"seed": int(seed), "val_fraction": val_fraction}

    def source(files: list[Path], labels: list[int], train: bool) -> SampleSource:
        return SampleSource([str(f) for f in files], labels, transform, train=train, seed=seed)

    val = source(val_files, val_labels, False)
    test = source(*_samples(extra["test"], class_index), False) if "test" in extra else val
    return DataSplits(
        source(train_files, train_labels, True),
        val,
        test,
        num_classes=len(class_names),
        class_names=class_names,
        in_channels=3,
        fingerprint=fingerprint(**payload),
        test_is_val="test" not in extra,
    )


# ----------------------------------------------------------------------------- batches


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global batches of sample indices, and this rank's share of each.

    The epoch's order is ``torch.randperm(N)`` from a generator seeded by
    ``mix_seed(seed, epoch)`` when shuffling, else 0..N-1. It is cut into global batches of
    ``global_batch``; a partial last batch of m indices is trimmed to m - (m mod world)
    (dropped when that is 0). Rank r takes ``batch[r::world]`` of every global batch, so the
    ranks' shares of step k together are exactly global batch k.
    """

    def __init__(self, num_samples: int, global_batch: int, *, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        if num_samples < 0:
            raise ValueError(f"GlobalBatchSampler: expected num_samples >= 0, got {num_samples}")
        if world < 1:
            raise ValueError(f"GlobalBatchSampler: expected world >= 1, got {world}")
        if global_batch < 1:
            raise ValueError(f"GlobalBatchSampler: expected global_batch >= 1, got {global_batch}")
        if global_batch % world != 0:
            raise ValueError(
                f"GlobalBatchSampler: expected global_batch to be a multiple of world={world}, got {global_batch}"
            )
        if not 0 <= rank < world:
            raise ValueError(f"GlobalBatchSampler: expected rank in [0, {world}), got {rank}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        return torch.randperm(self.num_samples, generator=_generator(self.seed, self.epoch)).tolist()

    def global_batches(self) -> list[list[int]]:
        """All global batches of the current epoch, the last one trimmed as described above."""
        order = self._order()
        batches = [order[start : start + self.global_batch] for start in range(0, len(order), self.global_batch)]
        if batches and len(batches[-1]) < self.global_batch:
            kept = len(batches[-1]) - len(batches[-1]) % self.world
            batches[-1] = batches[-1][:kept]
            if not kept:
                batches.pop()
        return batches

    def __iter__(self):
        for batch in self.global_batches():
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest >= self.world else 0)
