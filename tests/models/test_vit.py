"""ViT: npz round trip, loud key checks, position-embedding resampling, derivatives."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import models
from trm_jax.errors import CheckpointError
from trm_jax.models import common, loaders, vit

POSEMB = "Transformer/posembed_input/pos_embedding"


def _flat_np(params):
    return {k: np.asarray(v) for k, v in common.flatten(params).items()}


def test_npz_round_trip_identical(tiny_vit, tmp_path):
    path = str(tmp_path / "ViT-tiny.npz")
    written = loaders.create_checkpoint(tiny_vit, path, seed=3, num_classes=10)
    with np.load(path) as f:
        assert "head/kernel" in f.files and f["head/kernel"].shape == (32, 10)
        assert f[POSEMB].shape == (1, 17, 32)
    loaded = loaders.load_vit_npz(path, tiny_vit)
    assert jax.tree.structure(loaded) == jax.tree.structure(written)
    for name, value in _flat_np(written).items():
        np.testing.assert_array_equal(np.asarray(common.flatten(loaded)[name]), value)
    # and through the config-driven builder
    cfg = models.default_config()
    cfg.update(
        checkpoint=path,
        image_size=32,
        patch_size=8,
        channels=3,
        width=32,
        depth=2,
        heads=4,
        mlp_dim=64,
    )
    backbone = models.build(cfg, key=jax.random.key(0))
    chex.assert_trees_all_equal(backbone.params, written)


def _rewrite(src, dst, edit):
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_missing_extra_misshaped_keys_are_listed(tiny_vit, tmp_path):
    src = str(tmp_path / "ok.npz")
    loaders.create_checkpoint(tiny_vit, src)
    bad = str(tmp_path / "bad.npz")
    gone = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"

    _rewrite(src, bad, lambda a: a.pop(gone))
    with pytest.raises(CheckpointError, match=f"missing 1 \\[{gone}\\]") as err:
        loaders.load_vit_npz(bad, tiny_vit)
    message = str(err.value).split(": ", 1)[1]  # after "checkpoint <path> does not match ..."
    assert "extra" not in message and "mis-shaped" not in message and "\n" not in message

    _rewrite(
        src,
        bad,
        lambda a: a.update(
            {"Transformer/encoderblock_2/LayerNorm_0/scale": np.ones(32, np.float32)}
        ),
    )
    with pytest.raises(CheckpointError, match="extra 1 .*encoderblock_2/LayerNorm_0/scale"):
        loaders.load_vit_npz(bad, tiny_vit)

    _rewrite(src, bad, lambda a: a.update({"cls": np.zeros((1, 1, 16), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped 1 \[cls file \(1, 1, 16\) vs model "
        r"\(1, 1, 32\)\]",
    ):
        loaders.load_vit_npz(bad, tiny_vit)

    # a deeper model reads the file: 2 missing blocks, 32 names, counted and truncated
    deeper = models.get(
        "vit_tiny", image_size=32, patch_size=8, channels=3, width=32, depth=4, heads=4, mlp_dim=64
    )
    with pytest.raises(CheckpointError, match=r"missing 32 \[.*and 20 more\]"):
        loaders.load_vit_npz(src, deeper)


def test_hints_pre_logits_and_channels(tiny_vit, tmp_path):
    src = str(tmp_path / "ok.npz")
    loaders.create_checkpoint(tiny_vit, src)
    bad = str(tmp_path / "pre.npz")
    _rewrite(
        src,
        bad,
        lambda a: a.update(
            {
                "pre_logits/kernel": np.zeros((32, 32), np.float32),
                "pre_logits/bias": np.zeros(32, np.float32),
            }
        ),
    )
    with pytest.raises(CheckpointError, match="representation_size"):
        loaders.load_vit_npz(bad, tiny_vit)
    with_rep = models.get(
        "vit_tiny",
        image_size=32,
        patch_size=8,
        channels=3,
        width=32,
        depth=2,
        heads=4,
        mlp_dim=64,
        representation_size=32,
    )
    assert common.flatten(loaders.load_vit_npz(bad, with_rep))["pre_logits/kernel"].shape == (
        32,
        32,
    )
    gray = models.get(
        "vit_tiny", image_size=32, patch_size=8, channels=1, width=32, depth=2, heads=4, mlp_dim=64
    )
    with pytest.raises(CheckpointError, match="mis-shaped.*embedding/kernel.*channels=3"):
        loaders.load_vit_npz(src, gray)


def test_opt_target_prefix_and_unreadable_files(tiny_vit, tmp_path):
    src = str(tmp_path / "ok.npz")
    written = loaders.create_checkpoint(tiny_vit, src)
    wrapped = str(tmp_path / "opt.npz")
    _rewrite(
        src,
        wrapped,
        lambda a: a.update(
            {**{f"opt/target/{k}": a.pop(k) for k in list(a)}, "opt/state/step": np.zeros(())}
        ),
    )
    chex.assert_trees_all_equal(loaders.load_vit_npz(wrapped, tiny_vit), written)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="cannot read"):
        loaders.load_vit_npz(str(junk), tiny_vit)
    with pytest.raises(CheckpointError, match="not found"):
        loaders.load_vit_npz(str(tmp_path / "absent.npz"), tiny_vit)


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Reference 1-D linear resampling (half-pixel centres; the triangle kernel widened by
    the shrink factor when downsampling, i.e. antialiased), rows normalised."""
    scale = n_out / n_in
    width = max(1.0 / scale, 1.0)
    centres = (np.arange(n_out) + 0.5) / scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(n_in)[None, :]) / width)
    return w / w.sum(1, keepdims=True)


