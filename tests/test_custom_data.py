"""Tests for a user's own datasets (`npz:` and `folder:`, custom_data.py) as data.py serves them.

Tiny synthetic npz files and PNG folders in tmp_path; every bad input must raise a one-line
`DatasetError` that names the problem, and write nothing.
"""

import os

import chex
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from gencnp_jax.io import custom_data, data, fashion_mnist_local
from gencnp_jax.stages import report

HW = (6, 5)


def _npz(path, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)


def _npz_set(folder, channels=(), names=None, seed=0):
    """Writes train.npz (12 rows) and test.npz (5 rows); labels 0..2 in train, 0..3 in test."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n, k in (("train", 12, 3), ("test", 5, 4)):
        images = rng.integers(0, 256, (n, *HW, *channels), dtype=np.uint8)
        labels = np.arange(n) % k
        extra = {} if names is None else {"class_names": np.array(names)}
        _npz(os.path.join(folder, f"{split}.npz"), images=images, labels=labels, **extra)
        written[split] = (images, labels)
    return written


def _png(path, pixels, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(pixels).save(path, format=fmt)


def _folder_set(root, classes=("dog", "cat"), per_class=(3, 2)):
    """Grayscale PNGs whose every pixel is a value unique to the file; returns path -> value."""
    values = {}
    for split, n in zip(custom_data.SPLITS, per_class, strict=True):
        for c, name in enumerate(classes):
            for i in range(n + c):  # Classes of unequal size.
                path = os.path.join(root, split, name, f"img{i}.png")
                values[path] = len(values) + 1
                _png(path, np.full(HW, values[path], np.uint8))
    return values


def _tree(folder):
    """Every path under `folder` with its size and mtime: what a failed call must not change."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_npz_folder_roundtrip(tmp_path, monkeypatch):
    written = _npz_set(str(tmp_path / "set"), names=["a", "b", "c", "d"])
    dataset = f"npz:{tmp_path}/set"
    assert data.dataset_info(dataset) == ((*HW, 1), 4)
    for split in custom_data.SPLITS:
        result = data.load_split(dataset, split, "unused")
        chex.assert_shape(result.images, (len(written[split][1]), *HW, 1))
        assert result.images.dtype == np.uint8 and result.labels.dtype == np.int32
        np.testing.assert_array_equal(result.images[..., 0], written[split][0])
        np.testing.assert_array_equal(result.labels, written[split][1])
        assert result.num_classes == 4 and result.name == split
        assert not result.images.flags.writeable and not result.labels.flags.writeable
    assert data.class_names(dataset, 4) == ["a", "b", "c", "d"]
    monkeypatch.chdir(tmp_path)  # A relative name is the same dataset (and cache entry).
    assert data.load_split("npz:set/", "test", "elsewhere") is data.load_split(dataset, "test", "")


def test_npz_split_pattern_rgb_and_slices(tmp_path):
    rng = np.random.default_rng(1)
    images = {s: rng.integers(0, 256, (n, *HW, 3)) for s, n in (("train", 7), ("test", 3))}
    labels = {"train": np.array([0, 1, 2, 0, 1, 2, 0]), "test": np.array([4, 0, 1])}
    for split in custom_data.SPLITS:  # int64 pixels in 0..255 are taken as they are.
        _npz(str(tmp_path / f"d_{split}.npz"), images=images[split], labels=labels[split])
    dataset = f"npz:{tmp_path}/d_{{split}}.npz"
    assert data.dataset_info(dataset) == ((*HW, 3), 5)  # Largest label of both splits + 1.
    assert data.class_names(dataset, 5) == ["0", "1", "2", "3", "4"]
    part = data.load_split(dataset, "train[2:5]", "")
    np.testing.assert_array_equal(part.images, images["train"][2:5].astype(np.uint8))
    np.testing.assert_array_equal(part.labels, labels["train"][2:5])
    np.testing.assert_array_equal(data.load_split(dataset, "test[-1:]", "").labels, [1])


