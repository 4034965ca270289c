"""OPCM against a float64 NumPy transcription of fusion_bench's OPCMForCLIP loop, its
invariants (norm rescaling, P(Delta) = 0, transposition), the first task, zero task vectors,
frozen leaves, jit and the error paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.errors import ConfigError
from trm_jax.merging import opcm
from trm_jax.merging.task_vectors import TreeMismatchError
from trm_jax.tree_util import leaf_names

RTOL, ATOL = 2e-4, 2e-5  # float32 SVDs and matmuls of 6x6 matrices vs float64

SHAPES = {
    "attn": {
        "query": {"kernel": (6, 2, 3), "bias": (2, 3)},
        "out": {"kernel": (2, 3, 6), "bias": (6,)},
    },
    "mlp": {"kernel": (6, 5), "bias": (5,)},
    "embedding": {"kernel": (2, 2, 3, 6)},  # conv: not projected
    "class_embedding": (6,),
    "scale": (),
}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(rng, scale=1.0):
    leaf = lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32)
    return jax.tree.map(leaf, SHAPES, is_leaf=_is_shape)


def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------- NumPy reference


def np_split_rank(s, alpha):
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.cumsum(s) / np.sum(s)
    above = frac > alpha
    return int(np.argmax(above)) if above.any() else 0


def np_project(d, t, alpha):
    u, s, vh = np.linalg.svd(d, full_matrices=True)
    if s.sum() == 0:  # documented deviation: no principal directions, no projection
        return t
    k = np_split_rank(s, alpha)
    m = u.T @ t @ vh.T
    np.fill_diagonal(m, 0.0)
    m[:k, :k] = 0.0
    return u @ m @ vh


def np_opcm(base, taus, names, kinds, alpha):
    """theta_bar_t for every t, following OPCMForCLIP.run step by step."""
    delta, lam, norms, outs = None, 1.0, [], []
    for t, tau in enumerate(taus):
        norms.append(np.sqrt(sum(np.sum(x**2) for x in tau)))
        if t == 0:
            delta, lam = [x.copy() for x in tau], 1.0
        else:
            sums = []
            for name, kind, d, x in zip(names, kinds, delta, tau, strict=True):
                if kind == "linear":
                    shape = opcm.matrix_shape(name, x.shape)
                    p = np_project(d.reshape(shape), x.reshape(shape), alpha).reshape(x.shape)
                elif kind == "other":
                    p = x
                else:
                    p = np.zeros_like(x)
                sums.append(lam * d + p)
            total = np.sqrt(sum(np.sum(s**2) for s in sums))
            avg = np.mean(norms)
            lam = total / avg
            delta = [s * avg / total for s in sums]
        outs.append([b + d for b, d in zip(base, delta, strict=True)])
    return outs


def _run(base, taus, alpha=0.5, kinds=None):
    state, outs = opcm.init(base), []
    for tau in taus:
        state = opcm.update(state, tau, alpha=alpha, kinds=kinds)
        outs.append(opcm.result(base, state))
    return outs, state


# ----------------------------------------------------------------------------- tests


def test_leaf_kinds_and_matrix_views():
    base = _tree(np.random.default_rng(0))
    kinds = dict(zip(leaf_names(base), opcm.leaf_kinds(base), strict=True))
    assert kinds["attn/query/kernel"] == kinds["attn/out/kernel"] == "linear"
    assert kinds["mlp/kernel"] == "linear"
    assert kinds["embedding/kernel"] == "other"  # a conv kernel is not an nn.Linear
    assert kinds["attn/query/bias"] == kinds["scale"] == kinds["class_embedding"] == "other"
    frozen = opcm.leaf_kinds(base, frozen_pattern="class_embedding$")
    assert dict(zip(leaf_names(base), frozen, strict=True))["class_embedding"] == "frozen"
    assert opcm.matrix_shape("a/query/kernel", (6, 2, 3)) == (6, 6)
    assert opcm.matrix_shape("a/out/kernel", (2, 3, 6)) == (6, 6)
    assert opcm.matrix_shape("a/kernel", (2, 2, 3, 6)) is None


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9])
def test_matches_reference_over_a_stream(alpha):
    rng = np.random.default_rng(1)
    base = _tree(rng)
    taus = [_tree(rng, scale=0.1 * (i + 1)) for i in range(4)]
    kinds = opcm.leaf_kinds(base)
    outs, state = _run(base, taus, alpha=alpha)
    want = np_opcm(_np(base), [_np(t) for t in taus], leaf_names(base), kinds, alpha)
    for t, (got, exp) in enumerate(zip(outs, want, strict=True)):
        for name, g, w in zip(leaf_names(base), _np(got), exp, strict=True):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"task {t} {name}")
    assert int(state.count) == 4


def test_first_task_is_the_expert_and_lambda_one():
    rng = np.random.default_rng(2)
    base, tau = _tree(rng), _tree(rng, 0.1)
    merged, state = opcm.merge_step(base, opcm.init(base), jax.tree.map(jnp.add, base, tau))
    for m, b, t in zip(_np(merged), _np(base), _np(tau), strict=True):
        np.testing.assert_allclose(m, b + t, rtol=1e-6, atol=1e-6)
    assert float(state.lam) == 1.0
    np.testing.assert_allclose(float(state.norm_sum), np.sqrt(sum(np.sum(x**2) for x in _np(tau))))


def test_merged_norm_is_the_average_task_vector_norm():
    rng = np.random.default_rng(3)
    base = _tree(rng)
    taus = [_tree(rng, s) for s in (0.05, 0.2, 0.1)]
    _, state = _run(base, taus)
    norms = [np.sqrt(sum(np.sum(x**2) for x in _np(t))) for t in taus]
    got = np.sqrt(sum(np.sum(x**2) for x in _np(state.delta)))
    np.testing.assert_allclose(got, np.mean(norms), rtol=1e-5)


def test_projection_invariants():
    rng = np.random.default_rng(4)
    d = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    # Delta's own directions are all on the diagonal: P(c * Delta) = 0.
    np.testing.assert_allclose(opcm.project(d, 3.0 * d, 0.5), 0.0, atol=1e-5)
    # Transposing both matrices transposes the result (Flax [in,out] vs torch [out,in]).
    np.testing.assert_allclose(
        opcm.project(d.T, t.T, 0.5), opcm.project(d, t, 0.5).T, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        opcm.project(d, t, 0.3),
        np_project(np.asarray(d, np.float64), np.asarray(t), 0.3),
        rtol=1e-4,
        atol=1e-5,
    )


def test_split_rank_edges():
    sr = lambda s, a: int(opcm.split_rank(jnp.asarray(s, jnp.float32), a))
    assert sr([3.0, 1.0], 0.5) == 0  # the first value alone exceeds alpha
    assert sr([1.0, 1.0, 1.0, 1.0], 0.5) == 2  # ties: fractions .25 .5 .75 1, '>' is strict
    assert sr([1.0, 1.0, 1.0, 1.0], 0.0) == 0
    assert sr([0.0, 0.0, 0.0], 0.5) == 0  # 0/0 fractions: nothing exceeds, as the reference
    for s, a in [([5.0, 2.0, 2.0, 1.0], 0.6), ([1.0, 0.5], 0.7), ([0.0, 0.0], 0.1)]:
        assert sr(s, a) == np_split_rank(np.asarray(s), a)


def test_zero_task_vectors_never_divide_by_zero():
    rng = np.random.default_rng(5)
    base = _tree(rng)
    zero = jax.tree.map(jnp.zeros_like, base)
    state = opcm.update(opcm.init(base), zero)
    assert float(state.lam) == 1.0
    for m, b in zip(_np(opcm.result(base, state)), _np(base), strict=True):
        np.testing.assert_array_equal(m, b)
    tau = _tree(rng, 0.1)  # a real task after a zero one: the mean norm counts the zero task
    state = opcm.update(state, tau)
    # Delta = 0 has no directions to project out, and the mean norm counts the zero task.
    for d, t in zip(_np(state.delta), _np(tau), strict=True):
        np.testing.assert_allclose(d, t / 2, rtol=1e-5, atol=1e-7)
    state = opcm.update(state, zero)  # a zero task vector after real ones is finite
    assert np.isfinite(float(state.lam))


def test_frozen_leaves_are_only_rescaled():
    rng = np.random.default_rng(6)
    base = _tree(rng)
    taus = [_tree(rng, 0.1) for _ in range(3)]
    kinds = opcm.leaf_kinds(base, frozen_pattern="class_embedding$")
    outs, _ = _run(base, taus, kinds=kinds)
    want = np_opcm(_np(base), [_np(t) for t in taus], leaf_names(base), kinds, 0.5)
    j = leaf_names(base).index("class_embedding")
    first = _np(taus[0])[j]
    for got, exp in zip(outs, want, strict=True):
        delta = _np(got)[j] - _np(base)[j]
        np.testing.assert_allclose(delta, exp[j] - _np(base)[j], rtol=RTOL, atol=ATOL)
        cos = delta @ first / (np.linalg.norm(delta) * np.linalg.norm(first))
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)  # still tau_1's direction


def test_update_traces_under_jit():
    rng = np.random.default_rng(7)
    base = _tree(rng)
    taus = [_tree(rng, 0.1) for _ in range(2)]
    kinds = opcm.leaf_kinds(base)
    step = jax.jit(lambda s, t, a: opcm.update(s, t, alpha=a, kinds=kinds))
    s_eager, s_jit = opcm.init(base), opcm.init(base)
    for tau in taus:
        s_eager = opcm.update(s_eager, tau, alpha=0.5)
        s_jit = step(s_jit, tau, 0.5)
    for a, b in zip(_np(s_eager.delta), _np(s_jit.delta), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(s_eager.lam), float(s_jit.lam), rtol=1e-6)


def test_bfloat16_base_keeps_its_dtype():
    rng = np.random.default_rng(8)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(rng))
    merged, state = opcm.merge_step(base, opcm.init(base), jax.tree.map(jnp.add, base, base))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.delta))


def test_errors():
    rng = np.random.default_rng(9)
    base = _tree(rng)
    state = opcm.init(base)
    with pytest.raises(ConfigError, match="alpha"):
        opcm.update(state, base, alpha=1.5)
    with pytest.raises(TreeMismatchError):
        opcm.update(state, {"mlp": base["mlp"]})
    with pytest.raises(ValueError, match="no task merged"):
        opcm.result(base, state)
    with pytest.raises(ConfigError, match="kinds"):
        opcm.update(state, base, kinds=("linear",))
    bad = jax.tree.map(lambda x: x.at[...].set(jnp.nan) if x.ndim == 1 else x, base)
    with pytest.raises(ValueError, match="non-finite"):
        opcm.update(state, bad)
    assert opcm.default_config().alpha == 0.5
