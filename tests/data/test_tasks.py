"""Benchmark registry, class orders, task partitions, split carving, and load_stream on npz data."""

import json

import numpy as np
import pytest

from trm_jax import data
from trm_jax.data import tasks
from trm_jax.errors import ConfigError, DataError


def _write_npz(path, n_classes=10, per_class_train=12, per_class_test=4, shape=(6, 6), names=True):
    """Images encode their own index (pixels 0,1) so tests can trace every example."""

    def make(per_class, offset):
        n = n_classes * per_class
        idx = np.arange(n) + offset
        x = np.zeros((n, *shape), np.uint8)
        x[:, 0, 0], x[:, 0, 1] = idx % 256, idx // 256
        y = np.arange(n) % n_classes
        return x, y

    x_train, y_train = make(per_class_train, 0)
    x_test, y_test = make(per_class_test, 10_000)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    if names:
        arrays["class_names"] = np.array([f"class{i}" for i in range(n_classes)])
    np.savez(path, **arrays)
    return arrays


def _cfg(**kw):
    cfg = data.default_config()
    cfg.update(kw)
    return cfg


def _index(images):
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def test_every_benchmark_is_consistent():
    for name, b in data.BENCHMARKS.items():
        assert b.name == name
        assert set(b.sources) <= set(data.SOURCES), name
        if b.num_classes:
            assert len(b.class_names) == b.num_classes, name
            assert len(set(b.class_names)) == b.num_classes, name
            for t in b.standard_num_tasks:
                parts = data.task_partition(b.num_classes, t, uneven=b.uneven_tasks)
                assert len(parts) == t
                np.testing.assert_array_equal(np.concatenate(parts), np.arange(b.num_classes))
    assert data.BENCHMARKS["imagenet_r"].class_keys[:2] == ("n01443537", "n01484850")
    assert data.BENCHMARKS["cifar100"].class_names[:3] == ("apple", "aquarium fish", "baby")


def test_unknown_benchmark_lists_choices():
    with pytest.raises(KeyError) as info:
        data.get_benchmark("cifar1000")
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert "\n" not in message and "cifar1000" in message
    for name in data.BENCHMARKS:
        assert name in message


def test_unknown_or_incompatible_source():
    with pytest.raises(ConfigError, match="choose one of: tfds, idx, npz, folder, mnist5k"):
        data.load_stream(_cfg(source="hdf5"))
    with pytest.raises(
        ConfigError, match="cannot be read from source 'idx'; choose one of: tfds, npz"
    ):
        data.load_stream(_cfg(name="cifar100", source="idx"))


def test_class_order_natural_shuffled_explicit():
    np.testing.assert_array_equal(data.class_order(5), np.arange(5))
    a = data.class_order(100, "shuffled", 1993)
    np.testing.assert_array_equal(a, data.class_order(100, "shuffled", 1993))
    # The legacy-numpy draw many CL codebases use: np.random.seed(s); np.random.permutation(C).
    np.random.seed(1993)
    np.testing.assert_array_equal(a, np.random.permutation(100))
    assert not np.array_equal(a, data.class_order(100, "shuffled", 1994))
    np.testing.assert_array_equal(data.class_order(4, "2,0,3,1"), [2, 0, 3, 1])
    for bad in ("2,0,3", "2,0,3,3", "random", "1,x,2,0"):
        with pytest.raises(ConfigError, match="permutation of 0..3"):
            data.class_order(4, bad)


def test_task_partition_and_errors():
    parts = data.task_partition(100, 20)
    assert [p.tolist() for p in parts[:2]] == [list(range(5)), list(range(5, 10))]
    with pytest.raises(
        DataError, match=r"cifar100: 7 tasks do not divide its 100 classes; use one of 1, 2, 4, 5"
    ):
        data.task_partition(100, 7, name="cifar100")
    # Cars: 196 classes in 10 tasks -> 6 tasks of 20 then 4 of 19, contiguous.
    sizes = [len(p) for p in data.task_partition(196, 10, uneven=True)]
    assert sizes == [20] * 6 + [19] * 4
    with pytest.raises(DataError):
        data.task_partition(10, 0)


def test_task_count_not_dividing_fails_before_reading(tmp_path):
    # No data exists at the path: the task-count error must come first.
    with pytest.raises(DataError, match="3 tasks do not divide its 10 classes"):
        data.load_stream(_cfg(num_tasks=3, path=str(tmp_path / "none")))


