"""Shipped class orders (MagMax's), the ``class_order='magmax'`` choice, and the
``folder_test_split='path_hash'`` split of a flat class-folder tree (ImageNet-R's layout)."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from trm_jax import data
from trm_jax.data import class_names, class_orders, local
from trm_jax.errors import ConfigError, UnknownNameError

SIZES = {"cifar100": 100, "imagenet_r": 200, "cub200": 200, "cars196": 196}


def _cfg(**kw):
    cfg = data.default_config()
    cfg.update(kw)
    return cfg


def test_shipped_orders_are_permutations_with_sources():
    assert class_orders.names() == tuple(sorted(SIZES))
    for name, n in SIZES.items():
        order = class_orders.get(name)
        assert sorted(order) == list(range(n)), name
        assert len(order) == data.get_benchmark(name).num_classes
        record = class_orders.record(name)
        assert record["benchmark"] == name
        assert record["source"].startswith("danielm1405/magmax/src/datasets/")
        np.testing.assert_array_equal(data.class_order(n, "magmax", benchmark=name), order)
    assert class_orders.get("cars196") == list(range(196))  # MagMax defines none for Cars
    assert class_orders.get("cifar100")[:5] == [70, 89, 11, 13, 63]
    # MagMax uses one 200-class permutation for CUB-200 and ImageNet-R (in its label ids).
    imr = class_orders.record("imagenet_r")
    assert imr["source_order"] == class_orders.get("cub200")
    with pytest.raises(UnknownNameError, match="no shipped class order .*cifar100"):
        class_orders.get("custom")


def test_imagenet_r_order_is_magmax_classes_in_our_label_ids():
    """MagMax's label i is the i-th of its sorted README names; ours is the i-th sorted
    WordNet id. Position k of the translated order must be the same class."""
    imr = class_orders.record("imagenet_r")
    theirs = imr["source_classes"]
    assert theirs == sorted(theirs) and len(set(theirs)) == 200  # torchvision ImageFolder order
    for ours, src in zip(imr["order"], imr["source_order"], strict=True):
        assert class_names.IMAGENET_R[ours] == theirs[src].replace("_", " ")


def test_magmax_order_through_load_stream(tmp_path):
    order = class_orders.get("cifar100")
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(100), 2), np.arange(100)
    path = str(tmp_path / "c100.npz")
    np.savez(
        path,
        x_train=rng.integers(0, 256, (200, 4, 4, 3), dtype=np.uint8),
        y_train=y_train,
        x_test=rng.integers(0, 256, (100, 4, 4, 3), dtype=np.uint8),
        y_test=y_test,
    )
    cfg = _cfg(
        source="npz", name="cifar100", path=path, num_tasks=10, class_order="magmax", val_fraction=0
    )
    stream = data.load_stream(cfg)
    np.testing.assert_array_equal(stream.class_order, order)
    assert stream.class_names[0] == class_names.CIFAR100[70]
    _, labels = stream.split("test", 0)
    np.testing.assert_array_equal(np.sort(stream.class_order[labels]), sorted(order[:10]))
    with pytest.raises(UnknownNameError, match="no shipped class order"):
        data.load_stream(_cfg(source="npz", name="custom", path=path, class_order="magmax"))


def test_path_hash_unit_is_the_documented_rule():
    rel = "n01443537/art_0.jpg"
    digest = hashlib.sha256(rel.encode()).hexdigest()
    assert local.path_hash_unit(rel) == int(digest[:16], 16) / 2**64
    units = [local.path_hash_unit(f"n0/{i}.jpg") for i in range(4000)]
    assert 0 <= min(units) and max(units) < 1 and len(set(units)) == 4000


def test_path_hash_split_is_per_class_and_order_free():
    paths = [f"c{c}/{i}.jpg" for c, n in enumerate((51, 430, 7, 1)) for i in range(n)]
    labels = [int(p[1 : p.index("/")]) for p in paths]
    is_test = local.path_hash_split(paths, labels, 0.2)
    chosen = {p for p, t in zip(paths, is_test, strict=True) if t}
    counts = (10, 86, 1, 0)  # round(0.2 n), at least 1 and at most n - 1
    for c, k in enumerate(counts):  # each class: its k lowest hashes
        mine = [p for p, y in zip(paths, labels, strict=True) if y == c]
        assert chosen & set(mine) == set(sorted(mine, key=local.path_hash_unit)[:k])
    perm = np.random.default_rng(0).permutation(len(paths))
    shuffled = local.path_hash_split([paths[i] for i in perm], [labels[i] for i in perm], 0.2)
    assert {paths[i] for i, t in zip(perm, shuffled, strict=True) if t} == {
        p for p, t in zip(paths, is_test, strict=True) if t
    }
    assert not local.path_hash_split(paths, labels, 0.0).any()


def test_imagenet_r_folder_path_hash_split_with_magmax_order(tmp_path):
    root = tmp_path / "imagenet-r"
    files = {}
    rng = np.random.default_rng(1)
    for label, wnid in enumerate(class_names.IMAGENET_R_WNIDS):
        os.makedirs(root / wnid)
        for name in ("art_0.jpg", "sketch_1.png", "toy_2.jpg"):
            im = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            im[0, 0, 0], im[0, 0, 1] = label, len(files) % 256  # trace the file back
            Image.fromarray(im).save(root / wnid / name, format="PNG")
            files[(label, len(files) % 256)] = f"{wnid}/{name}"
    cfg = _cfg(
        source="folder",
        name="imagenet_r",
        path=str(root),
        num_tasks=10,
        class_order="magmax",
        folder_test_split="path_hash",
        test_fraction=0.3,
        val_fraction=0.0,
        stored_size=6,
    )
    stream = data.load_stream(cfg)
    np.testing.assert_array_equal(stream.class_order, class_orders.get("imagenet_r"))
    imr = class_orders.record("imagenet_r")
    first = imr["source_classes"][imr["source_order"][0]].replace("_", " ")
    assert stream.class_names[0] == first
    for split in ("train", "test"):
        images, labels = stream.split(split, list(range(10)))
        got = {files[(int(im[0, 0, 0]), int(im[0, 0, 1]))] for im in images}
        # 3 files per class at test_fraction 0.3: the one with the lowest hash is test.
        lowest = {
            min((r for r in files.values() if r.startswith(wnid + "/")), key=local.path_hash_unit)
            for wnid in class_names.IMAGENET_R_WNIDS
        }
        want = {r for r in files.values() if (r in lowest) == (split == "test")}
        assert got == want, split
        orig = stream.class_order[labels]
        np.testing.assert_array_equal(orig, images[:, 0, 0, 0])  # labels follow the files
    # The default rule on the same tree: one of each class's three files carved for test.
    cfg.folder_test_split = "carve"
    np.testing.assert_array_equal(np.bincount(data.load_stream(cfg).labels["test"]), [1] * 200)
    cfg.folder_test_split = "random"
    with pytest.raises(ConfigError, match="folder_test_split 'random' not in carve, path_hash"):
        data.load_stream(cfg)
