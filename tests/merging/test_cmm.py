"""CMM's three stages against NumPy: the linearised model (hand-written JVP of a small MLP),
the Adam-second-moment Fisher merge over a stream (the authors' formula verbatim), the
representation loss and AdamW steps of the post-merge correction; plus first task, zero and
equal Fishers, identical models, stage switches, jit and the error paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax.errors import ConfigError
from trm_jax.merging import cmm
from trm_jax.merging.task_vectors import NonFiniteError, TreeMismatchError

D_IN, D_HID, D_OUT, B = 4, 6, 3, 5


def mlp(params, x):
    return jnp.tanh(x @ params["w"] + params["b"]) @ params["v"]


def features_fn(params, images):  # "image encoder": a frozen layer, then the projection
    return jnp.tanh(images @ params["enc"]["w"]) @ params["visual_projection"]["kernel"]


def _mlp_params(rng, scale=1.0):
    return {
        "w": jnp.asarray(scale * rng.normal(size=(D_IN, D_HID)), jnp.float32),
        "b": jnp.asarray(scale * rng.normal(size=(D_HID,)), jnp.float32),
        "v": jnp.asarray(scale * rng.normal(size=(D_HID, D_OUT)), jnp.float32),
    }


def _enc_params(rng, scale=1.0):
    return {
        "enc": {"w": jnp.asarray(scale * rng.normal(size=(D_IN, D_HID)), jnp.float32)},
        "visual_projection": {
            "kernel": jnp.asarray(scale * rng.normal(size=(D_HID, D_OUT)), jnp.float32)
        },
    }


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ------------------------------------------------------------------ (a) linearisation


def np_linear_mlp(p0, p, x):
    p0, p, x = _np(p0), _np(p), np.asarray(x, np.float64)
    z = x @ p0["w"] + p0["b"]
    h = np.tanh(z)
    dw, db, dv = p["w"] - p0["w"], p["b"] - p0["b"], p["v"] - p0["v"]
    dh = (1 - h**2) * (x @ dw + db)
    return h @ p0["v"] + dh @ p0["v"] + h @ dv


def test_linearize_matches_hand_written_jvp():
    rng = np.random.default_rng(0)
    p0, x = _mlp_params(rng), jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
    p = jax.tree.map(lambda a, d: a + d, p0, _mlp_params(rng, 0.1))
    apply_lin = cmm.linearize(mlp, p0)
    np.testing.assert_allclose(apply_lin(p0, x), mlp(p0, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(apply_lin(p, x), np_linear_mlp(p0, p, x), rtol=1e-5, atol=1e-5)
    # Exactly affine in params - params0.
    d = jax.tree.map(jnp.subtract, p, p0)
    p2 = jax.tree.map(lambda a, b: a + 2 * b, p0, d)
    np.testing.assert_allclose(
        apply_lin(p2, x) - apply_lin(p0, x),
        2 * (apply_lin(p, x) - apply_lin(p0, x)),
        rtol=1e-5,
        atol=1e-5,
    )
    # params0 as a traced argument inside jit.
    jitted = jax.jit(lambda a, b, y: cmm.linearized_apply(mlp, a, b, y))
    np.testing.assert_allclose(jitted(p0, p, x), apply_lin(p, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TreeMismatchError):
        apply_lin({"w": p["w"]}, x)


def test_linearize_bfloat16_params():
    rng = np.random.default_rng(1)
    p0 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _mlp_params(rng))
    p = jax.tree.map(lambda a: (a + 0.1).astype(jnp.bfloat16), p0)
    x = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.bfloat16)
    out = cmm.linearize(mlp, p0)(p, x)
    assert out.dtype == jnp.bfloat16
    want = np_linear_mlp(p0, p, np.asarray(x, np.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------- (b) Fisher merge


def np_fisher_merge(t0, t1, f0, f1, a, eps=0.0):
    """The authors' interpolate_weights, with the documented 0/0 -> plain-interpolation."""
    out, fish = {}, {}
    for k in t1:
        g0, g1 = f0[k] + eps, f1[k] + eps
        den = (1 - a) * g0 + a * g1
        with np.errstate(invalid="ignore", divide="ignore"):
            w = ((1 - a) * g0 * t0[k] + a * g1 * t1[k]) / den
        out[k] = np.where(den > 0, w, (1 - a) * t0[k] + a * t1[k])
        fish[k] = (1 - a) * f0[k] + a * f1[k]
    return out, fish


