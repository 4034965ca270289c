"""Class heads against numpy references."""

import jax
import numpy as np
import pytest

from trm_jax.errors import CheckpointError, DataError
from trm_jax.models import heads


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototype_rows_match_numpy():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6)).astype(np.float32) * rng.uniform(0.1, 10, size=(40, 1))
    labels = rng.integers(0, 5, size=40)
    classes = [3, 1, 4]
    rows = np.asarray(heads.prototype_rows(feats, labels, classes))
    for i, c in enumerate(classes):
        expected = _unit(_unit(feats[labels == c]).mean(0))
        np.testing.assert_allclose(rows[i], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"\[7\]"):
        heads.prototype_rows(feats, labels, [1, 7])


def test_cosine_and_linear_logits():
    rng = np.random.default_rng(1)
    f, r = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    np.testing.assert_allclose(
        heads.cosine_logits(f, r, 30.0), 30.0 * _unit(f) @ _unit(r).T, rtol=1e-5
    )
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    np.testing.assert_allclose(heads.linear_logits(f, w, b), f @ w.T + b, rtol=1e-5)
    init = heads.linear_init(3, 6)
    assert init["w"].shape == (3, 6) and not np.any(init["w"]) and not np.any(init["b"])
    apply_fn = heads.cosine_apply_fn(lambda p, x: x @ p, r, 10.0)
    p = rng.normal(size=(6, 6))
    np.testing.assert_allclose(jax.jit(apply_fn)(p, f), 10.0 * _unit(f @ p) @ _unit(r).T, rtol=1e-5)


def test_load_rows_checks(tmp_path):
    rows = np.arange(12, dtype=np.float64).reshape(3, 4)
    path = str(tmp_path / "rows.npy")
    heads.save_rows(path, rows)
    np.testing.assert_array_equal(heads.load_rows(path, num_classes=3, feature_dim=4), rows)
    with pytest.raises(CheckpointError, match=r"expected float \[3, 5\]"):
        heads.load_rows(path, num_classes=3, feature_dim=5)
    np.save(tmp_path / "ints.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(CheckpointError, match="dtype int32"):
        heads.load_rows(str(tmp_path / "ints.npy"))
    with pytest.raises(CheckpointError, match="not found"):
        heads.load_rows(str(tmp_path / "absent.npy"))
