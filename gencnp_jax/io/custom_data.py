"""A user's own labelled images as datasets `npz:PATH` and `folder:PATH` (numpy and pillow only).

npz images must be integers in 0..255 (float arrays are refused, naming the conversion); folder
images load as pillow's "L" when all are grayscale, else as "RGB" (alpha dropped). `data`
dispatches these names here; `read_images` reads unlabelled images to explain.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import zipfile

import numpy as np
import PIL.Image

PREFIXES = ("npz:", "folder:")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_SPLIT_RE = re.compile(r"(train|test)(?:\[(-?\d+)?:(-?\d+)?\])?")
_SUFFIXES = ", ".join(IMAGE_SUFFIXES)
_NPZ_HOW = "write np.savez(path, images=uint8 NxHxW[xC], labels=int N[, class_names=K str])"
_NPZ_ROOT_HOW = "name a folder of train.npz + test.npz, or a path with {split}: npz:d/x_{split}.npz"
_FOLDER_HOW = "name a folder holding train/ and test/, each with one subfolder of images per class"


class DatasetError(Exception):
    """A dataset cannot be loaded from local files; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class _Index:
    """What a custom dataset holds, from its labels and image headers (pixels come later)."""

    hwc: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] | None
    sources: dict  # split -> its npz path, or a tuple of (image path, label) for folders


def is_custom(dataset: str) -> bool:
    """Whether `dataset` names a user's own data (`npz:PATH` or `folder:PATH`)."""
    return dataset.startswith(PREFIXES)


def canonical(dataset: str) -> str:
    """`dataset` with an absolute path (`~` expanded, relative to the working directory)."""
    kind, _, path = dataset.partition(":")
    return f"{kind}:{os.path.abspath(os.path.expanduser(path.strip()))}"


