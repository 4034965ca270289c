"""The tfds source: every TFDS benchmark through `tfds.testing.mock_data`, a real ArrayRecord
dataset written by a tiny builder (no TensorFlow needed), and the missing-data message."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from trm_jax import data
from trm_jax.data import local
from trm_jax.data import tfds as tfds_source
from trm_jax.errors import DataError

# ImageNet-R mock labels are drawn from 1000 ImageNet classes, of which 200 are kept.
_MOCK_EXAMPLES = {"imagenet_r": 600}
_CASES = [
    (name, t)
    for name, b in sorted(data.BENCHMARKS.items())
    if "tfds" in b.sources
    for t in b.standard_num_tasks
]


def _cfg(**kw):
    cfg = data.default_config()
    cfg.update(kw)
    return cfg


def _raw(benchmark, split):
    """What the mock serves: (benchmark label or -1, image) per example, read independently."""
    source = tfds.data_source(benchmark.tfds_name, split=split)
    names = source.dataset_info.features["label"].names
    out = []
    for i in range(len(source)):
        record = source[i]
        label = int(record["label"])
        if benchmark.class_keys:
            key = names[label]
            label = benchmark.class_keys.index(key) if key in benchmark.class_keys else -1
        out.append((label, np.asarray(record["image"])))
    return out


@pytest.mark.parametrize("name,num_tasks", _CASES)
def test_mock_benchmark_stream(name, num_tasks):
    b = data.BENCHMARKS[name]
    size = 8 if b.image_size > 32 else 0  # keep resized benchmarks tiny
    cfg = _cfg(
        source="tfds",
        name=name,
        num_tasks=num_tasks,
        class_order="shuffled",
        order_seed=num_tasks,
        stored_size=size,
    )
    with tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES.get(name, 150)):
        s = data.load_stream(cfg)
        raw_train = _raw(b, b.tfds_train_split)
        raw_test = _raw(b, b.tfds_test_split) if b.tfds_test_split else []

    # Task classes: disjoint, each class exactly once, contiguous blocks of new ids.
    allc = np.concatenate(s.task_classes)
    np.testing.assert_array_equal(np.sort(allc), np.arange(b.num_classes))
    assert len(s.task_classes) == num_tasks
    assert max(map(len, s.task_classes)) - min(map(len, s.task_classes)) <= (
        1 if b.uneven_tasks else 0
    )
    assert s.class_names == tuple(b.class_names[i] for i in s.class_order)

    # Counts add up: every kept source example lands in exactly one split.
    kept_train = [(y, im) for y, im in raw_train if y >= 0]
    kept_test = [(y, im) for y, im in raw_test if y >= 0]
    total = sum(int(s.counts(sp).sum()) for sp in data.SPLITS)
    assert total == len(kept_train) + len(kept_test)
    if b.tfds_test_split:
        assert int(s.counts("test").sum()) == len(kept_test)
    # Per-class counts agree through the remap: new id i is original class class_order[i].
    raw_counts = np.bincount([y for y, _ in kept_train + kept_test], minlength=b.num_classes)
    new_counts = sum(np.bincount(s.labels[sp], minlength=b.num_classes) for sp in data.SPLITS)
    np.testing.assert_array_equal(new_counts, raw_counts[s.class_order])

    # Labels follow their images: look every stored image up among the source's images.
    stored = cfg.stored_size or b.image_size
    label_of = {}
    for y, im in kept_train + kept_test:
        im = tfds_source._fix_channels(im.astype(np.uint8), b.channels)
        label_of.setdefault(local.fit_image(im, stored).tobytes(), set()).add(y)
    for sp in data.SPLITS:
        x, y = s.split(sp, range(num_tasks))
        assert x.shape[1:] == (stored, stored, b.channels)
        for image, new in zip(x, y, strict=False):
            assert int(s.class_order[new]) in label_of[image.tobytes()]


# A real TFDS dataset, written as ArrayRecord without TensorFlow (images given as PNG bytes).
class TrmTestTinyImages(tfds.core.GeneratorBasedBuilder):
    """Eight TFDS labels (k0..k7) of which the test benchmark uses six; varying image sizes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=[f"k{i}" for i in range(8)]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0), "test": self._generate_examples(12, 1)}

    def _generate_examples(self, n, seed):
        for i, (image, label) in enumerate(tiny_examples(n, seed)):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            yield i, {"image": buf.getvalue(), "label": label}


def tiny_examples(n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield rng.integers(0, 256, (9 + i % 5, 12, 3), dtype=np.uint8), 2 + i % 6  # labels k2..k7


def test_real_array_record_dataset(tmp_path):
    builder = TrmTestTinyImages(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    bench = data.Benchmark(
        name="tiny",
        num_classes=6,
        class_names=tuple("abcdef"),
        standard_num_tasks=(3,),
        sources=("tfds",),
        image_size=7,
        channels=3,
        how_to_get="",
        description="",
        tfds_name="trm_test_tiny_images",
        class_keys=tuple(f"k{i}" for i in range(2, 8)),
    )
    raw = tfds_source.load_tfds(bench, _cfg(source="tfds", data_dir=str(tmp_path)))
    for split_images, split_labels, (n, seed) in (
        (raw.train_images, raw.train_labels, (24, 0)),
        (raw.test_images, raw.test_labels, (12, 1)),
    ):
        # TFDS shuffles records when it writes them: compare as (image, label) multisets.
        expected = sorted(
            (local.fit_image(im, 7).tobytes(), label - 2) for im, label in tiny_examples(n, seed)
        )
        got = sorted(
            (im.tobytes(), int(y)) for im, y in zip(split_images, split_labels, strict=False)
        )
        assert split_images.shape == (n, 7, 7, 3)
        assert got == expected


def test_missing_tfds_data_message(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        data.load_stream(_cfg(source="tfds", name="cifar100", data_dir=str(empty)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cifar100: TFDS dataset 'cifar100' not available in " + str(empty))
    assert "download=False" in message and "set config.data.download=True" in message


def test_cars_message_names_manual_files(tmp_path):
    with pytest.raises(
        DataError, match=r"cars_train.tgz, cars_test.tgz, car_devkit.tgz .*manual_dir"
    ):
        data.load_stream(_cfg(source="tfds", name="cars196", num_tasks=10, data_dir=str(tmp_path)))
