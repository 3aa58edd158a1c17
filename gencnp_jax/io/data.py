"""Datasets as in-memory numpy arrays: local TFDS files only, or a user's own (custom_data).

Also the host-side batching (deterministic per step), normalization and input validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from gencnp_jax.io import custom_data, fashion_mnist_local

# Per-channel (mean, std) of pixel/255 over the train split; cifar10 std is the true one.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_FALLBACK_STATS = ((0.5,), (0.5,))
_KNOWN_INFO = {
    "fashion_mnist": ((28, 28, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
}
_APT_HINT = (
    "install the IDX files with `sudo apt-get install dataset-fashion-mnist`, or set "
    "--config.data.manual_dir=/path/with/idx/files"
)
_READ_CHUNK = 8192  # records per __getitems__ call: bounds the list of decoded dicts.
_STATS_ROWS = 1 << 20  # pixels per int64 block in channel_stats: bounds its memory

DatasetError = custom_data.DatasetError  # Its home is there: this module imports custom_data.


@dataclasses.dataclass
class ArraySplit:
    """One split in memory: `images` uint8 NxHxWxC, `labels` int32 N (both read-only)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str


_CACHE: dict[tuple[str, str, str, str | None], ArraySplit] = {}


def _registered_builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:  # Builds from the registered code only: no network, even when not prepared.
        return tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetError(f"unknown TFDS dataset {dataset!r}") from e


