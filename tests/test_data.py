"""Datasets: each format read from local disk, deterministic splits, clear errors on bad folders."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from nas.data import CIFAR_LAYOUT, augment_batch, load_dataset, stratified_split, stratified_three_way
from nas.errors import NasError


def write_cifar(root, per_batch=20, seed=0):
    """A tiny copy of the cifar-10-batches-py layout; class c's images are all of grey level 20 * c."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        data = np.repeat((20 * labels).astype(np.uint8)[:, None], 3072, axis=1)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": name.encode()}, f)
    return root


def write_images(root, classes=("cat", "dog", "owl"), per_class=5, size=(12, 10)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (80 * c, 10 * i, 255 - 80 * c)
            Image.new("RGB", size, colour).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_split_three_ways_stratified_with_a_test_split_no_seed_moves(digits):
    data = digits
    assert data.name == "digits" and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (1259, 269, 269)  # 70/15/15 of 1,797
    for split in (data.val, data.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() >= 26 and counts.max() <= 28  # 15% of each class (174..183 images)
    # no image in two splits: scikit-learn's digits hold no exact duplicates across these rows
    rows = {split: {tuple(im[0].flatten().tolist()) for im in getattr(data, split).images} for split in ("train", "val", "test")}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    again = load_dataset("digits")
    assert torch.equal(again.train.labels, data.train.labels) and torch.equal(again.val.images, data.val.images)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.val.images, data.val.images)  # the seed picks validation...
    assert torch.equal(other.test.images, data.test.images)  # ...but every run reports on the same test images
    assert [len(y) for _, y in data.test_batches(100, 8)] == [100, 100, 69]
    assert torch.equal(torch.cat([y for _, y in data.eval_batches("test", 64, 8)]), data.test.labels)
    with pytest.raises(NasError, match="split should be one of val, test instead of 'train'"):
        data.split("train")
    x, y = data.train.get(torch.arange(8), 32)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated
    assert data.train.get(torch.arange(8), 16)[0].shape == (8, 3, 16, 16)
    # normalised with the training split's statistics
    all_x, _ = data.train.get(torch.arange(len(data.train)), 8)
    assert abs(float(all_x.mean())) < 0.05 and float(all_x.std()) == pytest.approx(1.0, abs=0.05)


def test_any_fraction_of_the_train_split_is_stratified(digits):
    data = digits
    prefix = data.train.labels[: data.train_size(0.1)]
    counts = torch.bincount(prefix, minlength=10)
    assert counts.min() >= 12 and counts.max() <= 14  # 126 images, ~12.6 per class
    # an epoch at that fraction visits exactly the prefix (126 = 3 x 32 + 30: nothing dropped), shuffled
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([y for _, y in data.train_batches(0.1, 32, 16, g)])
    assert len(prefix) == 126 and sorted(labels.tolist()) == sorted(prefix.tolist())
    assert not torch.equal(labels, prefix)


def test_train_batches_are_seeded_and_drop_a_tiny_last_batch(digits):
    data = digits
    assert data.train_size(1.0) == 1259
    assert data.train_steps(1.0, 120) == 10  # 10 x 120 + 59: 59 is under half a batch, dropped
    assert data.train_steps(1.0, 64) == 20  # 19 x 64 + 43: kept
    run = [torch.cat([y for _, y in data.train_batches(1.0, 120, 8, torch.Generator().manual_seed(s))]) for s in (3, 3, 4)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    assert len(run[0]) == 1200


def test_stratified_split_keeps_every_image_exactly_once():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 5)
    train, val = stratified_split(labels, 0.2, seed=7)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(35))
    assert np.bincount(labels[val]).tolist() == [2, 4, 1]


def test_three_way_split_keeps_every_image_once_and_the_test_part_fixed():
    labels = np.repeat(np.arange(4), 20)
    train, val, test = stratified_three_way(labels, 0.15, 0.15, seed=5)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(80))
    assert np.bincount(labels[val]).tolist() == [3] * 4 and np.bincount(labels[test]).tolist() == [3] * 4
    assert np.array_equal(stratified_three_way(labels, 0.15, 0.15, seed=6)[2], test)
    assert not np.array_equal(stratified_three_way(labels, 0.15, 0.15, seed=6)[1], val)