def _nu(rng, zero_frac=0.0):
    tree = jax.tree.map(lambda x: jnp.abs(x) ** 2 * 1e-3, _mlp_params(rng))
    if zero_frac:
        tree = jax.tree.map(lambda x: jnp.where(rng.random(x.shape) < zero_frac, 0.0, x), tree)
    return tree


def test_fisher_merge_matches_authors_formula():
    rng = np.random.default_rng(2)
    t0, t1 = _mlp_params(rng), _mlp_params(rng)
    f0, f1 = _nu(rng, 0.3), _nu(rng, 0.3)  # zeros in both: some 0/0 denominators
    for eps in (0.0, 1e-4):
        merged, fisher = cmm.fisher_merge(t0, t1, f0, f1, alpha=0.4, damping=eps)
        want, want_f = np_fisher_merge(_np(t0), _np(t1), _np(f0), _np(f1), 0.4, eps)
        for k in want:
            np.testing.assert_allclose(np.asarray(merged[k]), want[k], rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(fisher[k]), want_f[k], rtol=1e-6, atol=1e-12)


def test_fisher_merge_edge_cases():
    rng = np.random.default_rng(3)
    t0, t1, f = _mlp_params(rng), _mlp_params(rng), _nu(rng)
    zero = jax.tree.map(jnp.zeros_like, f)
    # Identical models merge to themselves exactly, whatever the Fishers.
    same, _ = cmm.fisher_merge(t0, t0, f, _nu(rng), alpha=0.4)
    for k in t0:
        np.testing.assert_array_equal(np.asarray(same[k]), np.asarray(t0[k]))
    # No Fisher at all: the plain interpolation (no NaN).
    plain, fz = cmm.fisher_merge(t0, t1, zero, zero, alpha=0.4)
    for k in t0:
        np.testing.assert_allclose(plain[k], 0.6 * t0[k] + 0.4 * t1[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(fz[k]), 0.0)
    # Old Fisher zero where the new one is not: the new model wins outright.
    take_new, _ = cmm.fisher_merge(t0, t1, zero, f, alpha=0.4)
    for k in t0:
        np.testing.assert_allclose(take_new[k], t1[k], rtol=1e-6, atol=1e-7)
    # Equal Fishers: the plain interpolation again.
    eq, _ = cmm.fisher_merge(t0, t1, f, f, alpha=0.4)
    for k in t0:
        np.testing.assert_allclose(eq[k], 0.6 * t0[k] + 0.4 * t1[k], rtol=1e-5, atol=1e-6)


def test_stream_first_task_and_kept_fisher():
    rng = np.random.default_rng(4)
    state = cmm.init(_mlp_params(rng))
    merged, m_np, f_np = None, None, None
    for t in range(3):
        theta, nu = _mlp_params(rng), _nu(rng)
        prev = merged if merged is not None else theta
        merged, state = cmm.update(state, prev, theta, nu, alpha=0.4)
        if t == 0:
            m_np, f_np = _np(theta), _np(nu)
            for k in theta:  # task 1: theta_1 and F_1 = nu_1, exactly
                np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(theta[k]))
                np.testing.assert_array_equal(np.asarray(state.fisher[k]), np.asarray(nu[k]))
        else:
            m_np, f_np = np_fisher_merge(m_np, _np(theta), f_np, _np(nu), 0.4)
        for k in m_np:
            np.testing.assert_allclose(np.asarray(merged[k]), m_np[k], rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(state.fisher[k]), f_np[k], rtol=1e-5)
    assert int(state.count) == 3


def test_update_without_fisher_and_under_jit():
    rng = np.random.default_rng(5)
    t0, t1, nu = _mlp_params(rng), _mlp_params(rng), _nu(rng)
    state = cmm.CMMState(_nu(rng), jnp.ones((), jnp.int32))
    plain, s2 = cmm.update(state, t0, t1, None, alpha=0.3, use_fisher=False)
    for k in t0:
        np.testing.assert_allclose(plain[k], 0.7 * t0[k] + 0.3 * t1[k], rtol=1e-6, atol=1e-7)
    assert int(s2.count) == 2
    eager, _ = cmm.update(state, t0, t1, nu, alpha=0.4)
    jitted, _ = jax.jit(lambda s, a, b, n: cmm.update(s, a, b, n, alpha=0.4))(state, t0, t1, nu)
    for k in t0:
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=1e-6)