def _npz_headers(path: str) -> dict[str, tuple[tuple, np.dtype]]:
    """`{key: (shape, dtype)}` of every array in an .npz file, read from the .npy headers."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in (m for m in archive.namelist() if m.endswith(".npy")):
                with archive.open(member) as f:
                    fmt = np.lib.format
                    v1 = fmt.read_magic(f) == (1, 0)
                    read = fmt.read_array_header_1_0 if v1 else fmt.read_array_header_2_0
                    shape, _, dtype = read(f)
                headers[member[: -len(".npy")]] = (shape, dtype)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path} is not a readable .npz file ({e}): {_NPZ_HOW}") from e
    if "images" not in headers:
        raise DatasetError(f"{path} has no 'images' array (it holds {sorted(headers)}): {_NPZ_HOW}")
    shape, dtype = headers["images"]
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise DatasetError(f"{path}: images of shape {shape}, not NxHxW or NxHxWx(1 or 3)")
    if not np.issubdtype(dtype, np.integer):
        raise DatasetError(
            f"{path}: images are {dtype}, expected uint8 0..255: save np.round(images * 255)"
            ".astype(np.uint8) if they are in [0, 1], images.astype(np.uint8) if in [0, 255]"
        )
    if shape[0] == 0:
        raise DatasetError(f"{path} holds no images: {_NPZ_HOW}")
    return headers


def _as_uint8(path: str, images: np.ndarray) -> np.ndarray:
    """Integer images as NxHxWxC uint8; values outside 0..255 are refused, never clipped."""
    if images.dtype != np.uint8 and images.size and (images.min() < 0 or images.max() > 255):
        raise DatasetError(
            f"{path}: images hold values {images.min()}..{images.max()}: rescale them to 0..255"
        )
    images = images.astype(np.uint8, copy=False)
    return images[..., None] if images.ndim == 3 else images


def _npz_split(path: str) -> tuple[tuple[int, int, int], int, tuple[str, ...] | None]:
    """Checks one npz split; returns its HxWxC, largest label and class names (if any)."""
    headers = _npz_headers(path)
    if "labels" not in headers:
        raise DatasetError(f"{path} has no 'labels' array (it holds {sorted(headers)}): {_NPZ_HOW}")
    (n, h, w, *c), (shape, dtype) = headers["images"][0], headers["labels"]
    if not np.issubdtype(dtype, np.integer):
        raise DatasetError(f"{path}: labels are {dtype}, not integers: save class indices 0..K-1")
    if shape != (n,):
        raise DatasetError(f"{path}: {n} images but labels of shape {shape}: give one label each")
    names_shape, names_dtype = headers.get("class_names", ((0,), np.dtype(str)))
    if len(names_shape) != 1 or names_dtype.kind not in "US":
        raise DatasetError(f"{path}: class_names must be 1-D: save np.array(names, dtype=str)")
    with np.load(path, allow_pickle=False) as npz:
        labels = npz["labels"]
        names = tuple(npz["class_names"].astype(str).tolist()) if "class_names" in headers else None
    if labels.min() < 0:
        raise DatasetError(f"{path}: labels include {labels.min()}: classes must be 0..K-1")
    return (h, w, c[0] if c else 1), int(labels.max()), names


def _npz_index(root: str) -> _Index:
    if "{split}" in root:
        paths = {s: root.replace("{split}", s) for s in SPLITS}
    elif os.path.isdir(root):
        paths = {s: os.path.join(root, f"{s}.npz") for s in SPLITS}
    else:
        problem = "is a single file" if os.path.exists(root) else "does not exist"
        raise DatasetError(f"npz:{root} {problem}: {_NPZ_ROOT_HOW}")
    for split, path in paths.items():
        if not os.path.isfile(path):
            raise DatasetError(f"missing {path} (the {split} split of npz:{root}): {_NPZ_HOW}")
    (train_hwc, train_max, train_names), (test_hwc, test_max, test_names) = map(
        _npz_split, paths.values()
    )
    if train_hwc != test_hwc:
        raise DatasetError(f"npz:{root}: train images are {train_hwc} (HxWxC), test {test_hwc}")
    if None not in (train_names, test_names) and train_names != test_names:
        raise DatasetError(f"{paths['train']}, {paths['test']} differ in class_names: make equal")
    names, max_label = train_names or test_names, max(train_max, test_max)
    if names is not None and max_label >= len(names):
        raise DatasetError(f"npz:{root}: label {max_label} but only {len(names)} class_names")
    return _Index(train_hwc, len(names) if names else max_label + 1, names, paths)


def _is_gray(image: PIL.Image.Image) -> bool:
    if image.mode == "P":  # A palette of greys (common in GIFs) is grayscale too.
        palette = np.asarray(image.getpalette() or [0, 0, 1]).reshape(-1, 3)
        return bool((palette == palette[:, :1]).all())
    return image.mode in ("1", "L", "LA", "La", "I", "F") or image.mode.startswith("I;16")


def _probe(paths: list[str]) -> tuple[int, int, int]:
    """HxWxC shared by image files, from their headers: 1 channel when all are grayscale."""
    first, gray = None, True
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                (w, h), gray = image.size, gray and _is_gray(image)
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError.
            raise DatasetError(f"cannot read image {path} ({e}): replace or remove it") from e
        first = first or (path, h, w)
        if (h, w) != first[1:]:
            raise DatasetError(
                f"{path} is {h}x{w} (HxW) but {first[0]} is {first[1]}x{first[2]}: resize all "
                "images to one size"
            )
    return (first[1], first[2], 1 if gray else 3)


def _decode(path: str, channels: int) -> np.ndarray:
    """One image as HxWxC uint8: pillow's "L" for 1 channel, "RGB" for 3 (alpha dropped)."""
    try:
        with PIL.Image.open(path) as image:
            if image.mode in ("P", "PA"):  # Palette (maybe transparent) via RGBA: no warning.
                image = image.convert("RGBA")
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except OSError as e:
        raise DatasetError(f"cannot read image {path} ({e}): replace or remove it") from e
    return pixels.reshape(*pixels.shape[:2], channels)


def _image_files(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(folder, n) for n in names if not n.startswith(".")]


def _folder_index(root: str) -> _Index:
    if not os.path.isdir(root):
        raise DatasetError(f"folder:{root}: no such folder: {_FOLDER_HOW}")
    classes = {}
    for split in SPLITS:
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise DatasetError(f"missing {d} (the {split} split of folder:{root}): {_FOLDER_HOW}")
        names = [n for n in os.listdir(d) if n[0] != "." and os.path.isdir(os.path.join(d, n))]
        classes[split] = sorted(names)
        if not classes[split]:
            raise DatasetError(f"{d} has no class subfolders: put each class's images in {d}/NAME/")
    if classes["train"] != classes["test"]:
        only = {s: sorted(set(classes[s]) - set(classes[t])) for s, t in (SPLITS, SPLITS[::-1])}
        raise DatasetError(
            f"folder:{root}: train/ and test/ have different class folders (only in train/: "
            f"{only['train']}, only in test/: {only['test']}): give both the same class folders"
        )
    sources = {}
    for split in SPLITS:
        ranked = []
        for label, name in enumerate(classes["train"]):
            files = _image_files(d := os.path.join(root, split, name))
            if not files:
                raise DatasetError(
                    f"empty class folder {d}: add images or delete it in both splits"
                )
            ranked += [(rank, label, path) for rank, path in enumerate(files)]
        # Round robin over the classes, so any prefix (a train_limit) is class-balanced.
        sources[split] = tuple((path, label) for _, label, path in sorted(ranked))
    hwc = _probe([path for split in SPLITS for path, _ in sources[split]])
    return _Index(hwc, len(classes["train"]), tuple(classes["train"]), sources)


