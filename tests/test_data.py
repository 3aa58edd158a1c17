"""Tests for data.py and the local Fashion-MNIST TFDS builder, on tiny IDX files in tmp_path.

No network and no real data, except one test skipped when the Debian files are absent.
"""

import gzip
import os

import chex
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from gencnp_jax.io import data, fashion_mnist_local

REAL_DIR = fashion_mnist_local.DEFAULT_MANUAL_DIR
SIZES = {"train": 20, "t10k": 8}


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x800 + array.ndim
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _write_idx_set(folder, compress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes random images and labels `i % 10` for both splits; returns what was written."""
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in SIZES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = os.path.join(folder, f"{prefix}-{kind}-ubyte" + (".gz" if compress else ""))
            with (gzip.open if compress else open)(path, "wb") as f:
                f.write(_idx_bytes(array))
        written[prefix] = (images, labels)
    return written


@pytest.fixture(name="idx_dir")
def fixture_idx_dir(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    return str(folder), _write_idx_set(str(folder))


def test_local_builder_roundtrip(idx_dir, tmp_path):
    manual_dir, written = idx_dir
    data_dir = str(tmp_path / "tfds")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        result = data.load_split("fashion_mnist", split, data_dir, manual_dir=manual_dir)
        images, labels = written[prefix]
        chex.assert_shape(result.images, (SIZES[prefix], 28, 28, 1))
        assert result.images.dtype == np.uint8 and result.labels.dtype == np.int32
        np.testing.assert_array_equal(result.images[..., 0], images)  # IDX order is kept.
        np.testing.assert_array_equal(result.labels, labels)
        assert result.num_classes == 10 and result.name == split
        assert not result.images.flags.writeable
    assert data.load_split("fashion_mnist", "test", data_dir, manual_dir) is result  # Cached.
    builder = fashion_mnist_local.FashionMnistLocal(data_dir=data_dir)
    assert builder.is_prepared() and builder.info.file_format.value == "array_record"
    # Prepared data is reused without the manual dir.
    data._CACHE.clear()
    again = data.load_split("fashion_mnist", "train[:5]", data_dir, manual_dir="/nonexistent")
    chex.assert_shape(again.images, (5, 28, 28, 1))


def test_read_idx_uncompressed(tmp_path):
    written = _write_idx_set(str(tmp_path), compress=False)
    images, labels = fashion_mnist_local.read_split(str(tmp_path), "test")
    np.testing.assert_array_equal(images[..., 0], written["t10k"][0])
    np.testing.assert_array_equal(labels, written["t10k"][1])


def test_missing_manual_dir_and_file(idx_dir, tmp_path):
    with pytest.raises(data.DatasetError, match="apt-get install dataset-fashion-mnist"):
        data.load_split("fashion_mnist", "train", str(tmp_path / "a"), str(tmp_path / "none"))
    manual_dir, _ = idx_dir
    os.remove(os.path.join(manual_dir, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1.*manual_dir"):
        data.load_split("fashion_mnist", "train", str(tmp_path / "b"), manual_dir)


@pytest.mark.parametrize(
    "content, message",
    [(b"\x00\x00\x08\x01" + bytes(8), "magic"), (b"\x00\x00", "too short")],
)
def test_corrupt_idx(idx_dir, tmp_path, content, message):
    manual_dir, _ = idx_dir
    with gzip.open(os.path.join(manual_dir, "train-images-idx3-ubyte.gz"), "wb") as f:
        f.write(content)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(data.DatasetError, match=message):
        data.load_split("fashion_mnist", "train", data_dir, manual_dir)
    assert not fashion_mnist_local.FashionMnistLocal(data_dir=data_dir).is_prepared()


def test_truncated_idx(tmp_path):
    path = str(tmp_path / "x-images-idx3-ubyte")
    with open(path, "wb") as f:
        f.write(_idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5])
    with pytest.raises(fashion_mnist_local.IdxError, match="truncated"):
        fashion_mnist_local.read_idx(path, expected_ndim=3)


class TinyStockForTest(tfds.core.GeneratorBasedBuilder):
    """Stands in for a stock dataset prepared elsewhere (PNG images, array_record)."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": PIL.Image.fromarray(np.full((8, 8, 3), i, np.uint8)), "label": i % 3}


