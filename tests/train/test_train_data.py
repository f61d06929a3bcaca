"""afa_ext.train.data: seeded splits, per-sample augmentation, global batches, clear data errors."""

import re
from collections import Counter

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from afa_ext.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    GlobalBatchSampler,
    SampleSource,
    load_data,
    load_digits_pretraining,
)

CLASSES = ("cat", "dog", "owl")


def write_image(path, seed, size=20):
    """A random-noise RGB PNG, so that any flip or shift changes the pixels."""
    pixels = torch.randint(0, 256, (size * size * 3,), generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (size, size), bytes(pixels.to(torch.uint8).tolist())).save(path)


def make_folder(root, splits=("train",), classes=CLASSES, per_class=6):
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", seed=1000 * s + 100 * c + i)
    return root


def folder_splits(root, **kwargs):
    options = dict(image_size=16, val_fraction=0.34, seed=5)
    options.update(kwargs)
    return load_data(str(root), **options)


def stack(source, indices):
    return torch.stack([source[i][0] for i in indices])


# ----------------------------------------------------------------------------- GlobalBatchSampler


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("num_samples", [24, 23, 21])
def test_ranks_together_make_the_one_process_batches(world, num_samples):
    one_process = GlobalBatchSampler(num_samples, 8, seed=3, shuffle=True)
    ranks = [GlobalBatchSampler(num_samples, 8, seed=3, shuffle=True, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for sampler in (one_process, *ranks):
            sampler.set_epoch(epoch)
        expected = one_process.global_batches()
        shares = [list(sampler) for sampler in ranks]
        assert all(len(share) == len(ranks[0]) for share in shares)
        for step, batch in enumerate(ranks[0].global_batches()):
            together = [i for share in shares for i in share[step]]
            assert sorted(together) == sorted(batch)
            assert [share[step] for share in shares] == [batch[r::world] for r in range(world)]
            assert batch == expected[step][: len(batch)]
            assert len(batch) == len(expected[step]) or step == len(expected) - 1
        assert len(shares[0]) in (len(expected), len(expected) - 1)


def test_one_process_batches_cover_every_sample_once():
    sampler = GlobalBatchSampler(23, 8, seed=0, shuffle=True)
    batches = sampler.global_batches()
    assert [len(b) for b in batches] == [8, 8, 7] and len(sampler) == 3
    assert sorted(i for b in batches for i in b) == list(range(23))


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch, shuffle=True):
        sampler = GlobalBatchSampler(50, 10, seed=seed, shuffle=shuffle)
        sampler.set_epoch(epoch)
        return [i for b in sampler.global_batches() for i in b]

    torch.manual_seed(0)
    first = order(1, 2)
    torch.manual_seed(123)
    torch.rand(7)
    assert order(1, 2) == first
    assert order(1, 3) != first
    assert order(2, 2) != first
    assert first != list(range(50))
    assert order(1, 2, shuffle=False) == order(9, 4, shuffle=False) == list(range(50))


@pytest.mark.parametrize(
    "num_samples, world, sizes",
    [
        (10, 1, [4, 4, 2]),  # world 1: nothing trimmed
        (10, 2, [4, 4, 2]),
        (11, 2, [4, 4, 2]),  # 3 left over -> 2
        (10, 4, [4, 4]),  # 2 left over -> 0: dropped
        (8, 4, [4, 4]),
        (3, 4, []),
    ],
)
def test_partial_last_batch_is_trimmed_to_a_multiple_of_world(num_samples, world, sizes):
    sampler = GlobalBatchSampler(num_samples, 4, seed=0, shuffle=False, rank=world - 1, world=world)
    assert [len(b) for b in sampler.global_batches()] == sizes
    assert len(sampler) == len(sizes) == len(list(sampler))
    assert all(len(share) == size // world for share, size in zip(sampler, sizes))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch=6, world=4), "multiple of world=4, got 6"),
        (dict(global_batch=0), "global_batch >= 1, got 0"),
        (dict(global_batch=4, rank=2, world=2), r"rank in \[0, 2\), got 2"),
        (dict(global_batch=4, rank=-1, world=2), r"rank in \[0, 2\), got -1"),
        (dict(global_batch=4, world=0), "world >= 1, got 0"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalBatchSampler(10, seed=0, shuffle=True, **kwargs)


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = make_folder(tmp_path)
    first, second = folder_splits(root).train, folder_splits(root).train
    indices = range(len(first))
    torch.manual_seed(0)
    reference = stack(first, indices)
    torch.manual_seed(1)
    assert torch.equal(stack(second, indices), reference)
    assert torch.equal(stack(first, reversed(indices)), reference.flip(0))
    first.set_epoch(1)
    moved = stack(first, indices)
    changed = sum(not torch.equal(a, b) for a, b in zip(moved, reference))
    assert changed >= len(first) // 2
    first.set_epoch(0)
    assert torch.equal(stack(first, indices), reference)


def test_augmentation_changes_with_the_seed(tmp_path):
    root = make_folder(tmp_path, splits=("train", "val"))  # val/ given: the seed moves no file
    first, other = folder_splits(root, seed=5).train, folder_splits(root, seed=6).train
    assert first.items == other.items
    assert not torch.equal(stack(first, range(len(first))), stack(other, range(len(other))))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_see_the_epoch_and_give_the_main_process_tensors(tmp_path, num_workers):
    train = folder_splits(make_folder(tmp_path)).train
    train.set_epoch(3)
    expected = stack(train, range(len(train)))
    loader = DataLoader(train, batch_size=4, shuffle=False, num_workers=num_workers)
    images = torch.cat([batch for batch, _ in loader])
    labels = torch.cat([label for _, label in loader]).tolist()
    assert torch.equal(images, expected)
    assert labels == train.labels
    train.set_epoch(0)
    assert not torch.equal(torch.cat([batch for batch, _ in loader]), expected)


def test_folder_eval_is_resize_centre_crop_normalise_and_ignores_the_epoch(tmp_path):
    splits = folder_splits(make_folder(tmp_path))
    val = splits.val
    path = val.items[0]
    with Image.open(path) as image:
        resized = TF.resize(image.convert("RGB"), [18, 18])  # round(16 * 256 / 224) = 18
    expected = TF.normalize(TF.center_crop(TF.to_tensor(resized), [16, 16]), IMAGENET_MEAN, IMAGENET_STD)
    image, label = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert torch.equal(image, expected) and label == val.labels[0]
    val.set_epoch(7)
    assert torch.equal(val[0][0], expected)


def test_folder_train_sample_is_a_flip_and_crop_of_the_resized_image(tmp_path):
    train = folder_splits(make_folder(tmp_path)).train
    with Image.open(train.items[0]) as image:
        resized = TF.to_tensor(TF.resize(image.convert("RGB"), [18, 18]))
    candidates = [
        TF.normalize(TF.crop(view, top, left, 16, 16), IMAGENET_MEAN, IMAGENET_STD)
        for view in (resized, TF.hflip(resized))
        for top in range(3)
        for left in range(3)
    ]
    for epoch in range(4):
        train.set_epoch(epoch)
        assert any(torch.equal(train[0][0], c) for c in candidates)


def find_shift(shifted, plain, blank, max_shift=2):
    """The (dy, dx) with shifted[y, x] = plain[y + dy, x + dx] (blank outside), or None."""
    size = plain.shape[-1]
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            padded = torch.nn.functional.pad(plain, (max_shift,) * 4, value=blank)
            view = padded[:, max_shift + dy : max_shift + dy + size, max_shift + dx : max_shift + dx + size]
            if torch.equal(view, shifted):
                return dy, dx
    return None


def test_digits_augmentation_is_a_shift_with_blank_padding():
    train = load_data("digits", image_size=16, val_fraction=0.5, seed=0, shots=4).train
    plain = SampleSource(train.items, train.labels, train.transform, train=False)
    blank = train.transform(torch.zeros(1, 16, 16), None)[0, 0, 0].item()
    shifts = set()
    for index in range(len(train)):
        shift = find_shift(train[index][0], plain[index][0], blank)
        assert shift is not None
        shifts.add(shift)
    assert len(shifts) > 3


def test_digits_eval_ignores_the_epoch():
    val = load_data("digits", image_size=None, val_fraction=0.5, seed=0).val
    before = stack(val, range(5))
    val.set_epoch(5)
    assert torch.equal(stack(val, range(5)), before)


# ----------------------------------------------------------------------------- digits


def image_keys(*sources):
    """(8x8 image bytes, label) of every sample of sources loaded at image_size 8."""
    keys = Counter()
    for source in sources:
        codes = (source.items * 16).round().to(torch.uint8)
        keys.update((code.numpy().tobytes(), label) for code, label in zip(codes, source.labels))
    return keys


def sklearn_keys(digits, offset):
    bunch = load_digits()
    return Counter(
        (image.astype("uint8").tobytes(), int(t) - offset)
        for image, t in zip(bunch.images, bunch.target)
        if int(t) in digits
    )


def test_digits_shapes_counts_and_labels():
    splits = load_data("digits", image_size=None, val_fraction=0.2, seed=1, shots=3)
    assert (splits.num_classes, splits.class_names, splits.in_channels) == (5, ["5", "6", "7", "8", "9"], 1)
    assert not splits.test_is_val
    image, label = splits.train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 16, 16) and isinstance(label, int)
    assert Counter(splits.train.labels) == {c: 3 for c in range(5)}
    for source in (splits.val, splits.test):
        assert set(source.labels) == set(range(5))
    for c in range(5):
        assert abs(splits.val.labels.count(c) - splits.test.labels.count(c)) <= 1
    assert load_data("digits", image_size=12, val_fraction=0.2, seed=1).val[0][0].shape == (1, 12, 12)


def test_digits_splits_partition_digits_5_to_9():
    splits = load_data("digits", image_size=8, val_fraction=0.2, seed=1, shots=10)
    keys = image_keys(splits.train, splits.val, splits.test)
    assert keys == sklearn_keys(range(5, 10), offset=5)
    assert len(splits.train) + len(splits.val) + len(splits.test) == sum(keys.values())


def test_pretraining_split_is_all_of_digits_0_to_4():
    splits = load_digits_pretraining(image_size=8)
    assert (splits.num_classes, splits.class_names, splits.in_channels) == (5, ["0", "1", "2", "3", "4"], 1)
    assert image_keys(splits.train, splits.val, splits.test) == sklearn_keys(range(5), offset=0)
    assert min(len(splits.val), len(splits.test)) > 50 and len(splits.train) > 600
    again = load_digits_pretraining(image_size=8)
    assert torch.equal(again.val.items, splits.val.items) and again.fingerprint == splits.fingerprint
    assert load_digits_pretraining().train[0][0].shape == (1, 16, 16)


def test_digits_selection_depends_on_the_seed():
    first = load_data("digits", image_size=None, val_fraction=0.2, seed=4)
    again = load_data("digits", image_size=None, val_fraction=0.2, seed=4)
    other = load_data("digits", image_size=None, val_fraction=0.2, seed=5)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).items, getattr(again, name).items)
    assert torch.equal(first.train[3][0], again.train[3][0])
    assert not torch.equal(first.train.items, other.train.items)
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_digits_rejects_impossible_shots():
    with pytest.raises(DataError, match=r"shots to be an int in \[1, 172\].*got 0"):
        load_data("digits", image_size=None, val_fraction=0.2, seed=0, shots=0)
    with pytest.raises(DataError, match="got 173"):
        load_data("digits", image_size=None, val_fraction=0.2, seed=0, shots=173)


