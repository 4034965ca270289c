"""Input pipeline: numpy batches prefetched in the background, and on-device preprocessing.

``batches`` cuts a split into (global) batches from a permutation that depends only on
``(seed, epoch)``; each host keeps its own contiguous rows of every global batch, so a
multi-host run sees exactly the batches a single host would. Batches are gathered by
grain worker threads ahead of the consumer (vectorised numpy fancy-indexing per batch,
not per example), so the device is not kept waiting for Python.

``make_preprocess`` returns a pure JAX function meant to run inside the jitted train and
eval steps: uint8 in, float32 out, so only uint8 crosses the host-to-device link.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.errors import ConfigError, DataError

# Per-channel (mean, std) on [0, 1] pixels.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # OpenAI CLIP's preprocessing.
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    # [-1, 1]: Inception-style, used by the big_vision / AugReg ViT checkpoints.
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # torchvision ImageNet statistics.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Plain [0, 1].
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

# ITU-R BT.601 luma, the weights PIL uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- batches


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Example order of one epoch: a permutation drawn from ``(seed, epoch)`` or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def num_batches(n: int, batch_size: int, *, drop_remainder: bool) -> int:
    """Global batches per epoch for ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_indices(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    drop_remainder: bool,
    process_index: int = 0,
    process_count: int = 1,
    pad_remainder: bool = False,
) -> list[np.ndarray]:
    """This host's example indices of every batch of one epoch (-1 marks padding rows).

    ``batch_size`` is global; host ``p`` of ``P`` takes rows ``p*b/P .. (p+1)*b/P`` of
    each global batch. A short last batch is kept as is (one host), padded to full size
    with -1 (``pad_remainder``), or dropped (``drop_remainder``).
    """
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in 0..{process_count - 1}")
    if process_count > 1 and not (drop_remainder or pad_remainder):
        raise ValueError("multi-host batches need drop_remainder=True or pad_remainder=True")
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    per_host = batch_size // process_count
    out = []
    for b in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
        rows = order[b * batch_size : (b + 1) * batch_size]
        if pad_remainder and len(rows) < batch_size:
            rows = np.concatenate([rows, np.full(batch_size - len(rows), -1, rows.dtype)])
        if process_count > 1:
            rows = rows[process_index * per_host : (process_index + 1) * per_host]
        out.append(rows)
    return out


def _gather(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, pad: bool) -> dict:
    if not pad:
        return {"image": images[rows], "label": labels[rows].astype(np.int32)}
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    image = images[safe]
    image[~valid] = 0
    label = np.where(valid, labels[safe], 0).astype(np.int32)
    return {"image": image, "label": label, "mask": valid}


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    pad_remainder: bool = False,
    prefetch: int = 4,
    num_threads: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of numpy batches ``{'image': uint8, 'label': int32}``, prefetched.

    Deterministic for ``(seed, epoch)`` and independent of ``prefetch``/``num_threads``.
    ``pad_remainder`` fills the last batch to ``batch_size`` with zero rows and adds
    ``'mask'`` (bool, False on padding): every batch then has one shape, so jitted steps
    compile once, and evaluation can still count each example exactly once.
    ``prefetch`` batches are gathered ahead by ``num_threads`` grain threads
    (``num_threads=0``: gathered on demand in the caller's thread).
    """
    import grain

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    index = batch_indices(
        len(labels),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
        pad_remainder=pad_remainder,
    )
    dataset = grain.MapDataset.source(index).map(
        lambda rows: _gather(images, labels, rows, pad_remainder)
    )
    if num_threads <= 0:
        return iter(dataset)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1))
    return iter(dataset.to_iter_dataset(options))


# --------------------------------------------------------------------------- preprocessing


def normalization_stats(normalization: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 ``[channels]``; one channel takes the luma-weighted average."""
    if normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalization {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}"
        )
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[normalization])
    if channels == 1:
        luma = np.asarray(_LUMA, np.float32)
        mean, std = np.array([mean @ luma]), np.array([std @ luma])
    return mean.astype(np.float32), std.astype(np.float32)