def test_stock_dataset(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(data.DatasetError, match="tfds build tiny_stock_for_test"):
        data.load_split("tiny_stock_for_test", "train", data_dir)
    TinyStockForTest(data_dir=data_dir).download_and_prepare(file_format="array_record")
    result = data.load_split("tiny_stock_for_test", "train", data_dir)
    chex.assert_shape(result.images, (6, 8, 8, 3))
    np.testing.assert_array_equal(result.images[:, 0, 0, 0], np.arange(6))
    np.testing.assert_array_equal(result.labels, np.arange(6) % 3)
    assert result.num_classes == 3
    assert data.dataset_info("tiny_stock_for_test", data_dir) == ((8, 8, 3), 3)
    with pytest.raises(data.DatasetError, match="unknown split"):
        data.load_split("tiny_stock_for_test", "validation", data_dir)
    with pytest.raises(data.DatasetError, match="empty"):
        data.load_split("tiny_stock_for_test", "train[:0]", data_dir)
    with pytest.raises(data.DatasetError, match="unknown TFDS dataset"):
        data.load_split("no_such_dataset_xyz", "train", data_dir)


def test_dataset_info_known():
    assert data.dataset_info("fashion_mnist") == ((28, 28, 1), 10)
    assert data.dataset_info("cifar10") == ((32, 32, 3), 10)


def test_normalize():
    images = np.stack([np.zeros((2, 2, 1)), np.full((2, 2, 1), 255)]).astype(np.uint8)
    out = data.normalize(images, "fashion_mnist")
    assert out.dtype == np.float32
    mean, std = data.DATASET_STATS["fashion_mnist"]
    np.testing.assert_allclose(out[0], -mean[0] / std[0], rtol=1e-6)
    np.testing.assert_allclose(data.normalize(images, "other")[1], 1.0)
    chex.assert_shape(data.normalize(np.zeros((1, 4, 4, 3), np.uint8), "cifar10"), (1, 4, 4, 3))


def test_batch_indices():
    n, bs, steps = 23, 5, 4  # 4 steps per epoch, 3 examples dropped.
    epoch0 = np.concatenate([data.batch_indices(n, bs, seed=1, step=s) for s in range(steps)])
    assert epoch0.dtype == np.int64 and len(np.unique(epoch0)) == n - 3
    assert epoch0.min() >= 0 and epoch0.max() < n
    np.testing.assert_array_equal(data.batch_indices(n, bs, 1, 2), epoch0[10:15])
    epoch1 = np.concatenate([data.batch_indices(n, bs, 1, s) for s in range(steps, 2 * steps)])
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(data.batch_indices(n, bs, 2, 0), epoch0[:5])
    with pytest.raises(ValueError, match="exceeds"):
        data.batch_indices(3, 5, 0, 0)


def test_eval_batches():
    batches = list(data.eval_batches(11, 4))
    assert [v for _, v in batches] == [4, 4, 3]
    assert all(idx.shape == (4,) for idx, _ in batches)
    np.testing.assert_array_equal(np.concatenate([i[:v] for i, v in batches]), np.arange(11))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((28, 28, 1), np.float32), "NHWC"),
        (np.zeros((2, 28, 28, 3), np.float32), "28x28x1"),
        (np.zeros((2, 28, 28, 1), np.uint8), "data.normalize"),
        (np.full((2, 28, 28, 1), np.nan, np.float32), "NaN"),
    ],
)
def test_validate_images_errors(images, message):
    with pytest.raises(ValueError, match=message):
        data.validate_images(images, (28, 28, 1))


def test_validate_labels():
    data.validate_images(np.zeros((2, 28, 28, 1), np.float32), (28, 28, 1))
    data.validate_labels(np.array([0, 9]), 10)
    for bad in (np.array([0, 10]), np.array([-1]), np.array([0.5]), np.zeros((2, 2), int)):
        with pytest.raises(ValueError):
            data.validate_labels(bad, 10)


@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    test = data.load_split("fashion_mnist", "test", str(tmp_path / "tfds"))
    chex.assert_shape(test.images, (10000, 28, 28, 1))
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