# ----------------------------------------------------------------------------- image folders


def test_folder_validation_split_is_stratified(tmp_path):
    root = make_folder(tmp_path)
    write_image(root / "train" / "ant" / "0.png", seed=1)  # 1 image: stays in train
    for i in range(2):
        write_image(root / "train" / "bee" / f"{i}.png", seed=2 + i)  # 2 images: 1 to val
    splits = folder_splits(root, val_fraction=0.34)
    assert splits.class_names == ["ant", "bee", "cat", "dog", "owl"]
    assert (splits.num_classes, splits.in_channels) == (5, 3)
    assert Counter(splits.val.labels) == {1: 1, 2: 2, 3: 2, 4: 2}  # round(6 * 0.34) = 2
    assert Counter(splits.train.labels) == {0: 1, 1: 1, 2: 4, 3: 4, 4: 4}
    assert not set(splits.val.items) & set(splits.train.items)
    assert splits.test_is_val and splits.test.items == splits.val.items
    assert splits.train.train and not splits.val.train
    assert Counter(folder_splits(root, val_fraction=0.01).val.labels) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert folder_splits(root, seed=9).val.items != splits.val.items


def test_folder_with_val_and_test_uses_them_in_train_class_order(tmp_path):
    root = make_folder(tmp_path, splits=("train", "test"))
    make_folder(tmp_path, splits=("val",), classes=("owl",), per_class=2)
    splits = folder_splits(root)
    assert not splits.test_is_val
    assert splits.val.labels == [2, 2] and all("/val/owl/" in p for p in splits.val.items)
    assert Counter(splits.test.labels) == {0: 6, 1: 6, 2: 6}
    assert len(splits.train) == 18


