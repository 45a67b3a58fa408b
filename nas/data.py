"""Datasets for proxy training, read from local disk only (nothing is ever downloaded).

Specs accepted by ``load_dataset``:

- ``digits``: scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes), the default;
  a stratified three-way split, 70% train / 15% validation / 15% test.
- ``cifar10:PATH``: the standard ``cifar-10-batches-py`` folder. ``test_batch`` is the test split;
  validation is a stratified 10% held out of ``data_batch_1..5``. Batches are read with a restricted
  unpickler: a crafted file cannot run code.
- ``imagefolder:PATH``: torchvision's ImageFolder layout, either ``PATH/train/<class>/*`` and
  ``PATH/val/<class>/*`` (``val/`` is the test split; validation is a stratified 15% of ``train/``) or
  one ``PATH/<class>/*`` tree split 70/15/15 like digits.

Three splits, three uses: training (weights), validation (every search decision), test (the report
only). The test split never depends on the seed, so runs with different seeds report on the same
images; the validation split does (``seed`` picks it).

Images are stored at their own size and produced at whatever resolution a ``Fidelity`` asks for
(bilinear resize, replicated to 3 channels, normalised), so one loaded dataset serves every rung.
Train splits are kept in a seeded, class-interleaved order: any prefix, i.e. any ``fraction`` of the
training data, is stratified and the same for every candidate.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from nas.errors import NasError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_LAYOUT = "a cifar-10-batches-py folder holding the pickled batches data_batch_1 .. data_batch_5"
FOLDER_LAYOUT = "PATH/train/<class>/<image> and PATH/val/<class>/<image>, or PATH/<class>/<image>"
SPLITS = ("val", "test")  # the held-out splits a model is scored on
VAL_SHARE, TEST_SHARE = 0.15, 0.15  # of a dataset that comes without a test split of its own
TEST_SEED = 0  # the test split is carved the same way whatever the run's seed


# --- splits: images at their own size, produced at any resolution ------------------------------


class TensorSplit:
    """A split held in memory: ``images`` N x 3 x H x W in [0, 1] (float) or 0..255 (uint8)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.labels = images, labels
        self._scale = 255.0 if images.dtype == torch.uint8 else 1.0
        self._mean, self._std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[indices].float() / self._scale
        return _normalise(_resize(x, resolution), self._mean, self._std), self.labels[indices]


class FolderSplit:
    """Image files decoded lazily; each decoded image is cached at the resolution it was asked for."""

    def __init__(self, samples: list[tuple[str, int]], mean: torch.Tensor, std: torch.Tensor):
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self._mean, self._std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int, resolution: int) -> torch.Tensor:
        key = (index, resolution)
        if key not in self._cache:
            from PIL import Image

            path = self.samples[index][0]
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                    # shorter side to `resolution`, then centre crop: keeps the aspect ratio
                    w, h = image.size
                    scale = resolution / min(w, h)
                    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
                    w, h = image.size
                    left, top = (w - resolution) // 2, (h - resolution) // 2
                    image = image.crop((left, top, left + resolution, top + resolution))
            except OSError as exc:
                raise NasError(f"{path}: cannot read this image ({exc}); expected {FOLDER_LAYOUT}") from None
            self._cache[key] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return self._cache[key]

    def get(self, indices: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self._decode(int(i), resolution) for i in indices]).float() / 255.0
        return _normalise(x, self._mean, self._std), self.labels[indices]


Split = TensorSplit | FolderSplit


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=x.shape[-1] > resolution)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