@functools.lru_cache(maxsize=16)
def _index(dataset: str) -> _Index:
    """The index of a canonical dataset name (cached per process; errors are not cached)."""
    kind, _, root = dataset.partition(":")
    return _npz_index(root) if kind == "npz" else _folder_index(root)


def dataset_info(dataset: str) -> tuple[tuple[int, int, int], int]:
    """`((height, width, channels), num_classes)` of `npz:PATH` or `folder:PATH`.

    Reads labels and image headers only. For npz, K = len(class_names) when given, else the
    largest label of both splits + 1; for folders, the number of class subfolders. Missing or
    malformed files raise a `DatasetError` naming the file and the fix.
    """
    index = _index(canonical(dataset))
    return index.hwc, index.num_classes


def class_names(dataset: str) -> list[str]:
    """The dataset's class names: folder names, npz `class_names`, else "0".."K-1"."""
    index = _index(canonical(dataset))
    return list(index.class_names or [str(k) for k in range(index.num_classes)])


def read_split(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split as `(images_NxHxWxC uint8, labels_N int32)`, fresh arrays.

    npz splits keep file order; folder splits take the classes in turn (round robin).

    Args:
      dataset: `npz:PATH` or `folder:PATH`.
      split: "train" or "test", optionally sliced by example counts: "train[:1000]"; any
        other split raises a `DatasetError`.
    """
    dataset = canonical(dataset)
    match = _SPLIT_RE.fullmatch(split.strip())
    if not match:
        raise DatasetError(f"split {split!r} of {dataset}: use 'train', 'test' or e.g. 'test[:99]'")
    index = _index(dataset)
    rows = slice(*(int(m) if m else None for m in match.group(2, 3)))
    source = index.sources[match[1]]
    if isinstance(source, str):
        with np.load(source, allow_pickle=False) as npz:
            images, labels = _as_uint8(source, npz["images"][rows]), npz["labels"][rows]
    else:
        images = np.empty((len(source[rows]), *index.hwc), np.uint8)
        for i, (path, _) in enumerate(source[rows]):
            images[i] = _decode(path, index.hwc[2])
        labels = np.asarray([label for _, label in source[rows]], np.int64)
    if len(labels) == 0:
        raise DatasetError(f"split {split!r} of {dataset} selects no examples: widen the slice")
    return np.ascontiguousarray(images), labels.astype(np.int32)


def read_images(spec: str) -> tuple[np.ndarray, list[str]]:
    """Reads unlabelled images to explain, with a name for each.

    Args:
      spec: `npz:FILE` (its `images` array; labels ignored), `folder:DIR` (the image files
        directly in DIR, sorted by name), or a plain path to an .npz file or a folder.

    Returns:
      `(images_NxHxWxC uint8, names)`: file stems, or "#i" for the rows of an npz.

    Raises:
      DatasetError: no such path, no images, images of mixed sizes, or an unreadable file.
    """
    kind, sep, path = spec.partition(":")
    kind, path = (kind, path) if sep and kind in ("npz", "folder") else ("", spec)
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DatasetError(f"{path} does not exist: give folder:DIR or npz:FILE (or their path)")
    if kind == "npz" or (not kind and path.endswith(".npz") and os.path.isfile(path)):
        _npz_headers(path)
        with np.load(path, allow_pickle=False) as npz:
            images = _as_uint8(path, npz["images"])
        return images, [f"#{i}" for i in range(len(images))]
    if not os.path.isdir(path):
        raise DatasetError(f"{path} is not a folder or an .npz file: give folder:DIR or npz:FILE")
    files = _image_files(path)
    if not files:
        raise DatasetError(f"no images ({_SUFFIXES}) directly in {path}: put the image files there")
    hwc = _probe(files)
    images = np.stack([_decode(f, hwc[2]) for f in files])
    return images, [os.path.splitext(os.path.basename(f))[0] for f in files]