def test_adam_nu_reads_the_raw_second_moment():
    rng = np.random.default_rng(6)
    params = _mlp_params(rng)
    grads = _mlp_params(rng)
    for opt in (optax.adamw(1e-3), optax.chain(optax.clip_by_global_norm(1e6), optax.adam(1e-3))):
        state = opt.init(params)
        _, state = opt.update(grads, state, params)
        nu = cmm.adam_nu(state)
        for k in params:  # torch's exp_avg_sq: (1 - b2) g^2 after one step, no bias correction
            np.testing.assert_allclose(nu[k], 0.001 * np.asarray(grads[k]) ** 2, rtol=1e-5)
    labels = {"w": "a", "b": "a", "v": "s"}
    multi = optax.multi_transform({"a": optax.adam(1e-3), "s": optax.sgd(1e-3)}, labels)
    assert set(cmm.adam_nu(multi.init(params))) == {"w", "b", "v"}
    with pytest.raises(ConfigError, match="0 Adam"):
        cmm.adam_nu(optax.sgd(1e-3).init(params))
    two = optax.multi_transform({"a": optax.adam(1e-3), "s": optax.adam(1e-3)}, labels)
    with pytest.raises(ConfigError, match="2 Adam"):
        cmm.adam_nu(two.init(params))


# -------------------------------------------------- (c) representation correction


def test_representation_loss():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(B, D_OUT)), rng.normal(size=(B, D_OUT))
    f = lambda kind: float(cmm.representation_loss(jnp.asarray(a), jnp.asarray(b), kind))
    np.testing.assert_allclose(f("l2"), np.mean((a - b) ** 2), rtol=1e-6)
    np.testing.assert_allclose(f("l1"), np.mean(np.abs(a - b)), rtol=1e-6)
    assert float(cmm.representation_loss(jnp.asarray(a), jnp.asarray(a))) == 0.0
    with pytest.raises(ConfigError, match="representation_loss"):
        cmm.representation_loss(jnp.asarray(a), jnp.asarray(b), "cosine")


def np_adamw_projection_steps(params, target, images, lr, wd, clip, steps):
    """MSE feature alignment on the projection only: clip, then AdamW, written out."""
    p = _np(params)
    h = np.tanh(np.asarray(images, np.float64) @ p["enc"]["w"])
    tgt = np.tanh(np.asarray(images, np.float64) @ _np(target)["enc"]["w"])
    tgt = tgt @ _np(target)["visual_projection"]["kernel"]
    w = p["visual_projection"]["kernel"]
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        g = 2 * h.T @ (h @ w - tgt) / tgt.size
        norm = np.sqrt(np.sum(g**2))
        if norm > clip:
            g = g * clip / norm
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        mh, vh = m / (1 - 0.9**t), v / (1 - 0.999**t)
        w = w - lr * (mh / (np.sqrt(vh) + 1e-8) + wd * w)
    return w


def test_representation_step_matches_adamw_on_the_projection_only():
    rng = np.random.default_rng(8)
    merged, prev = _enc_params(rng), _enc_params(rng)
    images = jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)
    for clip in (1.0, 1e-3):  # unclipped-ish and clipped
        opt = cmm.representation_optimizer(
            merged, learning_rate=1e-2, weight_decay=0.01, clip_norm=clip
        )
        params, state = merged, opt.init(merged)
        for _ in range(3):
            params, state, _ = cmm.representation_step(
                params, state, prev, images, features_fn=features_fn, optimizer=opt, kind="l2"
            )
        want = np_adamw_projection_steps(merged, prev, images, 1e-2, 0.01, clip, 3)
        got = np.asarray(params["visual_projection"]["kernel"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(params["enc"]["w"]), merged["enc"]["w"])


def test_representation_correction_loop():
    rng = np.random.default_rng(9)
    merged, prev = _enc_params(rng), _enc_params(rng)
    batch = {"image": jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)}
    config = cmm.default_config()
    config.representation_lr = 3e-2
    config.representation_steps = 20
    out, losses = cmm.representation_correction(
        features_fn, merged, prev, [batch] * 30, config=config
    )
    assert len(losses) == 20 and losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(out["enc"]["w"]), merged["enc"]["w"])
    # Aligning a model to itself: zero loss, zero gradient, only weight decay moves it.
    _, same = cmm.representation_correction(features_fn, prev, prev, [batch], config=config)
    assert same == [0.0]
    # Linearised feature maps (stage a + c): at params == params0 the target is reproduced.
    p0 = prev
    _, lin = cmm.representation_correction(features_fn, p0, p0, [batch], config=config, params0=p0)
    assert lin == [0.0]
    config.representation_trainable = "no_such_leaf"
    with pytest.raises(ConfigError, match="matches no parameter"):
        cmm.representation_correction(features_fn, merged, prev, [batch], config=config)


