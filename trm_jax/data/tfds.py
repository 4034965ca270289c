"""The ``tfds`` source: paper benchmarks read through TensorFlow Datasets' random access API.

``tfds.data_source`` reads ArrayRecord files with numpy and PIL, so TensorFlow is not
needed to *read* (it is needed once to *prepare* a dataset from its raw download, a TFDS
limitation). Works unchanged under ``tfds.testing.mock_data``, which the tests use.

Images are stored at the benchmark's size (``config.stored_size`` overrides): the native
32x32 of CIFAR-100 is kept, variable-size photos (Cars, CUB, ImageNet-R) are centre-
cropped and resized once on load so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trm_jax.data.local import RawData, fit_image
from trm_jax.errors import DataError

_CHUNK = 1024


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def missing_message(benchmark: Any, config: Any, error: BaseException) -> str:
    """One line for a dataset TFDS could not provide: which, where looked, how to get it."""
    import tensorflow_datasets as tfds

    where = (
        config.data_dir
        or f"{tfds.core.constants.DATA_DIR} (TFDS default; set config.data.data_dir)"
    )
    manual = f", manual_dir={config.manual_dir}" if config.manual_dir else ""
    return (
        f"{benchmark.name}: TFDS dataset '{benchmark.tfds_name}' not available in {where} "
        f"(download={config.download}{manual}); {benchmark.how_to_get} "
        f"[{type(error).__name__}: {_one_line(error)}]"
    )


def _records(source: Sequence[Any], start: int, stop: int) -> list[Any]:
    """Records ``start..stop`` of a TFDS data source, batched where the source allows."""
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(list(range(start, stop))))
        except TypeError:  # `tfds.testing.mock_data` sources only support one key at a time
            pass
    return [source[i] for i in range(start, stop)]


def _fix_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Makes a decoded image ``[h, w, channels]``: gray -> repeated, RGBA -> RGB."""
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1:
        return np.repeat(image, channels, axis=-1)
    if channels == 3 and c == 4:
        return image[..., :3]
    if channels == 1 and c in (3, 4):
        rgb = image[..., :3].astype(np.float32)
        return np.round(rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(
            np.uint8
        )
    raise DataError(f"cannot convert images with {c} channels to {channels}")


def label_lookup(benchmark: Any, tfds_label_names: Sequence[str]) -> np.ndarray | None:
    """Maps TFDS label ids to benchmark ids (-1 = not in the benchmark), or ``None`` for identity.

    ImageNet-R is labelled in the ImageNet-1k space (1000 WordNet ids) but uses 200 of
    them; ``benchmark.class_keys`` lists those ids in benchmark order.
    """
    if not benchmark.class_keys:
        return None
    position = {key: i for i, key in enumerate(tfds_label_names)}
    missing = [k for k in benchmark.class_keys if k not in position]
    if missing:
        raise DataError(
            f"{benchmark.name}: TFDS '{benchmark.tfds_name}' labels lack {', '.join(missing[:3])}"
        )
    lookup = np.full(len(tfds_label_names), -1, np.int64)
    lookup[[position[k] for k in benchmark.class_keys]] = np.arange(len(benchmark.class_keys))
    return lookup


def read_split(
    source: Sequence[Any], lookup: np.ndarray | None, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole TFDS split into uint8 ``[N, size, size, channels]`` and benchmark labels.

    Chunked, so that each chunk is resized to the stored size before the next is read.
    Examples whose label is outside the benchmark (``lookup`` gives -1) are dropped.
    """
    images, labels = [], []
    for start in range(0, len(source), _CHUNK):
        for record in _records(source, start, min(start + _CHUNK, len(source))):
            label = int(record["label"])
            if lookup is not None:
                label = int(lookup[label]) if 0 <= label < len(lookup) else -1
                if label < 0:
                    continue
            image = _fix_channels(np.asarray(record["image"], np.uint8), channels)
            images.append(fit_image(image, size))
            labels.append(label)
    if not images:
        return np.zeros((0, size, size, channels), np.uint8), np.zeros((0,), np.int64)
    return np.stack(images), np.asarray(labels, np.int64)


def load_tfds(benchmark: Any, config: Any) -> RawData:
    """The ``tfds`` source: the benchmark's TFDS train/test splits (test ``None`` if absent).

    ``config.download`` lets TFDS download and prepare the data (needs internet, and
    TensorFlow for the preparation step); ``config.manual_dir`` points TFDS at files
    downloaded by hand (Cars: the Stanford archives). Any failure to open the data
    becomes one ``DataError`` line.
    """
    import tensorflow_datasets as tfds

    kwargs: dict[str, Any] = {}
    if config.manual_dir:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=config.manual_dir)
        }
    split_names = [s for s in (benchmark.tfds_train_split, benchmark.tfds_test_split) if s]
    sources = {}
    try:
        for split in split_names:
            sources[split] = tfds.data_source(
                benchmark.tfds_name,
                split=split,
                data_dir=config.data_dir or None,
                download=bool(config.download),
                **kwargs,
            )
    except Exception as error:  # TFDS raises many types (missing files, network, format)
        raise DataError(missing_message(benchmark, config, error)) from error
    first = sources[split_names[0]]
    lookup = label_lookup(benchmark, first.dataset_info.features["label"].names)
    size = config.stored_size or benchmark.image_size
    train = read_split(sources[benchmark.tfds_train_split], lookup, size, benchmark.channels)
    if not benchmark.tfds_test_split:
        return RawData(*train, None, None)
    test = read_split(sources[benchmark.tfds_test_split], lookup, size, benchmark.channels)
    return RawData(*train, *test)