# --- the bundle ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits plus the augmentation that suits the images."""

    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    crop_padding: float = 0.0  # random-crop padding as a share of the resolution (CIFAR: 4/32)
    flip: bool = False  # random horizontal flips: natural images yes, digits no

    def train_size(self, fraction: float) -> int:
        """Images in the first ``fraction`` of the training split (at least one per class)."""
        return min(len(self.train), max(self.num_classes, math.ceil(fraction * len(self.train))))

    def train_steps(self, fraction: float, batch_size: int) -> int:
        """Batches per epoch: a last batch under half a batch (or of one image, which BatchNorm cannot
        normalise after global pooling) is dropped."""
        full, rest = divmod(self.train_size(fraction), batch_size)
        return full + (rest >= max(2, batch_size // 2) or not full)

    def train_batches(
        self, fraction: float, batch_size: int, resolution: int, generator: torch.Generator, augment: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch over the stratified prefix ``fraction``: shuffled by ``generator`` and, with
        ``augment``, randomly cropped and flipped as the dataset's images allow."""
        order = torch.randperm(self.train_size(fraction), generator=generator)
        crop_padding, flip = (self.crop_padding, self.flip) if augment else (0.0, False)
        for start in range(0, self.train_steps(fraction, batch_size) * batch_size, batch_size):
            x, y = self.train.get(order[start : start + batch_size], resolution)
            yield augment_batch(x, crop_padding, flip, generator), y

    def split(self, name: str) -> Split:
        """The held-out split ``name``: "val" (search decisions) or "test" (the report)."""
        if name not in SPLITS:
            raise NasError(f"split should be one of {', '.join(SPLITS)} instead of {name!r}")
        return self.val if name == "val" else self.test

    def eval_batches(self, split: str, batch_size: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out split ``split`` in order, unaugmented."""
        images = self.split(split)
        for start in range(0, len(images), batch_size):
            yield images.get(torch.arange(start, min(start + batch_size, len(images))), resolution)

    def val_batches(self, batch_size: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.eval_batches("val", batch_size, resolution)

    def test_batches(self, batch_size: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.eval_batches("test", batch_size, resolution)


def augment_batch(x: torch.Tensor, crop_padding: float, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop from a zero-padded (i.e. mean-coloured) image and optional horizontal flip, per image."""
    n, _, h, w = x.shape
    pad = round(crop_padding * h)
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        rows = (dy + torch.arange(h)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w)).view(n, 1, 1, w)
        x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x


def stratified_split(labels: np.ndarray, val_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: ``val_share`` of each class held out; train in class-interleaved order.

    Interleaving sorts each image by its position within its own (shuffled) class, so every prefix of
    the train order holds the classes in their overall proportions.
    """
    rng = np.random.default_rng(seed)
    train, val, position = [], [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(val_share * len(members))
        val.extend(members[:n_val])
        rest = members[n_val:]
        train.extend(rest)
        position.extend((np.arange(len(rest)) + rng.random(len(rest))) / len(rest))
    train_order = np.asarray(train, dtype=np.int64)[np.argsort(position, kind="stable")]
    return train_order, np.sort(np.asarray(val, dtype=np.int64))


def stratified_three_way(
    labels: np.ndarray, val_share: float, test_share: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices, each stratified; train class-interleaved as in ``stratified_split``.

    The test split is carved first with ``TEST_SEED``, so it is the same whatever ``seed`` is;
    validation then takes ``val_share`` of the whole from the rest, chosen by ``seed``.
    """
    rest, test = stratified_split(labels, test_share, TEST_SEED)
    rest = np.sort(rest)
    train, val = stratified_split(labels[rest], val_share / (1 - test_share), seed)
    return rest[train], np.sort(rest[val]), test


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _from_arrays(
    name: str,
    num_classes: int,
    images: torch.Tensor,
    labels: np.ndarray,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray] | None = None,
    **aug,
) -> Dataset:
    """A Dataset from in-memory images: ``parts`` are (train, val, test) indices into ``images``, or
    ``test`` gives the test images and labels themselves (then the third index array is ignored)."""
    train_idx, val_idx, test_idx = (torch.from_numpy(i.astype(np.int64)) for i in parts)
    y = torch.from_numpy(labels.astype(np.int64))
    test_images, test_labels = test if test is not None else (images[test_idx], labels[test_idx.numpy()])
    train_images = images[train_idx]
    mean, std = _channel_stats(train_images)
    return Dataset(
        name=name,
        num_classes=num_classes,
        train=TensorSplit(train_images, y[train_idx], mean, std),
        val=TensorSplit(images[val_idx], y[val_idx], mean, std),
        test=TensorSplit(test_images, torch.from_numpy(test_labels.astype(np.int64)), mean, std),
        **aug,
    )


# --- formats ---------------------------------------------------------------------------------------


def load_digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's digits: grey 8x8 (values 0..16) replicated to 3 channels, stratified 70/15/15.

    No flips (a mirrored 2 is not a 2) and no crops: at 8x8 one pixel of shift is an eighth of the
    digit, and the tuned proxy budget reaches its accuracy bar faster without.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    parts = stratified_three_way(bunch.target, VAL_SHARE, TEST_SHARE, seed)
    return _from_arrays("digits", 10, images, bunch.target, parts)


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR-10 batch holds: dicts, lists, bytes, strings, numbers, numpy arrays.

    Plain containers and scalars need no class lookup; everything else must be one of the few
    callables numpy's own array pickles name. Any other global (``os.system``, ``builtins.eval``)
    is refused before it is called, so a crafted file cannot run code.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy 1.x array pickles
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NasError(f"{path}: missing; expected {CIFAR_LAYOUT}") from None
    try:
        data = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise NasError(f"{path}: not a CIFAR-10 pickle ({exc}); expected {CIFAR_LAYOUT}") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as exc:
        raise NasError(f"{path}: not a CIFAR-10 pickle ({type(exc).__name__}); expected {CIFAR_LAYOUT}") from None
    if not isinstance(data, dict) or b"data" not in data or b"labels" not in data:
        raise NasError(f"{path}: not a CIFAR-10 batch (a dict with b'data' and b'labels'); expected {CIFAR_LAYOUT}")
    return data


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels N) of one checked batch file."""
    batch = _unpickle(path)
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise NasError(
            f"{path}: b'data' must be uint8 N x 3072 with N labels, got {data.dtype} {data.shape} "
            f"and {len(labels)} labels; expected {CIFAR_LAYOUT}"
        )
    if len(labels) and not (labels.min() >= 0 and labels.max() < 10):
        raise NasError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | Path, seed: int = 0) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py``: ``test_batch`` is the test split; 10% of the training
    batches (stratified, by ``seed``) are held out for validation."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NasError(f"{root}: no such folder; expected {CIFAR_LAYOUT}")
    batches = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = _cifar_batch(root / "test_batch")
    labels = np.concatenate([y for _, y in batches])
    train_idx, val_idx = stratified_split(labels, 0.1, seed)
    return _from_arrays(
        f"cifar10:{root}", 10, torch.from_numpy(np.concatenate([x for x, _ in batches])), labels,
        (train_idx, val_idx, np.empty(0, np.int64)), test=(torch.from_numpy(test_images), test_labels),
        crop_padding=0.125, flip=True,
    )


def _image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root), loader=lambda p: p)
    except (FileNotFoundError, OSError) as exc:
        raise NasError(f"{root}: not an image folder ({exc}); expected {FOLDER_LAYOUT}") from None
    return folder.classes, folder.samples


def load_image_folder(path: str | Path, seed: int = 0) -> Dataset:
    """ImageFolder layout; images are normalised with ImageNet statistics (computing them would decode all).

    With ``train/`` and ``val/``, ``val/`` is the test split and validation is carved from ``train/``;
    a single ``<class>/`` tree is split three ways like digits.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NasError(f"{root}: no such folder; expected {FOLDER_LAYOUT}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, samples = _image_folder(root / "train")
        test_classes, test = _image_folder(root / "val")
        if test_classes != classes:
            raise NasError(f"{root}: train/ has classes {classes} but val/ has {test_classes}; they must match")
        train_idx, val_idx = stratified_split(np.asarray([label for _, label in samples]), VAL_SHARE, seed)
    elif (root / "train").is_dir() or (root / "val").is_dir():
        raise NasError(f"{root}: has only one of train/ and val/; expected {FOLDER_LAYOUT}")
    else:
        classes, samples = _image_folder(root)
        train_idx, val_idx, test_idx = stratified_three_way(
            np.asarray([label for _, label in samples]), VAL_SHARE, TEST_SHARE, seed
        )
        test = [samples[i] for i in test_idx]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return Dataset(
        f"imagefolder:{root}",
        len(classes),
        FolderSplit([samples[i] for i in train_idx], mean, std),
        FolderSplit([samples[i] for i in val_idx], mean, std),
        FolderSplit(test, mean, std),
        crop_padding=0.125,
        flip=True,
    )


def load_dataset(spec: str = "digits", seed: int = 0) -> Dataset:
    """``digits`` | ``cifar10:PATH`` | ``imagefolder:PATH`` -> Dataset; ``seed`` picks the validation
    split (the test split is fixed)."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits_dataset(seed)
    if kind == "cifar10" and path:
        return load_cifar10(path, seed)
    if kind == "imagefolder" and path:
        return load_image_folder(path, seed)
    raise NasError(f"unknown data spec {spec!r}; use 'digits', 'cifar10:PATH' or 'imagefolder:PATH'")