def test_errors_and_config():
    rng = np.random.default_rng(10)
    t0, t1, nu = _mlp_params(rng), _mlp_params(rng), _nu(rng)
    state = cmm.init(t0)
    with pytest.raises(ConfigError, match="alpha"):
        cmm.update(state, t0, t1, nu, alpha=1.4)
    with pytest.raises(ConfigError, match="nu"):
        cmm.update(state, t0, t1, None)
    with pytest.raises(TreeMismatchError):
        cmm.update(state, t0, t1, {"w": nu["w"]})
    state = state._replace(count=jnp.ones((), jnp.int32))
    bad = dict(t1, w=t1["w"].at[0, 0].set(jnp.nan))
    with pytest.raises(NonFiniteError):
        cmm.update(state, t0, bad, nu)
    c = cmm.default_config()
    assert (c.alpha, c.representation_lr, c.representation_loss) == (0.4, 1e-7, "l2")
    assert c.linearize and c.fisher_merge and c.representation


def test_merge_task_switches_stages():
    rng = np.random.default_rng(11)
    p0 = _enc_params(rng)
    nu = lambda: jax.tree.map(lambda x: jnp.abs(x) * 1e-3, _enc_params(rng))
    batch = {"image": jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32)}
    config = cmm.default_config()
    config.representation_lr = 1e-2
    theta1 = jax.tree.map(jnp.add, p0, _enc_params(rng, 0.1))
    state = cmm.init(p0)
    # Task 1: no previous model, so no correction; theta_bar_1 = theta_1.
    merged1, state, losses = cmm.merge_task(
        state,
        theta1,
        theta1,
        nu(),
        config=config,
        features_fn=features_fn,
        batches=[batch],
        params0=p0,
    )
    assert losses == []
    np.testing.assert_array_equal(np.asarray(merged1["enc"]["w"]), theta1["enc"]["w"])
    theta2 = jax.tree.map(jnp.add, merged1, _enc_params(rng, 0.1))
    nu2 = nu()
    got, s2, losses = cmm.merge_task(
        state,
        merged1,
        theta2,
        nu2,
        config=config,
        features_fn=features_fn,
        batches=[batch, batch],
        params0=p0,
    )
    assert len(losses) == 2
    want, want_state = cmm.update(state, merged1, theta2, nu2, alpha=0.4)
    want, _ = cmm.representation_correction(
        features_fn, want, merged1, [batch, batch], config=config, params0=p0
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(s2.fisher), jax.tree.leaves(want_state.fisher), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Stages (b) and (c) off: the plain interpolation, no Adam state needed.
    config.fisher_merge, config.representation = False, False
    plain, _, losses = cmm.merge_task(state, merged1, theta2, None, config=config)
    assert losses == []
    for a, b, c in zip(*(jax.tree.leaves(x) for x in (plain, merged1, theta2)), strict=True):
        np.testing.assert_allclose(a, 0.6 * b + 0.4 * c, rtol=1e-6, atol=1e-7)
    config.representation = True
    with pytest.raises(ConfigError, match="features_fn"):
        cmm.merge_task(state, merged1, theta2, None, config=config)
    with pytest.raises(ConfigError, match="params0"):
        cmm.merge_task(
            state, merged1, theta2, None, config=config, features_fn=features_fn, batches=[batch]
        )
