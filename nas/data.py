"""Datasets for proxy training, read from local disk only (nothing is ever downloaded).

Specs accepted by ``load_dataset``:

- ``digits``: scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes), the default.
- ``cifar10:PATH``: the standard ``cifar-10-batches-py`` folder. Validation is a stratified 10% held
  out of ``data_batch_1..5``, so a search never looks at ``test_batch``.
- ``imagefolder:PATH``: torchvision's ImageFolder layout, either ``PATH/train/<class>/*`` and
  ``PATH/val/<class>/*`` or one ``PATH/<class>/*`` tree split 80/20 (stratified, seeded).

Images are stored at their own size and produced at whatever resolution a ``Fidelity`` asks for
(bilinear resize, replicated to 3 channels, normalised), so one loaded dataset serves every rung.
Train splits are kept in a seeded, class-interleaved order: any prefix, i.e. any ``fraction`` of the
training data, is stratified and the same for every candidate.
"""

from __future__ import annotations

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
    """A train and a validation split plus the augmentation that suits the images."""

    name: str
    num_classes: int
    train: Split
    val: Split
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
        self, fraction: float, batch_size: int, resolution: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch over the stratified prefix ``fraction``: shuffled and augmented by ``generator``."""
        order = torch.randperm(self.train_size(fraction), generator=generator)
        for start in range(0, self.train_steps(fraction, batch_size) * batch_size, batch_size):
            x, y = self.train.get(order[start : start + batch_size], resolution)
            yield augment(x, self.crop_padding, self.flip, generator), y

    def val_batches(self, batch_size: int, resolution: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.val), batch_size):
            yield self.val.get(torch.arange(start, min(start + batch_size, len(self.val))), resolution)


def augment(x: torch.Tensor, crop_padding: float, flip: bool, generator: torch.Generator) -> torch.Tensor:
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
    train_order = np.asarray(train)[np.argsort(position, kind="stable")]
    return train_order, np.sort(np.asarray(val, dtype=np.int64))


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _from_arrays(
    name: str, images: torch.Tensor, labels: np.ndarray, num_classes: int, val_share: float, seed: int, **aug
) -> Dataset:
    train_idx, val_idx = stratified_split(labels, val_share, seed)
    y = torch.from_numpy(labels.astype(np.int64))
    train_images = images[torch.from_numpy(train_idx)]
    mean, std = _channel_stats(train_images)
    return Dataset(
        name=name,
        num_classes=num_classes,
        train=TensorSplit(train_images, y[train_idx], mean, std),
        val=TensorSplit(images[torch.from_numpy(val_idx)], y[val_idx], mean, std),
        **aug,
    )


# --- formats ---------------------------------------------------------------------------------------


def load_digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's digits: grey 8x8 (values 0..16) replicated to 3 channels, stratified 80/20.

    No flips (a mirrored 2 is not a 2) and no crops: at 8x8 one pixel of shift is an eighth of the
    digit, and the tuned proxy budget reaches its accuracy bar faster without.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return _from_arrays("digits", images, bunch.target, 10, 0.2, seed)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise NasError(f"{path}: missing; expected {CIFAR_LAYOUT}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise NasError(f"{path}: not a CIFAR-10 pickle ({type(exc).__name__}); expected {CIFAR_LAYOUT}") from None
    if not isinstance(data, dict) or b"data" not in data or b"labels" not in data:
        raise NasError(f"{path}: not a CIFAR-10 batch (a dict with b'data' and b'labels'); expected {CIFAR_LAYOUT}")
    return data


def load_cifar10(path: str | Path, seed: int = 0) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py``; 10% of the training batches held out for validation."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NasError(f"{root}: no such folder; expected {CIFAR_LAYOUT}")
    images, labels = [], []
    for i in range(1, 6):
        batch_path = root / f"data_batch_{i}"
        batch = _unpickle(batch_path)
        data = np.asarray(batch[b"data"])
        batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch_labels):
            raise NasError(
                f"{batch_path}: b'data' must be uint8 N x 3072 with N labels, got {data.dtype} {data.shape} "
                f"and {len(batch_labels)} labels; expected {CIFAR_LAYOUT}"
            )
        if len(batch_labels) and not (batch_labels.min() >= 0 and batch_labels.max() < 10):
            raise NasError(f"{batch_path}: labels must lie in 0..9, got {batch_labels.min()}..{batch_labels.max()}")
        images.append(data)
        labels.append(batch_labels)
    array = np.concatenate(images).reshape(-1, 3, 32, 32)
    return _from_arrays(
        f"cifar10:{root}", torch.from_numpy(array), np.concatenate(labels), 10, 0.1, seed, crop_padding=0.125, flip=True
    )


def _image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root), loader=lambda p: p)
    except (FileNotFoundError, OSError) as exc:
        raise NasError(f"{root}: not an image folder ({exc}); expected {FOLDER_LAYOUT}") from None
    return folder.classes, folder.samples


def load_image_folder(path: str | Path, seed: int = 0) -> Dataset:
    """ImageFolder layout; images are normalised with ImageNet statistics (computing them would decode all)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NasError(f"{root}: no such folder; expected {FOLDER_LAYOUT}")
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    aug = {"crop_padding": 0.125, "flip": True}
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train = _image_folder(root / "train")
        val_classes, val = _image_folder(root / "val")
        if val_classes != classes:
            raise NasError(f"{root}: train/ has classes {classes} but val/ has {val_classes}; they must match")
        labels = np.asarray([label for _, label in train])
        order, _ = stratified_split(labels, 0.0, seed)  # keep every image, interleave the classes
        return Dataset(f"imagefolder:{root}", len(classes), FolderSplit([train[i] for i in order], mean, std), FolderSplit(val, mean, std), **aug)
    if (root / "train").is_dir() or (root / "val").is_dir():
        raise NasError(f"{root}: has only one of train/ and val/; expected {FOLDER_LAYOUT}")
    classes, samples = _image_folder(root)
    train_idx, val_idx = stratified_split(np.asarray([label for _, label in samples]), 0.2, seed)
    return Dataset(
        f"imagefolder:{root}",
        len(classes),
        FolderSplit([samples[i] for i in train_idx], mean, std),
        FolderSplit([samples[i] for i in val_idx], mean, std),
        **aug,
    )


def load_dataset(spec: str = "digits", seed: int = 0) -> Dataset:
    """``digits`` | ``cifar10:PATH`` | ``imagefolder:PATH`` -> Dataset; ``seed`` fixes the split."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return load_digits_dataset(seed)
    if kind == "cifar10" and path:
        return load_cifar10(path, seed)
    if kind == "imagefolder" and path:
        return load_image_folder(path, seed)
    raise NasError(f"unknown data spec {spec!r}; use 'digits', 'cifar10:PATH' or 'imagefolder:PATH'")