def _builder(dataset: str, data_dir: str, manual_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared builder; prepares our local Fashion-MNIST on first use, never downloads."""
    if dataset == "fashion_mnist":
        try:
            return fashion_mnist_local.prepare(data_dir, manual_dir)
        except (FileNotFoundError, fashion_mnist_local.IdxError) as e:
            raise DatasetError(f"{e}: {_APT_HINT}") from e
    builder = _registered_builder(dataset, data_dir)
    how = (
        f"run `tfds build {dataset} --data_dir={data_dir} --file_format=array_record` on a "
        f"machine with network, or copy a prepared TFDS dir to {builder.data_path}"
    )
    if not builder.is_prepared():
        raise DatasetError(f"dataset {dataset!r} is not prepared in {data_dir}: {how}")
    if builder.info.file_format.value not in ("array_record", "parquet"):
        raise DatasetError(
            f"dataset {dataset!r} in {builder.data_path} is stored as "
            f"{builder.info.file_format.value}, which has no random access: {how}"
        )
    return builder


def _image_label_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    return (keys[0], keys[1]) if keys and len(keys) == 2 else ("image", "label")


def load_split(
    dataset: str, split: str, data_dir: str, manual_dir: str | None = None
) -> ArraySplit:
    """Reads a whole split into memory (cached per process), never touching the network.

    Args:
      dataset: "fashion_mnist" (our local builder, prepared into `data_dir` on first use from
        the IDX files in `manual_dir`), a stock TFDS name already prepared in `data_dir`, or
        a user's own `npz:PATH` or `folder:PATH` (see `custom_data`; no TFDS involved).
      split: a TFDS split string such as "train", "test" or "train[:1000]" (custom datasets:
        "train" or "test", sliced by counts only).
      data_dir: the TFDS data dir (unused by custom datasets).
      manual_dir: folder with the Fashion-MNIST IDX files (default: the Debian package's).

    Returns:
      An `ArraySplit` with read-only arrays.

    Raises:
      DatasetError: missing files, dataset not prepared, unknown split, or empty split.
    """
    if custom_data.is_custom(dataset):  # Keyed by its absolute path; no TFDS dir involved.
        key = (custom_data.canonical(dataset), split, "", None)
        if key not in _CACHE:
            images, labels = custom_data.read_split(dataset, split)
            images.flags.writeable = labels.flags.writeable = False  # Shared through the cache.
            _CACHE[key] = ArraySplit(images, labels, dataset_info(dataset)[1], name=split)
        return _CACHE[key]
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    cache_key = (dataset, split, data_dir, manual_dir)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    builder = _builder(dataset, data_dir, manual_dir)
    known = sorted(builder.info.splits)
    if re.split(r"[\[+]", split, maxsplit=1)[0].strip() not in known:
        raise DatasetError(f"unknown split {split!r} for {dataset!r}; known: {known}")
    try:
        if dataset == "fashion_mnist":
            source = builder.as_data_source(split=split)
        else:
            source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
        num_examples = len(source)
    except ValueError as e:  # TFDS raises this for a split that selects no shard.
        raise DatasetError(f"split {split!r} of {dataset!r} is empty or invalid: {e}") from e
    if num_examples == 0:
        raise DatasetError(f"split {split!r} of {dataset!r} in {data_dir} is empty")
    image_key, label_key = _image_label_keys(builder)
    first = source[0][image_key]
    images = np.empty((num_examples, *first.shape), dtype=first.dtype)
    labels = np.empty((num_examples,), dtype=np.int32)
    for start in range(0, num_examples, _READ_CHUNK):
        records = source.__getitems__(range(start, min(start + _READ_CHUNK, num_examples)))
        images[start : start + len(records)] = [r[image_key] for r in records]
        labels[start : start + len(records)] = [r[label_key] for r in records]
    if images.ndim == 3:  # Grayscale stored as HxW: add the channel axis.
        images = images[..., None]
    images.flags.writeable = labels.flags.writeable = False  # Shared through the cache.
    num_classes = builder.info.features[label_key].num_classes
    _CACHE[cache_key] = ArraySplit(images, labels, num_classes, name=split)
    return _CACHE[cache_key]


def dataset_info(dataset: str, data_dir: str | None = None) -> tuple[tuple[int, int, int], int]:
    """Image shape and class count of a dataset, without reading any records.

    fashion_mnist, mnist and cifar10 are known; `npz:`/`folder:` datasets are read from their
    labels and image headers; other names come from the TFDS builder info (in `data_dir`).

    Returns:
      `((height, width, channels), num_classes)`.

    Raises:
      DatasetError: unknown dataset, or one whose images have no fixed shape.
    """
    if dataset in _KNOWN_INFO:
        return _KNOWN_INFO[dataset]
    if custom_data.is_custom(dataset):
        return custom_data.dataset_info(dataset)
    builder = _registered_builder(dataset, data_dir)
    image_key, label_key = _image_label_keys(builder)
    shape = tuple(builder.info.features[image_key].shape)
    if len(shape) != 3 or None in shape:
        raise DatasetError(f"{dataset!r} images have shape {shape}, not a fixed HxWxC")
    return shape, builder.info.features[label_key].num_classes


NORMALIZATIONS = ("dataset", "none")  # or explicit statistics, "MEAN,...:STD,..."
_NORMALIZATION_HOW = (
    "write 'dataset' (the dataset's channel statistics), 'none' (x/255 in [0, 1]) or "
    "'MEAN,...:STD,...' (of x/255: one value, or one per channel; STD > 0)"
)


def parse_normalization(
    normalization: str, channels: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` that `normalization` names, None for ``"dataset"`` (the dataset's).

    Args:
      normalization: ``"dataset"``, ``"none"`` (mean 0, std 1: x/255 in [0, 1]) or
        ``"MEAN,...:STD,..."``, statistics of x/255, one value or one per channel.
      channels: the images' channels, checked against explicit statistics when given.

    Raises:
      ValueError: one line saying what to write instead.
    """
    if normalization == "dataset":
        return None
    if normalization == "none":
        return (0.0,), (1.0,)
    where = f"normalization={normalization!r}"
    mean_text, sep, std_text = str(normalization).partition(":")
    try:
        mean, std = (tuple(float(v) for v in t.split(",")) for t in (mean_text, std_text))
    except ValueError:
        mean = std = ()
    if not sep or not mean or len(mean) != len(std) or not all(map(math.isfinite, mean + std)):
        raise ValueError(f"{where}: {_NORMALIZATION_HOW}")
    if min(std) <= 0:
        raise ValueError(f"{where}: every STD must be > 0; {_NORMALIZATION_HOW}")
    if channels is not None and len(mean) not in (1, channels):
        raise ValueError(
            f"{where} gives {len(mean)} values for images of {channels} channels: give one "
            f"value or {channels}"
        )
    return mean, std


def dataset_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's per-channel ``(mean, std)`` of x/255: known ones from `DATASET_STATS`;
    a `npz:`/`folder:` dataset's computed once on its training split (`channel_stats`);
    other names mean = std = 0.5."""
    if custom_data.is_custom(dataset):  # Keyed by its absolute path, as in the split cache.
        dataset = custom_data.canonical(dataset)
        if dataset not in DATASET_STATS:
            DATASET_STATS[dataset] = channel_stats(load_split(dataset, "train", "").images)
    return DATASET_STATS.get(dataset, _FALLBACK_STATS)


def normalization_stats(
    dataset: str, normalization: str = "dataset"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` of x/255 that `normalize` applies (`parse_normalization`)."""
    return parse_normalization(normalization) or dataset_stats(dataset)


def normalize(images: np.ndarray, dataset: str, normalization: str = "dataset") -> np.ndarray:
    """Maps uint8 images to float32 ``(x / 255 - mean) / std``.

    Args:
      images: uint8 ``N x H x W x C``, numpy or jax.
      dataset: the dataset's name (its statistics, for ``"dataset"``).
      normalization: ``"dataset"``: the dataset's channel statistics (`dataset_stats`);
        ``"none"``: x/255 in [0, 1]; ``"MEAN,...:STD,..."``: those (`parse_normalization`).

    Returns:
      float32 images of the shape of `images`.
    """
    mean, std = (np.asarray(v, np.float32) for v in normalization_stats(dataset, normalization))
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (ddof=0) of `images / 255` (uint8 NxHxWxC), exact: sums of x
    and x^2 as Python ints over bounded int64 blocks, so only the last division rounds in
    `var = (n sum(x^2) - sum(x)^2) / (255 n)^2`. A constant channel gets std 1, never 0."""
    flat_PxC = images.reshape(-1, images.shape[-1])
    n, sums, squares = len(flat_PxC), 0, 0
    for start in range(0, n, _STATS_ROWS):
        block = flat_PxC[start : start + _STATS_ROWS].astype(np.int64)
        sums = sums + block.sum(axis=0).astype(object)  # object: Python ints, no overflow
        squares = squares + (block * block).sum(axis=0).astype(object)
    var = (n * squares - sums * sums) / (255 * n) ** 2
    return tuple(float(s / (255 * n)) for s in sums), tuple(math.sqrt(v) or 1.0 for v in var)


def class_names(dataset: str, num_classes: int, data_dir: str | None = None) -> list[str]:
    """Readable class names: Fashion-MNIST's, a custom dataset's (`DatasetError` if its files
    are bad), or a stock TFDS dataset's label names from its builder info in `data_dir` (never
    the network; failures fall back); "0".."K-1" where there are none, or not `num_classes`."""
    if dataset == "fashion_mnist":
        names = list(fashion_mnist_local.CLASS_NAMES)
    elif custom_data.is_custom(dataset):
        names = custom_data.class_names(dataset)
    else:
        names = []
        with contextlib.suppress(Exception):  # Names are cosmetic: any failure gives numbers.
            builder = tfds.builder(dataset, data_dir=data_dir)
            names = list(builder.info.features[_image_label_keys(builder)[1]].names)
    return names if len(names) == num_classes else [str(k) for k in range(num_classes)]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)
    perm.flags.writeable = False
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training batch at global `step`, a function of `(seed, step)` alone.

    Each epoch is a fresh permutation from `np.random.default_rng([seed, epoch])` with the
    remainder dropped, so a resumed run sees exactly the batches it would have seen.

    Returns:
      int64[batch_size] indices into the split.

    Raises:
      ValueError: when the split holds fewer than `batch_size` examples.
    """
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds num_examples {num_examples}")
    epoch, i = divmod(step, steps_per_epoch)
    return _epoch_permutation(num_examples, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def eval_batches(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Sequential batches covering every example once, each of exactly `batch_size`.

    The last batch repeats its final index as padding so a jitted eval step compiles once.

    Yields:
      `(indices int64[batch_size], num_valid)`: only the first `num_valid` rows are real.
    """
    for start in range(0, num_examples, batch_size):
        indices = np.arange(start, min(start + batch_size, num_examples), dtype=np.int64)
        num_valid = len(indices)
        yield np.pad(indices, (0, batch_size - num_valid), mode="edge"), num_valid


def as_batch(images, hwc: tuple[int, int, int]):
    """`images` as an ``N x H x W x C`` batch for a classifier of input `hwc`: a batch
    ``N x H x W x C`` as it is; for one channel also ``N x H x W``; one image ``H x W x C`` (or
    ``H x W`` for one channel) as a batch of one. Any dtype; numpy or jax.

    Raises:
      ValueError: any other shape; the message lists the accepted ones.
    """
    shape, (h, w, c) = tuple(np.shape(images)), tuple(hwc)
    if len(shape) == 4:
        return images  # `validate_images` checks its size
    if shape == (h, w, c):
        return images[None]
    if c == 1 and len(shape) == 3 and shape[1:] == (h, w):
        return images[..., None]
    if c == 1 and shape == (h, w):
        return images[None, ..., None]
    gray = f"N x {h} x {w} (one channel), " if c == 1 else ""
    one = f"{h} x {w} x {c}" + (f" or {h} x {w}" if c == 1 else "")
    raise ValueError(
        f"images of shape {shape}: give a batch N x {h} x {w} x {c}, {gray}or one image {one}"
    )


def validate_images(images: np.ndarray, expected_hwc: tuple[int, int, int]) -> None:
    """Checks a batch is float NHWC of the expected size with finite values.

    Args:
      images: the batch, as fed to the classifier.
      expected_hwc: `(height, width, channels)` the classifier was built for.

    Raises:
      ValueError: wrong rank, wrong H/W/C, non-float dtype, or NaN/inf values.
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be NHWC (rank 4), got shape {shape}")
    if shape[1:] != tuple(expected_hwc):
        raise ValueError(f"images must be Nx{'x'.join(map(str, expected_hwc))}, got {shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be float, got {images.dtype}: convert with data.normalize")
    if not np.isfinite(np.asarray(images)).all():
        raise ValueError("images contain NaN or inf values")


def validate_labels(labels: np.ndarray, num_classes: int) -> None:
    """Checks labels are a rank-1 integer array with values in `[0, num_classes)`.

    Raises:
      ValueError: wrong rank, non-integer dtype, or a value out of range.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be rank 1, got shape {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
