"""TFDS builder for Fashion-MNIST read from local IDX files (no download, no TensorFlow).

Reads the four IDX files (gzip'd or not) from a manual dir and writes array_record shards.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

DEFAULT_MANUAL_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, dtype code 0x08 (uint8), number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


class IdxError(ValueError):
    """A file is missing, truncated or not an IDX file of the expected kind."""


def idx_paths(manual_dir: str, split: str) -> tuple[str, str]:
    """Finds the images and labels IDX files of one split.

    Args:
      manual_dir: folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
      split: "train" or "test".

    Returns:
      `(images_path, labels_path)`.

    Raises:
      FileNotFoundError: when a file is absent (both plain and `.gz` names are tried).
    """
    prefix = SPLIT_PREFIXES[split]
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        base = os.path.join(manual_dir, f"{prefix}-{kind}-ubyte")
        found = [p for p in (base + ".gz", base) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"missing IDX file {base}[.gz]")
        paths.append(found[0])
    return paths[0], paths[1]


def read_idx(path: str, expected_ndim: int) -> np.ndarray:
    """Parses one uint8 IDX file (gzip'd when the name ends in `.gz`) into numpy.

    Args:
      path: the file.
      expected_ndim: 3 for an images file (N, H, W), 1 for a labels file (N,).

    Returns:
      A uint8 array of the shape the header declares.

    Raises:
      IdxError: bad magic number, wrong rank, or a size that does not match the header.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
        raise IdxError(f"cannot read IDX file {path}: {e}") from e
    expected_magic = _IMAGES_MAGIC if expected_ndim == 3 else _LABELS_MAGIC
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and magic != expected_magic:
        raise IdxError(
            f"{path}: bad IDX magic number {magic:#010x}, expected {expected_magic:#010x} "
            f"(uint8 data, {expected_ndim} dims); is the file corrupt or of the wrong kind?"
        )
    header_end = 4 + 4 * expected_ndim
    if len(raw) < header_end:
        raise IdxError(f"{path}: too short ({len(raw)} bytes) for an IDX header")
    shape = tuple(int.from_bytes(raw[i : i + 4], "big") for i in range(4, header_end, 4))
    size = int(np.prod(shape))
    if len(raw) - header_end != size:
        raise IdxError(
            f"{path}: header declares shape {shape} ({size} bytes) but the file holds "
            f"{len(raw) - header_end} bytes of data; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def read_split(manual_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split as `(images_NxHxWx1 uint8, labels_N uint8)` and checks they agree.

    Args:
      manual_dir: folder holding the IDX files.
      split: "train" or "test".

    Returns:
      Images with a trailing channel axis, and labels.

    Raises:
      FileNotFoundError: a file is absent.
      IdxError: a file is corrupt, or images and labels disagree in count or range.
    """
    images_path, labels_path = idx_paths(manual_dir, split)
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IdxError(
            f"{split}: {images.shape[0]} images in {images_path} but "
            f"{labels.shape[0]} labels in {labels_path}"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise IdxError(f"{labels_path}: label {labels.max()} outside 0..{len(CLASS_NAMES) - 1}")
    return images[..., None], labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files; images stored raw (uint8 tensors, not PNG)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local IDX files, raw uint8 image tensors."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Install the IDX files with `sudo apt-get install dataset-fashion-mnist` (they land in "
        f"{DEFAULT_MANUAL_DIR}), or pass a folder holding "
        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] as the manual dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs would read README.md etc. from
        # this package's folder as dataset metadata.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al., 2017) read from local IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep IDX order so record i is image i of the file (no hash shuffle).
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(manual_dir, split) for split in SPLIT_PREFIXES}

    def _generate_examples(self, manual_dir: str, split: str) -> Iterator[tuple[int, dict]]:
        images, labels = read_split(manual_dir, split)
        for i in range(images.shape[0]):
            yield i, {"image": images[i], "label": int(labels[i])}

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ...
    # downloaded and prepared ..." through these two hooks; `prepare` prints one line instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_tfds():
    """Hides TFDS's progress bars and absl warnings (such as "Variant folder ... has no
    dataset_info.json" before the first prepare) for the duration, then restores both."""
    absl_logger = logging.getLogger("absl")
    bars, level = getattr(tqdm_utils, "_active", True), absl_logger.level  # No public getter.
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tfds.display_progress_bar(bars)
        absl_logger.setLevel(level)


def prepare(data_dir: str, manual_dir: str | None = None) -> FashionMnistLocal:
    """Returns the builder, preparing it as array_record on first use (a no-op afterwards).

    TFDS writes into an `incomplete.*` folder and renames it at the end, so an interrupted
    run leaves no half-prepared version dir and the next call simply prepares again.
    Preparing prints one line of ours in place of TFDS's banner and progress bars.

    Args:
      data_dir: the TFDS data dir.
      manual_dir: folder with the IDX files; defaults to `DEFAULT_MANUAL_DIR`.

    Raises:
      FileNotFoundError: the manual dir or one of its four files is absent.
      IdxError: a file is corrupt.
    """
    builder = FashionMnistLocal(data_dir=data_dir)
    with _quiet_tfds():
        if builder.is_prepared():
            return builder
    manual_dir = os.path.abspath(manual_dir or DEFAULT_MANUAL_DIR)
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"Fashion-MNIST manual dir {manual_dir} does not exist")
    for split in SPLIT_PREFIXES:  # Fail before TFDS starts writing anything.
        idx_paths(manual_dir, split)
    print(
        f"gencnp_jax: preparing Fashion-MNIST from {manual_dir} into {data_dir} (once)", flush=True
    )
    with _quiet_tfds():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format="array_record",
        )
    return builder