def test_fingerprint_is_stable_and_follows_the_files(tmp_path):
    root = make_folder(tmp_path)
    first = folder_splits(root).fingerprint
    assert folder_splits(root).fingerprint == first and len(first) == 64
    int(first, 16)
    write_image(root / "train" / "dog" / "3.png", seed=77, size=21)
    changed = folder_splits(root).fingerprint
    assert changed != first
    write_image(root / "train" / "dog" / "6.png", seed=78)
    assert folder_splits(root).fingerprint not in (first, changed)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1])
def test_val_fraction_must_lie_strictly_between_0_and_1(tmp_path, val_fraction):
    with pytest.raises(DataError, match=f"val_fraction in the open interval.*got {re.escape(str(val_fraction))}"):
        folder_splits(make_folder(tmp_path), val_fraction=val_fraction)


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"data folder not found: {tmp_path / 'nowhere'}")):
        folder_splits(tmp_path / "nowhere")


def test_missing_train_split(tmp_path):
    make_folder(tmp_path, splits=("val",))
    with pytest.raises(DataError, match=re.escape(f"missing train split: expected folder {tmp_path / 'train'}")):
        folder_splits(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=re.escape(f"class folder {root / 'train' / 'emu'} has no images")):
        folder_splits(root)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders in"):
        folder_splits(tmp_path)


def test_unreadable_image_is_named_with_its_path(tmp_path):
    root = make_folder(tmp_path)
    broken = root / "train" / "dog" / "x.png"
    broken.write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=re.escape(f"unreadable image {broken}")):
        folder_splits(root)


def test_val_class_not_in_train(tmp_path):
    root = make_folder(tmp_path)
    make_folder(tmp_path, splits=("val",), classes=("cat", "yak"), per_class=1)
    with pytest.raises(DataError, match=r"val has classes not in train/: \['yak'\]"):
        folder_splits(root)


def test_bad_image_size(tmp_path):
    with pytest.raises(DataError, match="image_size to be a positive int or None, got 0"):
        folder_splits(make_folder(tmp_path), image_size=0)
