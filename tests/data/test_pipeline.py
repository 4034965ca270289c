"""Batches (determinism, coverage, multi-host rows, padding) and the JAX preprocess vs PIL."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from trm_jax.data import pipeline
from trm_jax.errors import ConfigError


def _data(n=50):
    images = np.zeros((n, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images, (np.arange(n) * 7 % 10).astype(np.int64)


def _epoch(images, labels, **kw):
    return list(pipeline.batches(images, labels, kw.pop("batch_size", 8), **kw))


def test_epoch_covers_every_example_once_with_matching_labels():
    images, labels = _data()
    out = _epoch(images, labels, shuffle=True, seed=3)
    assert [len(b["label"]) for b in out] == [8] * 6 + [2]
    ids = np.concatenate([b["image"][:, 0, 0, 0] for b in out]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(50))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in out]), labels[ids])
    assert out[0]["label"].dtype == np.int32 and out[0]["image"].dtype == np.uint8
    # The order is the documented (seed, epoch) permutation.
    np.testing.assert_array_equal(ids, np.random.default_rng([3, 0]).permutation(50))


def test_same_seed_same_batches_other_seed_or_epoch_other():
    images, labels = _data()
    ids = lambda **kw: np.concatenate(
        [b["image"][:, 0, 0, 0] for b in _epoch(images, labels, shuffle=True, **kw)]
    )
    np.testing.assert_array_equal(ids(seed=1, epoch=2), ids(seed=1, epoch=2))
    np.testing.assert_array_equal(
        ids(seed=1, epoch=2, num_threads=0), ids(seed=1, epoch=2, num_threads=4)
    )
    assert not np.array_equal(ids(seed=1, epoch=2), ids(seed=2, epoch=2))
    assert not np.array_equal(ids(seed=1, epoch=2), ids(seed=1, epoch=3))
    np.testing.assert_array_equal(
        np.concatenate([b["image"][:, 0, 0, 0] for b in _epoch(images, labels, shuffle=False)]),
        np.arange(50),
    )


def test_drop_and_pad_remainder():
    images, labels = _data()
    assert [
        len(b["label"]) for b in _epoch(images, labels, shuffle=False, drop_remainder=True)
    ] == [8] * 6
    padded = _epoch(images, labels, shuffle=False, pad_remainder=True)
    last = padded[-1]
    assert len(padded) == 7 and all(b["image"].shape[0] == 8 for b in padded)
    np.testing.assert_array_equal(last["mask"], [True, True] + [False] * 6)
    np.testing.assert_array_equal(last["image"][:2, 0, 0, 0], [48, 49])
    assert not last["image"][2:].any() and not last["label"][2:].any()
    assert sum(int(b["mask"].sum()) for b in padded) == 50
    assert pipeline.num_batches(50, 8, drop_remainder=False) == 7


def test_hosts_split_each_global_batch():
    images, labels = _data()
    single = _epoch(images, labels, shuffle=True, seed=5, drop_remainder=True)
    hosts = [
        _epoch(
            images,
            labels,
            shuffle=True,
            seed=5,
            drop_remainder=True,
            process_index=p,
            process_count=4,
        )
        for p in range(4)
    ]
    assert all(len(h) == len(single) for h in hosts)
    for b, glob in enumerate(single):
        joined = np.concatenate([h[b]["image"] for h in hosts])
        np.testing.assert_array_equal(joined, glob["image"])
        assert hosts[1][b]["image"].shape[0] == 2
    padded = [
        _epoch(images, labels, shuffle=False, pad_remainder=True, process_index=p, process_count=2)
        for p in range(2)
    ]
    np.testing.assert_array_equal(padded[0][-1]["mask"], [True, True, False, False])
    np.testing.assert_array_equal(padded[1][-1]["mask"], [False] * 4)
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        _epoch(images, labels, shuffle=False, drop_remainder=True, process_count=3)
    with pytest.raises(ValueError, match="drop_remainder=True or pad_remainder=True"):
        _epoch(images, labels, shuffle=False, process_count=2)


# --------------------------------------------------------------------------- preprocess


def _pil_box_resize(image_u8, box, size):
    """Reference: PIL bilinear resize of ``box`` (top, left, h, w) per channel, float32 mode."""
    top, left, h, w = (float(v) for v in box)
    planes = [
        np.asarray(
            Image.fromarray(image_u8[..., k].astype(np.float32) / 255.0, mode="F").resize(
                (size, size), Image.BILINEAR, box=(left, top, left + w, top + h)
            )
        )
        for k in range(image_u8.shape[-1])
    ]
    return np.stack(planes, axis=-1)


@pytest.mark.parametrize("shape,size", [((28, 28, 1), 32), ((32, 32, 3), 96), ((40, 60, 3), 24)])
def test_eval_preprocess_matches_pil(shape, size):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    channels = shape[-1]
    pre = jax.jit(pipeline.make_preprocess(size, channels, "clip"))
    out = np.asarray(pre(images))
    h, w = shape[:2]
    side = min(h, w)
    box = ((h - side) / 2, (w - side) / 2, side, side)
    mean, std = pipeline.normalization_stats("clip", channels)
    ref = (np.stack([_pil_box_resize(im, box, size) for im in images]) - mean) / std
    assert out.shape == (2, size, size, channels) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-4)


def test_channel_conversion():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)  # [B, H, W] accepted
    rgb = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ends = np.array([[[[0, 255, 0]] * 4] * 4], np.uint8)
    to_rgb = pipeline.make_preprocess(16, 3, "unit")
    to_gray = pipeline.make_preprocess(16, 1, "inception")
    inception = pipeline.make_preprocess(4, 3, "inception")
    outs = jax.jit(lambda g, c, e: (to_rgb(g), to_gray(c), inception(e)))(gray, rgb, ends)
    out, luma, ext = (np.asarray(o) for o in outs)
    np.testing.assert_allclose(out, np.repeat(gray[..., None] / 255.0, 3, axis=-1), atol=1e-6)
    ref = (rgb / 255.0 @ np.array([0.299, 0.587, 0.114]))[..., None]
    np.testing.assert_allclose(luma, (ref - 0.5) / 0.5, atol=1e-5)
    # Inception normalisation maps 0 -> -1 and 255 -> 1.
    np.testing.assert_allclose(ext[0, 0, 0], [-1, 1, -1], atol=1e-6)


def test_train_preprocess_matches_pil_crop_and_flip():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 40, 36, 3), dtype=np.uint8)
    pre = pipeline.make_preprocess(20, 3, "unit", crop_scale=(0.3, 1.0))

    @jax.jit
    def run(x, k):  # one compilation for everything the test compares
        return (
            pre(x, k, train=True),
            pipeline.boxes_for(k, 6, 40, 36, (0.3, 1.0)),
            pipeline.flips_for(k, 6),
            pre(x, k),
            pre(x),
        )

    out, boxes, flips, eval_with_key, eval_plain = (
        np.asarray(o) for o in run(images, jax.random.key(7))
    )
    ref = np.stack([_pil_box_resize(im, b, 20) for im, b in zip(images, boxes, strict=False)])
    ref = np.where(flips[:, None, None, None], ref[:, :, ::-1], ref)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    assert 0 < flips.sum() < 6  # both branches exercised with this key
    np.testing.assert_array_equal(out, np.asarray(run(images, jax.random.key(7))[0]))
    assert not np.allclose(out, np.asarray(run(images, jax.random.key(8))[0]))
    # Eval ignores the key and never augments.
    np.testing.assert_array_equal(eval_with_key, eval_plain)


def test_crop_boxes_stay_inside_and_respect_scale():
    draw = jax.jit(lambda k: pipeline.crop_boxes(k, 2000, 30, 50, (0.2, 0.6), (0.5, 2.0)))
    boxes = np.asarray(draw(jax.random.key(0)))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 30 + 1e-4).all() and (left + w <= 50 + 1e-4).all()
    area = h * w / (30 * 50)
    unclipped = (h < 30) & (w < 50)
    assert (area[unclipped] >= 0.2 - 1e-5).all() and (area <= 0.6 + 1e-5).all()
    assert abs(np.median(area[unclipped]) - 0.4) < 0.05


def test_preprocess_traces_once_per_shape_and_rejects_bad_config():
    pre = pipeline.make_preprocess(8, 3, "clip")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, key):
        return jnp.mean(pre(x, key, train=True))

    x = np.zeros((4, 10, 10, 3), np.uint8)
    for i in range(3):
        step(x, jax.random.key(i))
    with pytest.raises(
        ConfigError, match="unknown normalization 'vgg'; choose one of: clip, inception"
    ):
        pipeline.make_preprocess(8, 3, "vgg")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        pre(x, train=True)