def test_carve_per_class_fraction_deterministic():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    kept, carved = data.carve(labels, 0.2, seed=5)
    assert np.intersect1d(kept, carved).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, carved])), np.arange(len(labels)))
    # round(0.2 n) per class, at least one when n >= 2, none from a singleton class.
    np.testing.assert_array_equal(np.bincount(labels[carved], minlength=4), [2, 4, 1, 0])
    again = data.carve(labels, 0.2, seed=5)
    np.testing.assert_array_equal(carved, again[1])
    assert not np.array_equal(carved, data.carve(labels, 0.2, seed=6)[1])
    assert data.carve(labels, 0.0, seed=5)[1].size == 0


def test_load_stream_npz_remap_and_splits(tmp_path):
    path = tmp_path / "d.npz"
    arrays = _write_npz(path)
    cfg = _cfg(
        source="npz",
        name="custom",
        path=str(path),
        num_tasks=5,
        class_order="shuffled",
        order_seed=3,
        val_fraction=0.25,
    )
    s = data.load_stream(cfg)
    assert (s.num_classes, s.num_tasks) == (10, 5)
    np.testing.assert_array_equal(s.class_order, data.class_order(10, "shuffled", 3))
    assert s.class_names == tuple(f"class{i}" for i in s.class_order)
    # Every example carries its original index: its original label must be class_order[new label].
    for split in data.SPLITS:
        x, y = s.split(split, range(5))
        idx = _index(x)
        original = np.array(
            [arrays["y_test"][i - 10_000] if i >= 10_000 else arrays["y_train"][i] for i in idx]
        )
        np.testing.assert_array_equal(s.class_order[y], original)
        assert y.dtype == np.int32 and x.dtype == np.uint8 and x.shape[1:] == (6, 6, 1)
    # val is 3 of 12 per class, carved from train; train + val = all train; test untouched.
    train_idx, val_idx = _index(s.split("train", range(5))[0]), _index(s.split("val", range(5))[0])
    assert np.intersect1d(train_idx, val_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(120))
    np.testing.assert_array_equal(s.counts("val"), [6] * 5)
    np.testing.assert_array_equal(s.counts("test"), [8] * 5)
    # Task t holds new ids 2t, 2t+1 only.
    for t in range(5):
        _, y = s.split("train", t)
        assert set(np.unique(y)) == {2 * t, 2 * t + 1}
    x02, y02 = s.split("test", [0, 2])
    assert sorted(set(y02.tolist())) == [0, 1, 4, 5] and len(y02) == 16
    json.dumps(s.describe())


def test_same_seed_same_stream_other_seed_other(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path)
    base = dict(source="npz", name="custom", path=str(path), class_order="shuffled")
    a = data.load_stream(_cfg(**base, order_seed=1, split_seed=1))
    b = data.load_stream(_cfg(**base, order_seed=1, split_seed=1))
    c = data.load_stream(_cfg(**base, order_seed=2, split_seed=2))
    np.testing.assert_array_equal(a.class_order, b.class_order)
    for split in data.SPLITS:
        for t in range(a.num_tasks):
            np.testing.assert_array_equal(a.split(split, t)[0], b.split(split, t)[0])
    assert not np.array_equal(a.class_order, c.class_order)
    assert not np.array_equal(
        np.sort(_index(a.split("val", range(5))[0])), np.sort(_index(c.split("val", range(5))[0]))
    )
    # The test split does not depend on the tuning seeds.
    np.testing.assert_array_equal(
        np.sort(_index(a.split("test", range(5))[0])), np.sort(_index(c.split("test", range(5))[0]))
    )


def test_caps_per_class(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path)
    s = data.load_stream(
        _cfg(
            source="npz",
            name="custom",
            path=str(path),
            val_fraction=0.5,
            max_train_per_class=4,
            max_test_per_class=3,
        )
    )
    for split, per_class in (("train", 2), ("val", 2), ("test", 3)):
        np.testing.assert_array_equal(np.bincount(s.labels[split], minlength=10), [per_class] * 10)


def test_registered_benchmark_from_npz_checks_label_range(tmp_path):
    path = tmp_path / "d.npz"
    _write_npz(path, n_classes=10, names=False)
    s = data.load_stream(_cfg(source="npz", name="fashion_mnist", path=str(path)))
    assert s.class_names[:2] == ("T-shirt/top", "Trouser")
    arrays = dict(np.load(path))
    arrays["y_test"][3] = 10
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"fashion_mnist: test labels span 0..10, outside 0..9"):
        data.load_stream(_cfg(source="npz", name="fashion_mnist", path=str(path)))


def test_config_validation():
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        data.load_stream(_cfg(val_fraction=1.0))
    with pytest.raises(ConfigError, match="max_train_per_class must be >= 0"):
        data.load_stream(_cfg(max_train_per_class=-1))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        tasks.TaskStream(
            "x", "npz", 1, 1, np.zeros(1, np.int32), ("a",), [np.zeros(1, np.int32)], {}, {}
        ).split("dev", 0)