def crop_boxes(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """Random-resized-crop boxes ``[batch, 4]`` as (top, left, height, width), float32.

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio`` (as in
    torchvision / Inception), clipped to the image (one draw, no rejection loop, so it
    stays a fixed-shape jittable computation), position uniform over the valid range.
    Coordinates are continuous pixel-edge coordinates.
    """
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (batch,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(
        k_ratio, (batch,), minval=np.log(ratio[0]), maxval=np.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)  # width / height
    crop_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    crop_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    top = jax.random.uniform(k_y, (batch,)) * (height - crop_h)
    left = jax.random.uniform(k_x, (batch,)) * (width - crop_w)
    return jnp.stack([top, left, crop_h, crop_w], axis=-1).astype(jnp.float32)


def center_boxes(batch: int, height: int, width: int) -> jax.Array:
    """Centre-square boxes ``[batch, 4]`` (top, left, side, side): the evaluation view."""
    side = float(min(height, width))
    box = jnp.array([(height - side) / 2, (width - side) / 2, side, side], jnp.float32)
    return jnp.broadcast_to(box, (batch, 4))


def resize_boxes(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Crops float ``[B, h, w, c]`` to ``boxes`` and resizes each crop to ``size x size``.

    One ``jax.image.scale_and_translate`` per image (bilinear, antialiased when
    shrinking): pixel-edge coordinate ``u`` of the box maps to ``(u - top) * size / box_h``.
    Matches PIL's ``Image.resize(..., BILINEAR, box=...)``.
    """
    channels = images.shape[-1]

    def one(image, box):
        scale = size / box[2:]
        translation = -box[:2] * scale
        return jax.image.scale_and_translate(
            image, (size, size, channels), (0, 1), scale, translation, "linear", antialias=True
        )

    return jax.vmap(one)(images, boxes)


def make_preprocess(
    image_size: int,
    channels: int,
    normalization: str,
    *,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
):
    """Builds ``preprocess(images, key=None, *, train=False)`` for one backbone input.

    uint8 ``[B, h, w, c]`` (or ``[B, h, w]``) of any size and 1 or 3 channels ->
    float32 ``[B, image_size, image_size, channels]``, normalised per ``normalization``
    (``NORMALIZATIONS``). Eval (``train=False``): centre square resized. Train: a random
    resized crop (``crop_scale``, ``crop_ratio``) and a horizontal flip with probability
    1/2 (``flip``), both drawn from ``key``. Pure JAX, so it fuses into jitted steps.
    Gray -> 3 channels repeats the plane; 3 -> 1 takes the BT.601 luma.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    mean, std = normalization_stats(normalization, channels)

    def preprocess(
        images: jax.Array, key: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        images = jnp.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        batch, height, width, in_channels = images.shape
        if in_channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {in_channels}")
        x = images.astype(jnp.float32) / 255.0
        if train:
            if key is None:
                raise ValueError("train=True needs a PRNG key")
            k_crop, k_flip = jax.random.split(key)
            boxes = crop_boxes(k_crop, batch, height, width, crop_scale, crop_ratio)
        else:
            boxes = center_boxes(batch, height, width)
        x = resize_boxes(x, boxes, image_size)
        if train and flip:
            flips = jax.random.bernoulli(k_flip, 0.5, (batch,))
            x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
        if in_channels == 1 and channels == 3:
            x = jnp.repeat(x, 3, axis=-1)
        elif in_channels == 3 and channels == 1:
            x = x @ jnp.asarray(_LUMA, jnp.float32)[:, None]
        return (x - mean) / std

    return preprocess


def flips_for(key: jax.Array, batch: int) -> jax.Array:
    """The flip decisions ``preprocess(..., key, train=True)`` draws (for tests and debugging)."""
    _, k_flip = jax.random.split(key)
    return jax.random.bernoulli(k_flip, 0.5, (batch,))


def boxes_for(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """The crop boxes ``preprocess(..., key, train=True)`` draws (for tests and debugging)."""
    k_crop, _ = jax.random.split(key)
    return crop_boxes(k_crop, batch, height, width, scale, ratio)


__all__: Sequence[str] = (
    "NORMALIZATIONS",
    "batch_indices",
    "batches",
    "boxes_for",
    "center_boxes",
    "crop_boxes",
    "epoch_order",
    "flips_for",
    "make_preprocess",
    "normalization_stats",
    "num_batches",
    "resize_boxes",
)


def endless_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, *, what: str = "data"
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches, epoch after epoch, for as long as the caller draws
    (deterministic for ``seed``: epoch ``e`` is ``batches(..., seed=seed, epoch=e)``).

    Raises ``DataError`` naming ``what`` when an epoch yields no batch (fewer examples than
    ``batch_size``), instead of looping forever over empty epochs.
    """
    epoch = 0
    while True:
        n = 0
        for batch in batches(
            images, labels, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True
        ):
            n += 1
            yield batch
        if n == 0:
            raise DataError(
                f"{what}: {len(labels)} examples cannot fill one batch of {batch_size}; "
                "lower the batch size"
            )
        epoch += 1