def test_augment_crops_and_flips_per_image_but_never_when_disabled():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, 0.0, False, g), x)
    out = augment_batch(x, 0.25, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    # every output row is a (possibly flipped, possibly zero-padded) window of the input
    flipped_or_not = [x, x.flip(3)]
    for i in range(2):
        assert any(
            torch.equal(out[i, :, 4, 4], src[i, :, 4 + dy, 4 + dx])
            for src in flipped_or_not
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if 0 <= 4 + dy < 8 and 0 <= 4 + dx < 8
        )


def test_cifar10_folder_is_read_and_split_from_the_training_batches(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset(f"cifar10:{root}")
    assert data.num_classes == 10 and data.flip and data.crop_padding > 0
    assert len(data.train) + len(data.val) == 100 and len(data.val) >= 5  # validation from data_batch_*
    assert len(data.test) == 20  # test_batch, whole
    x, y = data.val.get(torch.arange(len(data.val)), 32)
    assert x.shape == (len(data.val), 3, 32, 32)
    # pixel values survive the round trip: the grey level identifies the label
    for split in (data.val, data.test):
        assert torch.equal(split.images[:, 0, 0, 0].long(), 20 * split.labels)
    with open(root / "test_batch", "rb") as f:
        assert data.test.labels.tolist() == pickle.load(f)[b"labels"]


class RunsACommand:
    """Unpickling this calls os.system: what a crafted CIFAR-10 batch can do to a plain pickle.load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("where", ["top", "inside an array's place"])
def test_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path, where):
    root = write_cifar(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    payload = RunsACommand(f"touch {marker}")
    crafted = payload if where == "top" else {b"data": payload, b"labels": [1]}
    (root / "data_batch_1").write_bytes(pickle.dumps(crafted))
    with pytest.raises(NasError, match=r"data_batch_1: not a CIFAR-10 pickle \(refused to load posix.system\)"):
        load_dataset(f"cifar10:{root}")
    assert not marker.exists()
    pickle.loads(pickle.dumps(crafted))  # the same bytes do run the command under a plain unpickler
    assert marker.exists()


def test_cifar10_batches_pickled_by_python2_era_protocols_still_load(tmp_path):
    """The real files are protocol-2 pickles; numpy arrays in them need numpy's reconstructors."""
    root = write_cifar(tmp_path / "cifar")
    labels = [3, 1] * 5
    data = np.repeat((20 * np.asarray(labels)).astype(np.uint8)[:, None], 3072, axis=1)
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"x": (1.5, "s", np.int64(4))}, protocol=2))
    loaded = load_dataset(f"cifar10:{root}")
    assert len(loaded.train) + len(loaded.val) == 90


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "data_batch_3").unlink(), "data_batch_3: missing"),
        (lambda root: (root / "data_batch_2").write_bytes(b"not a pickle"), "not a CIFAR-10 pickle"),
        (lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"labels": [1]})), "b'data' and b'labels'"),
        (
            lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})),
            "uint8 N x 3072",
        ),
    ],
)
def test_cifar10_wrong_format_names_the_file_and_the_layout(tmp_path, damage, message):
    root = write_cifar(tmp_path / "cifar")
    damage(root)
    with pytest.raises(NasError, match=message) as info:
        load_dataset(f"cifar10:{root}")
    assert CIFAR_LAYOUT in str(info.value)


def test_missing_folders_and_unknown_specs_are_user_errors(tmp_path):
    for spec in (f"cifar10:{tmp_path}/nope", f"imagefolder:{tmp_path}/nope"):
        with pytest.raises(NasError, match="nope: no such folder; expected"):
            load_dataset(spec)
    for spec in ("mnist", "digits:x", "cifar10:", "imagefolder"):
        with pytest.raises(NasError, match="unknown data spec"):
            load_dataset(spec)


def test_imagefolder_with_train_and_val_subfolders_tests_on_val(tmp_path):
    write_images(tmp_path / "train", per_class=14)
    write_images(tmp_path / "val", per_class=2)
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.num_classes == 3 and len(data.train) == 36 and len(data.val) == 6 and len(data.test) == 6
    assert all("/train/" in p for p, _ in data.train.samples + data.val.samples)
    assert all("/val/" in p for p, _ in data.test.samples)
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]  # 15% of each class of train/
    x, y = data.test.get(torch.arange(6), 16)
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 1, 1, 2, 2]
    # images of one class share a colour: the decoded, normalised blue channel identifies the class
    assert x[0, 2].mean() > x[2, 2].mean() > x[4, 2].mean()
    g = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(1.0, 8, 16, g))
    assert [len(y) for _, y in batches] == [8, 8, 8, 8, 4]  # 36 images: 4 is half a batch, kept


def test_imagefolder_single_tree_is_split_three_ways(tmp_path):
    write_images(tmp_path, per_class=20)
    data = load_dataset(f"imagefolder:{tmp_path}", seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (42, 9, 9)
    assert torch.bincount(data.val.labels).tolist() == [3, 3, 3] == torch.bincount(data.test.labels).tolist()
    paths = [{p for p, _ in split.samples} for split in (data.train, data.val, data.test)]
    assert sum(map(len, paths)) == len(set.union(*paths)) == 60
    other = load_dataset(f"imagefolder:{tmp_path}", seed=1)
    assert [p for p, _ in other.val.samples] != [p for p, _ in data.val.samples]
    assert [p for p, _ in other.test.samples] == [p for p, _ in data.test.samples]


def test_imagefolder_wrong_layouts_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NasError, match="empty: not an image folder"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    write_images(tmp_path / "half" / "train")
    with pytest.raises(NasError, match="only one of train/ and val/"):
        load_dataset(f"imagefolder:{tmp_path / 'half'}")
    write_images(tmp_path / "mismatch" / "train")
    write_images(tmp_path / "mismatch" / "val", classes=("cat", "emu", "owl"))
    with pytest.raises(NasError, match="classes"):
        load_dataset(f"imagefolder:{tmp_path / 'mismatch'}")
    write_images(tmp_path / "broken")
    (tmp_path / "broken" / "cat" / "0.png").write_bytes(b"garbage")
    data = load_dataset(f"imagefolder:{tmp_path / 'broken'}")
    with pytest.raises(NasError, match="0.png: cannot read this image"):
        for split in (data.train, data.val, data.test):  # the broken file is in one of them
            split.get(torch.arange(len(split)), 8)
