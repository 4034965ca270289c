"""BECAME against NumPy: the authors' batched Fisher (analytic gradients of a softmax
regression), the closed-form coefficient, the merge and the Fisher accumulation over a
stream, plus the degenerate denominators, the first task, jit and the error paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.errors import ConfigError
from trm_jax.merging import became
from trm_jax.merging.task_vectors import NonFiniteError, TreeMismatchError

RTOL, ATOL = 1e-5, 1e-7
D, C = 4, 5


def apply_linear(params, images):
    return images @ params["w"] + params["b"]


def _params(rng, scale=1.0):
    return {
        "w": jnp.asarray(scale * rng.normal(size=(D, C)), jnp.float32),
        "b": jnp.asarray(scale * rng.normal(size=(C,)), jnp.float32),
    }


def _batches(rng, sizes=(6, 3)):
    return [
        {
            "image": jnp.asarray(rng.normal(size=(n, D)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, C, size=n), jnp.int32),
        }
        for n in sizes
    ]


def _np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


# ------------------------------------------------------------------ NumPy references


def np_fisher(params, batches, mask=None, mode="true"):
    """sum_b B_b * (grad of the batch-mean CE)^2 / N, gradients written out by hand."""
    p = _np(params)
    keep = np.ones(C, bool) if mask is None else np.asarray(mask)
    acc = {"w": np.zeros((D, C)), "b": np.zeros(C)}
    total = 0
    for batch in batches:
        x = np.asarray(batch["image"], np.float64)
        z = np.where(keep, x @ p["w"] + p["b"], -np.inf)
        y = np.argmax(z, -1) if mode == "true" else np.asarray(batch["label"])
        e = np.exp(z - z.max(-1, keepdims=True))
        prob = e / e.sum(-1, keepdims=True)
        r = (prob - np.eye(C)[y]) / len(x)  # d mean-CE / d logits
        gw, gb = x.T @ r, r.sum(0)
        acc["w"] += len(x) * gw**2
        acc["b"] += len(x) * gb**2
        total += len(x)
    return {k: v / total for k, v in acc.items()}


def np_coef(old, new, f_new, f_old, keys=("w", "b"), fallback=0.5):
    o, n, fn, fo = _np(old), _np(new), _np(f_new), _np(f_old)
    num = sum(np.sum(fn[k] * (n[k] - o[k]) ** 2) for k in keys)
    den = sum(np.sum((fn[k] + fo[k]) * (n[k] - o[k]) ** 2) for k in keys)
    return num / den if den > 0 else fallback


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["true", "empirical"])
@pytest.mark.parametrize("masked", [False, True])
def test_fisher_matches_reference(mode, masked):
    rng = np.random.default_rng(0)
    params, batches = _params(rng), _batches(rng)
    mask = jnp.asarray([True, False, True, True, False]) if masked else None
    if masked and mode == "empirical":  # labels must lie in the mask
        for b in batches:
            b["label"] = jnp.asarray(rng.choice([0, 2, 3], size=b["label"].shape), jnp.int32)
    got = became.fisher_diag(apply_linear, params, batches, mask, label_mode=mode)
    want = np_fisher(params, batches, mask, mode)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-8, err_msg=k)
    if masked:  # masked-out classes get no gradient at all
        np.testing.assert_array_equal(np.asarray(got["w"])[:, [1, 4]], 0.0)


def test_coefficient_matches_reference_and_include():
    rng = np.random.default_rng(1)
    old, new = _params(rng), _params(rng)
    f_new = jax.tree.map(jnp.abs, _params(rng))
    f_old = jax.tree.map(jnp.abs, _params(rng))
    got = became.coefficient(old, new, f_new, f_old)
    np.testing.assert_allclose(float(got), np_coef(old, new, f_new, f_old), rtol=RTOL)
    assert 0.0 <= float(got) <= 1.0
    only_w = became.coefficient(old, new, f_new, f_old, include={"w": True, "b": False})
    np.testing.assert_allclose(float(only_w), np_coef(old, new, f_new, f_old, ("w",)), rtol=RTOL)
    jitted = jax.jit(lambda *a: became.coefficient(*a))(old, new, f_new, f_old)
    np.testing.assert_allclose(float(jitted), float(got), rtol=1e-6)


def test_coefficient_degenerate_cases():
    rng = np.random.default_rng(2)
    old, new = _params(rng), _params(rng)
    f = jax.tree.map(jnp.abs, _params(rng))
    zero = jax.tree.map(jnp.zeros_like, f)
    # No movement: 0/0, the fallback.
    assert float(became.coefficient(old, old, f, f, fallback=0.25)) == 0.25
    # No curvature anywhere: 0/0, the fallback.
    assert float(became.coefficient(old, new, zero, zero, fallback=0.75)) == 0.75
    # Old tasks without curvature: take the new model; new task without: keep the old one.
    np.testing.assert_allclose(float(became.coefficient(old, new, f, zero)), 1.0, rtol=1e-6)
    assert float(became.coefficient(old, new, zero, f)) == 0.0
    # Equal curvature: the midpoint.
    np.testing.assert_allclose(float(became.coefficient(old, new, f, f)), 0.5, rtol=1e-6)


def test_stream_matches_reference():
    rng = np.random.default_rng(3)
    state = became.init(_params(rng))
    f_acc = {"w": np.zeros((D, C)), "b": np.zeros(C)}
    merged_np, merged = None, None
    for t in range(3):
        batches = _batches(rng, sizes=(5, 4))
        if t == 0:
            theta_t = _params(rng)
        else:  # fine-tuned from the previous merged model
            theta_t = jax.tree.map(jnp.add, merged, _params(rng, 0.3))
        f_new = became.fisher_diag(apply_linear, theta_t, batches)
        old = merged if merged is not None else theta_t
        merged, coef = became.merge(state, old, theta_t, f_new)
        # reference
        fn = np_fisher(theta_t, batches)
        if t == 0:
            c_np, m_np = 1.0, _np(theta_t)
        else:
            c_np = np_coef(merged_np, theta_t, fn, f_acc)
            m_np = {k: (1 - c_np) * merged_np[k] + c_np * _np(theta_t)[k] for k in fn}
        np.testing.assert_allclose(float(coef), c_np, rtol=1e-5)
        for k in m_np:
            np.testing.assert_allclose(np.asarray(merged[k]), m_np[k], rtol=1e-5, atol=1e-6)
        f_m = became.fisher_diag(apply_linear, merged, batches)
        state = became.update(state, f_m, gamma=1.0)
        fm_np = np_fisher(m_np, batches)
        f_acc = {k: fm_np[k] + f_acc[k] for k in f_acc}
        for k in f_acc:
            np.testing.assert_allclose(np.asarray(state.fisher[k]), f_acc[k], rtol=1e-4, atol=1e-8)
        merged_np = m_np
    assert int(state.count) == 3


def test_first_task_and_fallback_one_over_t():
    rng = np.random.default_rng(4)
    theta = _params(rng)
    state = became.init(theta)
    f = jax.tree.map(jnp.abs, _params(rng))
    merged, coef = became.merge(state, _params(rng), theta, f)
    assert float(coef) == 1.0
    for k in theta:
        np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(theta[k]))
    state = became.update(became.update(state, f), f)  # two tasks merged
    zero = jax.tree.map(jnp.zeros_like, f)
    state = state._replace(fisher=zero)
    _, coef = became.merge(state, theta, _params(rng), zero)  # 0/0 at task 3
    np.testing.assert_allclose(float(coef), 1.0 / 3.0, rtol=1e-6)


def test_update_gamma_and_dtypes():
    rng = np.random.default_rng(5)
    like = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(rng))
    state = became.init(like)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.fisher))
    f1 = jax.tree.map(jnp.abs, _params(rng))
    f2 = jax.tree.map(jnp.abs, _params(rng))
    state = became.update(became.update(state, f1), f2, gamma=0.5)
    for k in f1:
        np.testing.assert_allclose(
            np.asarray(state.fisher[k]), np.asarray(f2[k]) + 0.5 * np.asarray(f1[k]), rtol=1e-6
        )
    merged, _ = became.merge(state, like, like, f1)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))


def test_errors():
    rng = np.random.default_rng(6)
    params = _params(rng)
    with pytest.raises(ConfigError, match="fisher_labels"):
        became.fisher_diag(apply_linear, params, _batches(rng), label_mode="sampled")
    with pytest.raises(ValueError, match="at least one batch"):
        became.fisher_diag(apply_linear, params, [])
    with pytest.raises(TreeMismatchError):
        became.coefficient(params, {"w": params["w"]}, params, params)
    state = became.update(became.init(params), jax.tree.map(jnp.abs, params))
    bad = {"w": params["w"].at[0, 0].set(jnp.inf), "b": params["b"]}
    with pytest.raises(NonFiniteError):
        became.merge(state, params, bad, jax.tree.map(jnp.abs, params))
    assert became.default_config().fisher_gamma == 1.0


def test_merge_task_matches_the_manual_pipeline():
    rng = np.random.default_rng(7)
    batches = _batches(rng, sizes=(4, 4))
    theta1 = _params(rng)
    config = became.default_config()
    state = became.init(theta1)
    m1, state, c1 = became.merge_task(state, theta1, theta1, apply_linear, batches, config=config)
    assert float(c1) == 1.0
    f1 = became.fisher_diag(apply_linear, theta1, batches)
    for k in f1:
        np.testing.assert_array_equal(np.asarray(state.fisher[k]), np.asarray(f1[k]))
    theta2 = jax.tree.map(jnp.add, m1, _params(rng, 0.3))
    m2, s2, c2 = became.merge_task(state, m1, theta2, apply_linear, lambda: iter(batches))
    f_new = became.fisher_diag(apply_linear, theta2, batches)
    want, coef = became.merge(state, m1, theta2, f_new)
    np.testing.assert_allclose(float(c2), float(coef), rtol=1e-6)
    for k in want:
        np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(want[k]), rtol=1e-6)
    f_m = became.fisher_diag(apply_linear, want, batches)
    for k in f_m:
        np.testing.assert_allclose(
            np.asarray(s2.fisher[k]), np.asarray(f_m[k]) + np.asarray(f1[k]), rtol=1e-5
        )
    config.exclude = "^b$"  # the coefficient's sums over 'w' only
    _, _, c3 = became.merge_task(state, m1, theta2, apply_linear, batches, config=config)
    only_w = became.coefficient(m1, theta2, f_new, state.fisher, include={"w": True, "b": False})
    np.testing.assert_allclose(float(c3), float(only_w), rtol=1e-6)
