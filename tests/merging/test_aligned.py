"""PAM (aligned merging) against NumPy: the top-p importance mask (ties, p = 0 and 1), the
sign-conflict reset to zero or to the global value, the surrogate penalty and its gradient,
the running / fixed-weight average over a stream; plus zero global weights, jit and the
error paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.errors import ConfigError
from trm_jax.merging import aligned
from trm_jax.merging.task_vectors import NonFiniteError, TreeMismatchError

SHAPES = {"w": (6, 4), "b": (5,), "s": ()}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(rng, scale=1.0, quantize=False):
    def leaf(s):
        x = scale * rng.normal(size=s)
        return jnp.asarray(np.round(x * 2) / 2 if quantize else x, jnp.float32)

    return jax.tree.map(leaf, SHAPES, is_leaf=_is_shape)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_top(x, p):
    a = np.abs(x).reshape(-1)
    k = int(np.floor(p * a.size))
    if k == 0:
        return np.zeros(x.shape, bool)
    thr = np.sort(a)[::-1][k - 1]
    return (a >= thr).reshape(x.shape)


def np_align(x, g, b, p, reset):
    out, count = {}, 0
    for k in x:
        tau, gd = x[k] - b[k], g[k] - b[k]
        conflict = np_top(gd, p) & (tau * gd < 0)
        count += conflict.sum()
        out[k] = np.where(conflict, b[k] if reset == "zero" else g[k], x[k])
    return out, count


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("quantize", [False, True])
def test_importance_mask(p, quantize):
    rng = np.random.default_rng(0)
    g = _tree(rng, quantize=quantize)
    got = aligned.importance_mask(g, p)
    for k in g:
        np.testing.assert_array_equal(np.asarray(got[k]), np_top(np.asarray(g[k]), p), err_msg=k)


@pytest.mark.parametrize("reset", ["zero", "global"])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_align_matches_reference(reset, p):
    rng = np.random.default_rng(1)
    base, glob, params = _tree(rng), _tree(rng), _tree(rng)
    glob = jax.tree.map(jnp.add, base, glob)
    params = jax.tree.map(jnp.add, base, params)
    got, count = aligned.align(params, glob, base, p=p, reset=reset, return_count=True)
    want, want_count = np_align(_np(params), _np(glob), _np(base), p, reset)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=1e-6, atol=1e-6)
    assert int(count) == want_count > 0
    again, second = aligned.align(got, glob, base, p=p, reset=reset, return_count=True)
    assert int(second) == 0  # idempotent: nothing conflicts any more
    for k in got:
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(got[k]))
    # A precomputed mask gives the same result; so does jit with a traced p.
    gdelta = jax.tree.map(jnp.subtract, glob, base)
    masked = aligned.align(params, glob, base, reset=reset, mask=aligned.importance_mask(gdelta, p))
    jitted = jax.jit(lambda a, g, b, q: aligned.align(a, g, b, p=q, reset=reset))(
        params, glob, base, p
    )
    for k in got:
        np.testing.assert_array_equal(np.asarray(masked[k]), np.asarray(got[k]))
        np.testing.assert_array_equal(np.asarray(jitted[k]), np.asarray(got[k]))


def test_zero_global_and_zero_task_deltas_never_conflict():
    rng = np.random.default_rng(2)
    base, params = _tree(rng), _tree(rng)
    _, count = aligned.align(params, base, base, p=1.0, return_count=True)  # tau_bar = 0
    assert int(count) == 0
    glob = jax.tree.map(jnp.add, base, _tree(rng))
    _, count = aligned.align(base, glob, base, p=1.0, return_count=True)  # tau = 0
    assert int(count) == 0


def test_penalty_value_and_gradient():
    rng = np.random.default_rng(3)
    base = _tree(rng)
    glob = jax.tree.map(jnp.add, base, _tree(rng))
    params = jax.tree.map(jnp.add, base, _tree(rng))
    val = aligned.alignment_penalty(params, glob, base, p=0.5)
    x, g, b = _np(params), _np(glob), _np(base)
    want = 0.0
    for k in x:
        tau, gd = x[k] - b[k], g[k] - b[k]
        want += np.sum(np.where(np_top(gd, 0.5), np.maximum(-np.sign(gd) * tau, 0) ** 2, 0))
    np.testing.assert_allclose(float(val), want, rtol=1e-5)
    grads = jax.grad(lambda q: aligned.alignment_penalty(q, glob, base, p=0.5))(params)
    for k in x:
        conflict = np_top(g[k] - b[k], 0.5) & ((x[k] - b[k]) * (g[k] - b[k]) < 0)
        np.testing.assert_array_equal(np.asarray(grads[k]) != 0, conflict)
    aligned_params = aligned.align(params, glob, base, p=0.5)
    assert float(aligned.alignment_penalty(aligned_params, glob, base, p=0.5)) == 0.0


@pytest.mark.parametrize("weight", [0.0, 0.5, 0.25])
def test_stream_average(weight):
    rng = np.random.default_rng(4)
    base = _tree(rng)
    taus = [_tree(rng) for _ in range(3)]
    state, ref = aligned.init(base), None
    for t, tau in enumerate(taus):
        merged, state = aligned.merge_step(
            base, state, jax.tree.map(jnp.add, base, tau), weight=weight
        )
        tn = _np(tau)
        if t == 0:
            ref = tn
        elif weight == 0:
            ref = {k: (t * ref[k] + tn[k]) / (t + 1) for k in tn}
        else:
            ref = {k: (1 - weight) * ref[k] + weight * tn[k] for k in tn}
        for k in tn:
            np.testing.assert_allclose(np.asarray(state.delta[k]), ref[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(merged[k], _np(base)[k] + ref[k], rtol=1e-5, atol=1e-5)
    if weight == 0:  # the running mean is the plain average of the task vectors
        for k in base:
            mean = np.mean([np.asarray(t[k], np.float64) for t in taus], axis=0)
            np.testing.assert_allclose(np.asarray(state.delta[k]), mean, rtol=1e-5, atol=1e-6)


def test_dtypes_and_errors():
    rng = np.random.default_rng(5)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(rng))
    out = aligned.align(base, base, base)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    state = aligned.init(base)
    with pytest.raises(ValueError, match="no task merged"):
        aligned.result(base, state)
    with pytest.raises(ConfigError, match="reset"):
        aligned.align(base, base, base, reset="random")
    with pytest.raises(ConfigError, match="align_fraction"):
        aligned.importance_mask(base, 1.5)
    with pytest.raises(ConfigError, match="merge_weight"):
        aligned.update(state, base, weight=2.0)
    with pytest.raises(TreeMismatchError):
        aligned.align(base, {"w": base["w"]}, base)
    bad = dict(base, b=base["b"].at[0].set(jnp.inf))
    with pytest.raises(NonFiniteError):
        aligned.update(state, bad)
    assert aligned.default_config().align_fraction == 0.5