def test_image_folder_roundtrip(tmp_path):
    values = _folder_set(str(tmp_path))
    dataset = f"folder:{tmp_path}"
    assert data.dataset_info(dataset) == ((*HW, 1), 2)
    names = data.class_names(dataset, 2)
    assert names == ["cat", "dog"]  # Sorted folder names.
    train = data.load_split(dataset, "train", "")
    # Round robin over the classes (cat 0, dog 1): cat has 4 images, dog 3.
    np.testing.assert_array_equal(train.labels, [0, 1, 0, 1, 0, 1, 0])
    order = [f"{tmp_path}/train/{names[k]}/img{i // 2}.png" for i, k in enumerate(train.labels)]
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], [values[p] for p in order])
    assert (train.images == train.images[:, :1, :1]).all()  # Whole images, not just a pixel.
    assert len(data.load_split(dataset, "test", "").labels) == 5


def test_folder_modes(tmp_path):
    gray = np.arange(30, dtype=np.uint8).reshape(HW)
    _png(str(tmp_path / "g/train/a/x.gif"), gray, "GIF")  # A palette of greys: one channel.
    _png(str(tmp_path / "g/test/a/y.png"), gray)
    assert data.dataset_info(f"folder:{tmp_path}/g")[0] == (*HW, 1)
    from_gif = data.load_split(f"folder:{tmp_path}/g", "train", "").images
    np.testing.assert_array_equal(from_gif, gray[None, :, :, None])
    rgb = np.stack([gray, gray + 1, gray + 2], axis=-1)
    _png(str(tmp_path / "c/train/a/x.png"), rgb)
    _png(str(tmp_path / "c/test/a/y.png"), gray)  # One colour image makes the set RGB.
    _png(str(tmp_path / "c/test/a/z.png"), np.dstack([rgb, np.full(HW, 9, np.uint8)]))  # RGBA
    assert data.dataset_info(f"folder:{tmp_path}/c")[0] == (*HW, 3)
    test = data.load_split(f"folder:{tmp_path}/c", "test", "").images
    np.testing.assert_array_equal(test[0], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(test[1], rgb)  # Alpha dropped.


def test_normalize_uses_train_stats(tmp_path):
    written = _npz_set(str(tmp_path), channels=(3,))
    dataset = f"npz:{tmp_path}"
    train_01 = written["train"][0].astype(np.float64) / 255
    mean, std = train_01.mean(axis=(0, 1, 2)), train_01.std(axis=(0, 1, 2))
    test = written["test"][0]
    expected = (test / 255 - mean) / std
    np.testing.assert_allclose(data.normalize(test, dataset), expected, rtol=1e-5, atol=1e-6)
    assert data.normalize(test, dataset).dtype == np.float32
    stats = data.DATASET_STATS[custom_data.canonical(dataset)]  # Added on first use.
    np.testing.assert_allclose(stats, (mean, std), rtol=1e-13)


def test_channel_stats_exact_when_streamed(monkeypatch):
    monkeypatch.setattr(data, "_STATS_ROWS", 7)  # Many blocks, one ragged.
    images = np.random.default_rng(2).integers(0, 256, (9, 4, 3, 2), dtype=np.uint8)
    images[..., 1] = 77  # A constant channel: std 1, not 0.
    mean, std = data.channel_stats(images)
    as_01 = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, as_01.mean(axis=(0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(std[0], as_01[..., 0].std(), rtol=1e-13)
    assert std[1] == 1.0


class NamedStockForTest(tfds.core.GeneratorBasedBuilder):
    """A stock-like TFDS builder whose labels have names; never prepared."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.ClassLabel(names=["left", "right"]),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {}

    def _generate_examples(self):
        yield from ()


def test_class_names(tmp_path):
    assert data.class_names("fashion_mnist", 10) == list(fashion_mnist_local.CLASS_NAMES)
    assert data.class_names("named_stock_for_test", 2, str(tmp_path)) == ["left", "right"]
    assert data.class_names("named_stock_for_test", 3, str(tmp_path)) == ["0", "1", "2"]
    assert data.class_names("no_such_dataset_xyz", 2) == ["0", "1"]
    _folder_set(str(tmp_path / "f"))
    assert data.class_names(f"folder:{tmp_path}/f", 2) == ["cat", "dog"]
    assert report.class_names(f"folder:{tmp_path}/f", 2) == ["cat", "dog"]


def test_read_images(tmp_path):
    written = _npz_set(str(tmp_path / "n"), channels=(1,))
    for spec in (f"npz:{tmp_path}/n/test.npz", str(tmp_path / "n" / "test.npz")):
        images, names = custom_data.read_images(spec)
        np.testing.assert_array_equal(images, written["test"][0])
        assert names == ["#0", "#1", "#2", "#3", "#4"]
    rgb = np.random.default_rng(3).integers(0, 256, (*HW, 3), dtype=np.uint8)
    _png(str(tmp_path / "imgs" / "b.png"), rgb)
    _png(str(tmp_path / "imgs" / "a.bmp"), rgb[..., 0])
    _png(str(tmp_path / "imgs" / "sub" / "ignored.png"), rgb)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    for spec in (f"folder:{tmp_path}/imgs", str(tmp_path / "imgs")):
        images, names = custom_data.read_images(spec)
        assert names == ["a", "b"] and images.dtype == np.uint8
        np.testing.assert_array_equal(images[0], np.repeat(rgb[..., :1], 3, axis=-1))
        np.testing.assert_array_equal(images[1], rgb)


def _set(t, names=("a", "b", "c", "d"), **arrays) -> str:
    """A valid npz set in t/d, with train.npz rewritten from `arrays` when given."""
    _npz_set(str(t / "d"), names=names)
    if arrays:
        _npz(str(t / "d" / "train.npz"), **arrays)
    return f"npz:{t}/d"


def _then(spec: str, *edits) -> str:
    """`spec` after `edits` (callables run for their effect on the files)."""
    for edit in edits:
        edit()
    return spec


def _folders(t) -> str:
    _folder_set(str(t / "f"))
    return f"folder:{t}/f"


I8, I5, L4 = np.zeros((4, *HW), np.uint8), np.zeros((5, 5), np.uint8), np.arange(4) % 2
NAMES2 = np.array(["a", "b"])
# fmt: off
BAD_INPUTS = [  # (id, setup(tmp_path) -> spec, what to call, key words of the message)
    ("npz no path", lambda t: f"npz:{t}/nope", "info", r"npz:.*nope does not exist: name a"),
    ("npz one file", lambda t: _set(t) + "/train.npz", "info", r"is a single file.*\{split\}"),
    ("npz no split file", lambda t: _then(_set(t), lambda: os.remove(t / "d/test.npz")), "info",
     r"missing .*test\.npz \(the test split of npz:.*np\.savez"),
    ("npz not a zip", lambda t: _then(_set(t), lambda: (t / "d/test.npz").write_text("x")),
     "info", r"test\.npz is not a readable \.npz file"),
    ("no labels", lambda t: _set(t, images=I8, y=L4), "info", r"no 'labels' .*\['images', 'y'\]"),
    ("no images", lambda t: _set(t, x=I8, labels=L4), "info", r"no 'images' .*\['labels', 'x'\]"),
    ("count mismatch", lambda t: _set(t, images=I8, labels=L4[:3]), "info",
     r"train\.npz: 4 images but labels of shape \(3,\): give one label each"),
    ("negative", lambda t: _set(t, images=I8, labels=L4 - 1), "info", r"labels include -1"),
    ("float labels", lambda t: _set(t, images=I8, labels=L4 / 1), "info", r"float64, not integ"),
    ("float images", lambda t: _set(t, images=I8 / 1, labels=L4), "info", r"float64.*np\.round"),
    ("rank", lambda t: _set(t, images=I8[:, 0], labels=L4), "info", r"shape \(4, 5\), not NxHxW"),
    ("empty", lambda t: _set(t, images=I8[:0], labels=L4[:0]), "info", r"holds no images"),
    ("range", lambda t: _set(t, images=I8 + np.int16(300), labels=L4), "train",
     r"values 300\.\.300: rescale them to 0\.\.255"),
    ("sizes", lambda t: _set(t, images=I8[:, 1:], labels=L4), "info",
     r"train images are \(5, 5, 1\) \(HxWxC\), test \(6, 5, 1\)"),
    ("names differ", lambda t: _set(t, images=I8, labels=L4, class_names=NAMES2), "info",
     r"differ in class_names"),
    ("too few names", lambda t: _set(t, names=None, images=I8, labels=L4, class_names=NAMES2),
     "info", r"label 3 but only 2 class_names"),
    ("object names", lambda t: _set(t, images=I8, labels=L4, class_names=NAMES2.astype(object)),
     "info", r"class_names must be 1-D: save np\.array\(names, dtype=str\)"),
    ("split name", _set, "validation", r"split 'validation' .*use 'train', 'test'"),
    ("split percent", _set, "train[:10%]", r"use 'train', 'test'"),
    ("empty slice", _set, "train[5:5]", r"selects no examples"),
    ("folder no path", lambda t: f"folder:{t}/nope", "info", r"no such folder: name a folder"),
    ("folder no test/", lambda t: _then(_folders(t), lambda: os.rename(t / "f/test", t / "val")),
     "info", r"missing .*f/test \(the test split"),
    ("classes differ", lambda t: _then(_folders(t), lambda: os.rename(t / "f/test/cat", t / "c")),
     "info", r"only in train/: \['cat'\], only in test/: \[\]"),
    ("empty class", lambda t: _then(_folders(t), lambda: os.makedirs(t / "f/test/ant"),
                                    lambda: _png(str(t / "f/train/ant/a.png"), I8[0])),
     "info", r"empty class folder .*test/ant: add images or delete it in both splits"),
    ("mixed sizes", lambda t: _then(_folders(t), lambda: _png(str(t / "f/test/cat/z.png"), I5)),
     "info", r"z\.png is 5x5 \(HxW\) but .*img0\.png is 6x5: resize all images to one size"),
    ("unreadable", lambda t: _then(_folders(t), lambda: (t / "f/test/dog/x.png").write_bytes(b"!")),
     "info", r"cannot read image .*x\.png .*replace or remove it"),
    ("read no path", lambda t: str(t / "nope"), "read", r"nope does not exist"),
    ("read no images", lambda t: _then(str(t), lambda: (t / "a.txt").write_text("")), "read",
     r"no images \(\.png.*\) directly in"),
    ("read a text file", lambda t: _then(str(t / "a.txt"), lambda: (t / "a.txt").write_text("")),
     "read", r"a\.txt is not a folder or an \.npz file"),
    ("read mixed sizes", lambda t: _then(str(t), lambda: _png(str(t / "a.png"), I8[0]),
                                         lambda: _png(str(t / "b.png"), I5)),
     "read", r"b\.png is 5x5 \(HxW\) but .*a\.png is 6x5"),
    ("read npz no images", lambda t: _set(t, x=I8, labels=L4)[4:] + "/train.npz", "read",
     r"no 'images' array"),
]
# fmt: on


@pytest.mark.parametrize("name, setup, call, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(tmp_path, name, setup, call, message):
    spec = setup(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(data.DatasetError, match=message) as err:
        if call == "info":
            data.dataset_info(spec)
        elif call == "read":
            custom_data.read_images(spec)
        else:
            data.load_split(spec, call, "")
    assert "\n" not in str(err.value)
    if call == "info" and spec.startswith(custom_data.PREFIXES):  # Loading says the same.
        with pytest.raises(data.DatasetError, match=message):
            data.load_split(spec, "train", str(tmp_path / "tfds"))
    assert _tree(tmp_path) == before  # Nothing written, not even a TFDS dir.


def test_prepare_prints_one_line(idx_dir, tmp_path, capfd):
    data_dir = str(tmp_path / "tfds")
    fashion_mnist_local.prepare(data_dir, idx_dir)
    out, err = capfd.readouterr()
    assert out == f"gencnp_jax: preparing Fashion-MNIST from {idx_dir} into {data_dir} (once)\n"
    assert "Generating" not in err and "Variant folder" not in err and "%" not in err
    fashion_mnist_local.prepare(data_dir, idx_dir)  # Prepared: silent.
    assert capfd.readouterr() == ("", "")