@pytest.mark.parametrize("old,new", [(4, 4), (2, 3), (6, 2), (14, 2)])
def test_resample_posemb_matches_reference(old, new):
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 1 + old * old, 5)).astype(np.float32)
    out = np.asarray(common.resample_posemb(posemb, new))
    assert out.shape == (1, 1 + new * new, 5)
    np.testing.assert_array_equal(out[:, 0], posemb[:, 0])  # class row untouched
    m = _linear_resize_matrix(old, new)
    grid = posemb[0, 1:].reshape(old, old, 5)
    expected = np.einsum("ai,bj,ijd->abd", m, m, grid).reshape(new * new, 5)
    np.testing.assert_allclose(out[0, 1:], expected, rtol=1e-5, atol=1e-6)


def test_npz_posemb_resampled_on_load(tiny_vit, tmp_path):
    path = str(tmp_path / "ViT-tiny-32px.npz")
    written = loaders.create_checkpoint(tiny_vit, path)
    small = models.get(
        "vit_tiny", image_size=16, patch_size=8, channels=3, width=32, depth=2, heads=4, mlp_dim=64
    )
    loaded = common.flatten(loaders.load_vit_npz(path, small))
    src = np.asarray(common.flatten(written)[POSEMB])
    assert loaded[POSEMB].shape == (1, 5, 32)
    np.testing.assert_allclose(loaded[POSEMB], common.resample_posemb(src, 2), rtol=0, atol=0)
    m = _linear_resize_matrix(4, 2)
    expected = np.einsum("ai,bj,ijd->abd", m, m, src[0, 1:].reshape(4, 4, 32)).reshape(4, 32)
    np.testing.assert_allclose(loaded[POSEMB][0, 1:], expected, rtol=1e-5, atol=1e-6)
    # every other tensor is untouched
    for name, value in common.flatten(written).items():
        if name != POSEMB:
            np.testing.assert_array_equal(loaded[name], value)


def test_bad_posemb_row_count_is_reported(tiny_vit, tmp_path):
    src = str(tmp_path / "ok.npz")
    loaders.create_checkpoint(tiny_vit, src)
    bad = str(tmp_path / "bad.npz")
    _rewrite(src, bad, lambda a: a.update({POSEMB: np.zeros((1, 15, 32), np.float32)}))
    with pytest.raises(CheckpointError, match="mis-shaped 1 .*pos_embedding file \\(1, 15, 32\\)"):
        loaders.load_vit_npz(bad, tiny_vit)


MICRO = dict(image_size=16, patch_size=8, channels=3, width=16, depth=1, heads=2, mlp_dim=32)


def test_input_checks_and_bfloat16():
    gray = models.get("vit_tiny")
    with pytest.raises(ValueError, match=r"expects images \[B, 28, 28, 1\]"):
        vit.make_features_fn(gray)(models.param_shapes(gray), jnp.zeros((4, 32, 32, 3)))
    f32 = models.init(models.get("vit_tiny", **MICRO), key=jax.random.key(0))
    bf16 = models.make_backbone(models.get("vit_tiny", **MICRO, dtype="bfloat16"), f32.params)
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
    ref = jax.jit(f32.features_fn)(f32.params, x)
    out = jax.jit(bf16.features_fn)(bf16.params, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
    assert not np.allclose(out, ref, atol=1e-6)  # bfloat16 really was used


def test_second_order_derivative_matches_finite_differences():
    """d/dθ ||∇_θ ℓ(θ)||² (TRM's gradient-responsiveness term) vs central differences."""
    backbone = models.init(models.get("vit_tiny", **MICRO), key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    probe = jax.random.normal(jax.random.key(2), (16, 5))
    labels = jnp.array([0, 1, 2, 3])

    def loss(params):
        logits = backbone.features_fn(params, x) @ probe
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    def grad_norm_sq(params):
        return sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(loss)(params)))

    leaves, treedef = jax.tree.flatten(backbone.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = treedef.unflatten(
        [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )
    norm = jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    eps = 1e-2
    second = jax.jit(jax.grad(grad_norm_sq))(backbone.params)
    analytic = sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(direction), strict=True)
    )
    g = jax.jit(grad_norm_sq)
    shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, backbone.params, direction)
    numeric = (g(shift(1.0)) - g(shift(-1.0))) / (2 * eps)
    assert float(jnp.abs(analytic)) > 1e-3
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=3e-2)
