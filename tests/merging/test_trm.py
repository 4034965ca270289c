"""TRM merge on a small tanh MLP and synthetic class clusters.

The stream has 3 tasks x 2 classes; task 1 was fine-tuned and merged (``previous``), task 2
is fine-tuned here for real (plain gradient descent, K = 3 evenly spaced snapshots) and
merged by TRM. Every number asserted is measured against a reference: the MagMax pair
formula, central finite differences in float64, a numpy contraction, the expert's
predictions, or the same run without a term.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax.errors import ConfigError, DataError, TrainingError
from trm_jax.merging import task_vectors as tv
from trm_jax.merging import trm
from trm_jax.merging.trm.driver import _BatchCache
from trm_jax.merging.trm.objectives import _probe_loss

DIM, HIDDEN, CLASSES, PER_CLASS, BATCH = 8, 16, 6, 64, 32
TASK, OLD = np.array([2, 3]), np.array([0, 1])


def apply_fn(params, images):
    """Two-layer tanh MLP (smooth, so second-order terms and finite differences are clean)."""
    hidden = jnp.tanh(images @ params["l0"]["w"] + params["l0"]["b"])
    return hidden @ params["l1"]["w"] + params["l1"]["b"]


def _init(key):
    k0, k1 = jax.random.split(key)
    return {
        "l0": {"w": jax.random.normal(k0, (DIM, HIDDEN)) / np.sqrt(DIM), "b": jnp.zeros(HIDDEN)},
        "l1": {
            "w": jax.random.normal(k1, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
            "b": jnp.zeros(CLASSES),
        },
    }


@jax.jit
def _sgd_step(params, images, labels, mask):
    """One gradient-descent step of cross-entropy restricted to the classes in ``mask``."""

    def loss(p):
        logits = jnp.where(mask, apply_fn(p, images), -1e9)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(loss)(params))


def _finetune(params, images, labels, seen, steps, keep):
    mask = np.isin(np.arange(CLASSES), seen)
    rng = np.random.default_rng(int(seen.sum()))
    snapshots = []
    for step in range(1, steps + 1):
        idx = rng.choice(len(labels), BATCH, replace=False)
        params = _sgd_step(params, images[idx], labels[idx], mask)
        if step % (steps // keep) == 0:
            snapshots.append(params)
    return snapshots[-keep:]


@pytest.fixture(scope="module")
def stream():
    """theta0, theta_prev (task 1 expert), K=3 snapshots of task 2, task-2 batches."""
    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 1.2, (CLASSES, DIM))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS).astype(np.int32)
    images = (means[labels] + rng.normal(size=(labels.size, DIM))).astype(np.float32)
    base = _init(jax.random.key(0))
    t1 = np.isin(labels, OLD)
    previous = _finetune(base, images[t1], labels[t1], OLD, 60, 1)[-1]
    t2 = np.isin(labels, TASK)
    snapshots = _finetune(previous, images[t2], labels[t2], np.concatenate([OLD, TASK]), 90, 3)
    x, y = images[t2], labels[t2]
    order = rng.permutation(len(y))
    batches = [
        {"image": x[order[i : i + BATCH]], "label": y[order[i : i + BATCH]]}
        for i in range(0, len(y), BATCH)
    ]
    return {
        "base": base,
        "previous": previous,
        "snapshots": snapshots,
        "batches": batches,
        "x": x,
        "y": y,
    }


def _merge(stream, config, batches=None, fn=apply_fn):
    return trm.merge(
        fn,
        stream["base"],
        stream["previous"],
        stream["snapshots"],
        stream["batches"] if batches is None else batches,
        task_classes=TASK,
        old_classes=OLD,
        config=config,
    )


def _config(**overrides):
    """``steps=0`` and the optimisation settings the numbers measured below were taken with
    (learning rate 1e-2, L_GR on every step over 32 probe examples, batches as given, the
    report over 4 batches), then ``overrides``."""
    config = trm.default_config()
    config.update(
        {
            "steps": 0,
            "learning_rate": 1e-2,
            "responsiveness_every": 1,
            "batch_size": 0,
            "eval_batches": 4,
        }
    )
    config.probe.batch_size = 32
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("init", ["magmax", "expert", "previous"])
@pytest.mark.parametrize("direction_dtype", ["float32", "bfloat16"])
def test_zero_steps_returns_the_init_point_exactly(stream, init, direction_dtype):
    params, info = _merge(stream, _config(init=init, direction_dtype=direction_dtype))
    base, prev, expert = stream["base"], stream["previous"], stream["snapshots"][-1]
    expected = {
        # theta0 + maxmag(theta_prev - theta0, theta_t - theta0): the MagMax pair merge.
        "magmax": tv.apply(
            base, tv.maxmag(tv.task_vector(prev, base), tv.task_vector(expert, base))
        ),
        "expert": expert,
        "previous": prev,
    }[init]
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert info["history"]["loss"].shape == (0,)
    assert info["directions"] == ("d1", "d2", "d3", "h", "m")


def test_consensus_lam_is_the_running_magmax_merge(stream):
    """With ``lam`` and a previous model theta0 + lam * M (a MagMax chain), ``steps=0`` returns
    theta0 + lam * maxmag(M, tau_t): the runner's MagMax merge with that lambda (NumPy)."""
    lam = 0.5
    base = stream["base"]
    tau_1 = tv.task_vector(stream["previous"], base)  # M_1 = tau_1
    previous = jax.tree.map(lambda b, m: b + lam * m, base, tau_1)
    expert = stream["snapshots"][-1]
    params, _ = trm.merge(
        apply_fn,
        base,
        previous,
        stream["snapshots"],
        stream["batches"],
        task_classes=TASK,
        old_classes=OLD,
        config=_config(lam=lam),
    )
    for got, b, m, e in zip(*map(jax.tree.leaves, (params, base, tau_1, expert)), strict=True):
        b, m, e = (np.asarray(x, np.float64) for x in (b, m, e))
        tau_t = e - b
        want = b + lam * np.where(np.abs(tau_t) >= np.abs(m), tau_t, m)  # ties: tau_t
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_objectives_equal_numpy_on_the_class_slices(stream):
    """The masked objectives equal their definitions on the sliced logits, in NumPy:
    KL over C_t (distill), over the seen classes (distill_seen), over C_<t (kl), the mean
    squared old-class logit difference (mse) and cross-entropy over C_t / the seen classes.
    With no old classes the consistency terms are exactly 0."""
    tau = 2.0
    base, prev, snaps = stream["base"], stream["previous"], stream["snapshots"]
    batch = stream["batches"][0]
    config = trm.default_config()
    ctx = trm.make_context(prev, snaps[-1], TASK, OLD, config, num_logits=CLASSES)
    z = np.asarray(apply_fn(base, batch["image"]), np.float64)
    targets = {
        "expert_logits": apply_fn(snaps[-1], batch["image"]),
        "previous_logits": apply_fn(prev, batch["image"]),
    }
    z_e, z_p = (np.asarray(targets[k], np.float64) for k in ("expert_logits", "previous_logits"))
    y = np.asarray(batch["label"])

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    def kl(teacher, student):
        t, s = log_softmax(teacher / tau), log_softmax(student / tau)
        return tau**2 * np.mean(np.sum(np.exp(t) * (t - s), -1))

    def ce(logits, classes):
        pos = np.argmax(y[:, None] == classes[None, :], -1)
        return -np.mean(np.take_along_axis(log_softmax(logits[:, classes]), pos[:, None], -1))

    seen = np.concatenate([OLD, TASK])
    want = {
        ("align", "distill"): kl(z_e[:, TASK], z[:, TASK]),
        ("align", "distill_seen"): kl(z_e[:, seen], z[:, seen]),
        ("align", "ce"): ce(z, TASK),
        ("align", "ce_seen"): ce(z, seen),
        ("consistency", "kl"): kl(z_p[:, OLD], z[:, OLD]),
        ("consistency", "mse"): np.mean((z[:, OLD] - z_p[:, OLD]) ** 2),
    }
    registry = {"align": trm.ALIGN, "consistency": trm.CONSISTENCY}
    logits = apply_fn(base, batch["image"])
    for (kind, name), value in want.items():
        got = float(registry[kind][name](apply_fn, base, logits, batch, targets, ctx))
        np.testing.assert_allclose(got, value, rtol=1e-5, err_msg=f"{kind} {name}")
    first = trm.make_context(prev, snaps[-1], TASK, OLD[:0], config, num_logits=CLASSES)
    for name in trm.CONSISTENCY:
        assert float(trm.CONSISTENCY[name](apply_fn, base, logits, batch, targets, first)) == 0.0


def test_one_compile_serves_tasks_with_different_class_counts(stream):
    """Class sets enter the step as fixed-size masks: merges with 0, 1 and 2 old classes (the
    number of seen classes grows along a stream) reuse one compiled step."""

    def fresh_apply(params, images):  # a new static argument: a fresh cache entry
        return apply_fn(params, images)

    before = trm.train_step._cache_size()
    for old in (OLD[:0], OLD[:1], OLD):
        trm.merge(
            fresh_apply,
            stream["base"],
            stream["previous"],
            stream["snapshots"],
            stream["batches"],
            task_classes=TASK,
            old_classes=old,
            config=_config(steps=2),
        )
    assert trm.train_step._cache_size() - before == 1


def test_combine_matches_numpy_and_the_reference_form(stream):
    """theta(alpha) = anchor + (alpha - alpha_init).D per leaf equals a numpy einsum, and for the
    MagMax init also the reference form theta_prev + sum_j alpha_j D_j (up to f32 rounding)."""
    subspace, layout = trm.build_subspace(
        stream["base"], stream["previous"], stream["snapshots"], granularity="/w"
    )
    assert layout.group_names == ("l0/b", "/w=/w", "l1/b")
    alpha = subspace.alpha_init + 0.5 * jax.random.normal(
        jax.random.key(3), subspace.alpha_init.shape
    )
    got = trm.combine(subspace, alpha, layout)
    a64, init64 = np.asarray(alpha, np.float64), np.asarray(subspace.alpha_init, np.float64)
    leaves = zip(
        jax.tree.leaves(got),
        jax.tree.leaves(subspace.anchor),
        jax.tree.leaves(subspace.directions),
        jax.tree.leaves(stream["previous"]),
        layout.groups,
        strict=True,
    )
    for out, anchor, dirs, prev, g in leaves:
        d64 = np.asarray(dirs, np.float64)
        want = np.asarray(anchor, np.float64) + np.einsum("j,j...->...", a64[g] - init64[g], d64)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
        spec_form = np.asarray(prev, np.float64) + np.einsum("j,j...->...", a64[g], d64)
        np.testing.assert_allclose(np.asarray(out), spec_form, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gradients

OBJECTIVES = (
    [("align", name) for name in trm.ALIGN]
    + [("consistency", name) for name in trm.CONSISTENCY]
    + [("responsiveness", name) for name in trm.RESPONSIVENESS]
    + [("reg", "l2")]
)


@pytest.mark.parametrize("kind,name", OBJECTIVES)
def test_coefficient_gradient_matches_central_differences(stream, kind, name):
    """jax.grad of each objective in alpha (first order, or second order for responsiveness)
    equals central finite differences, in float64 (eps 1e-5: truncation error ~1e-10)."""
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
        base, prev = to64(stream["base"]), to64(stream["previous"])
        snaps = [to64(s) for s in stream["snapshots"]]
        batch = to64(stream["batches"][0])
        batch["label"] = jnp.asarray(stream["batches"][0]["label"])
        subspace, layout = trm.build_subspace(base, prev, snaps)
        config = trm.default_config()
        config.probe.batch_size = 16
        ctx = trm.make_context(prev, snaps[-1], TASK, OLD, config, jnp.float64, num_logits=CLASSES)
        measure = trm.MEASURES["fisher" if name == "fisher" else "probe"]
        targets = trm.compute_targets(
            base,
            batch,
            ctx,
            jax.random.key(1),
            jax.random.key(2),
            apply_fn=apply_fn,
            measure=measure,
            probe_size=16,
        )
        registry = {
            "align": trm.ALIGN,
            "consistency": trm.CONSISTENCY,
            "responsiveness": trm.RESPONSIVENESS,
        }

        @jax.jit
        def term(alpha):
            if kind == "reg":
                return trm.reg_l2(alpha, subspace.alpha_init)
            params = trm.combine(subspace, alpha, layout)
            logits = apply_fn(params, batch["image"])
            return registry[kind][name](apply_fn, params, logits, batch, targets, ctx)

        alpha = subspace.alpha_init + 0.3 * jax.random.normal(
            jax.random.key(4), subspace.alpha_init.shape, jnp.float64
        )
        grad = np.asarray(jax.jit(jax.grad(term))(alpha))
        eps = 1e-5
        fd = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            e = jnp.zeros_like(alpha).at[idx].set(eps)
            fd[idx] = (float(term(alpha + e)) - float(term(alpha - e))) / (2 * eps)
        assert np.abs(grad).max() > 1e-4, "objective must depend on the coefficients"
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_grad_sq_norm_backward_equals_reverse_over_reverse(stream):
    """The Hessian-vector-product backward of grad_sq_norm against plain autodiff."""
    batch = stream["batches"][0]
    data = (batch["image"], batch["label"], jnp.arange(CLASSES), None)
    loss = functools.partial(_probe_loss, apply_fn)

    def plain(p):
        grads = jax.grad(loss)(p, data)
        return sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))

    params = stream["snapshots"][-1]
    assert float(trm.grad_sq_norm(loss, params, data)) == pytest.approx(float(plain(params)))
    got = jax.jit(jax.grad(lambda p: trm.grad_sq_norm(loss, p, data)))(params)
    want = jax.jit(jax.grad(plain))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


# ----------------------------------------------------------------------------- optimisation


def test_optimisation_lowers_the_total_loss(stream):
    """Default weights, 40 steps. Measured: loss 0.192 -> 0.079 (consistency 0.160 -> 0.036;
    align rises 0.007 -> 0.024, the trade the weights ask for)."""
    params, info = _merge(stream, _config(steps=40))
    init, final = info["terms_init"], info["terms_final"]
    assert final["loss"] < 0.6 * init["loss"]
    assert final["consistency"] < 0.5 * init["consistency"]
    assert info["history"]["loss"].shape == (40,)
    assert info["history"]["reg"][0] == 0.0 < info["history"]["reg"][-1]
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_align_only_recovers_the_expert_predictions(stream):
    """The expert theta_t lies in the subspace (alpha_d3 = 1), so distillation alone must find
    its predictions. Measured on the task's 128 examples: argmax agreement 1.0, largest
    tempered-probability gap 0.017 (MagMax start: 0.125), distillation loss 0.0067 -> 0.0005."""
    config = _config(steps=150, learning_rate=0.05)
    config.weights.update(align=1.0, consistency=0.0, responsiveness=0.0, reg=0.0)
    params, info = _merge(stream, config)
    start, _ = _merge(stream, _config())

    def probs(p):
        logits = apply_fn(p, stream["x"])[:, TASK]
        return np.asarray(jax.nn.softmax(logits / config.temperature))

    expert, got = probs(stream["snapshots"][-1]), probs(params)
    assert np.mean(got.argmax(1) == expert.argmax(1)) >= 0.99
    gap, start_gap = np.abs(got - expert).max(), np.abs(probs(start) - expert).max()
    assert gap < 0.03 and gap < 0.3 * start_gap
    assert info["terms_final"]["align"] < 0.15 * info["terms_init"]["align"]


def test_responsiveness_term_raises_g_at_the_merged_point(stream):
    """Same run with and without L_GR (weight 1 vs 0). Measured g(theta(alpha)): 7.47 without,
    10.17 with (x1.36); g at the MagMax start 4.44, g_ref = g(theta0) 1.24."""
    off = _config(steps=40)
    off.weights.responsiveness = 0.0
    on = _config(steps=40)
    on.weights.responsiveness = 1.0
    _, info_off = _merge(stream, off)
    _, info_on = _merge(stream, on)
    assert info_off["g_init"] == pytest.approx(info_on["g_init"], rel=1e-6)
    assert info_off["g_ref"] == pytest.approx(info_on["g_ref"], rel=1e-6)
    assert info_on["g_final"] > 1.2 * info_off["g_final"]
    assert info_on["terms_final"]["responsiveness"] < info_on["terms_init"]["responsiveness"]


def test_granularity_groups_share_coefficients(stream):
    _, info = _merge(stream, _config(steps=5, granularity=("l\\d/w",)))
    assert list(info["alpha_groups"]) == ["l0/b", "l\\d/w=l0/w", "l1/b", "l\\d/w=l1/w"]
    _, info = _merge(stream, _config(steps=5, granularity="global"))
    rows = jax.tree.leaves(info["alpha"])
    assert len(info["alpha_groups"]) == 1 and len(rows) == 4
    for row in rows[1:]:
        np.testing.assert_array_equal(row, rows[0])
    assert not np.allclose(rows[0], [0, 0, 0, 0, 1])  # it moved from the MagMax point


def test_step_traces_once_across_steps_and_batches(stream, monkeypatch):
    """A counting objective registered under a new name (the swap point) runs only while
    tracing: one trace of the step plus one of the evaluation, for 9 steps over 3 batches,
    with L_GR recomputed every 2nd step (a ``lax.cond`` inside the one step); a ragged batch
    is skipped instead of retracing."""
    traces = []

    def counting_align(apply_fn, params, logits, batch, targets, ctx):
        traces.append(1)
        return trm.align_distill(apply_fn, params, logits, batch, targets, ctx)

    monkeypatch.setitem(trm.ALIGN, "counting", counting_align)

    def fresh_apply(params, images):  # a new static argument: forces a fresh compile
        return apply_fn(params, images)

    batches = stream["batches"][:2] + [{"image": stream["x"][:5], "label": stream["y"][:5]}]
    batches += stream["batches"][2:3]
    before = trm.train_step._cache_size()
    config = _config(steps=9, align="counting", responsiveness_every=2)
    _, info = _merge(stream, config, batches, fresh_apply)
    assert trm.train_step._cache_size() - before == 1
    assert len(traces) == 2
    assert info["batches"] == 3 and info["skipped_batches"] == 1


def _no_gr(**overrides):
    config = _config(eval_batches=1, **overrides)
    config.weights.responsiveness = 0.0
    return config


def test_batch_size_splits_batches_like_presplit_ones(stream):
    """``batch_size=16`` on batches of 32 gives the same merge, step for step, as passing
    the 16-example halves directly."""
    _, info = _merge(stream, _no_gr(steps=6, batch_size=16, max_batches=0))
    halves = [{k: v[i : i + 16] for k, v in b.items()} for b in stream["batches"] for i in (0, 16)]
    _, want = _merge(stream, _no_gr(steps=6, batch_size=0, max_batches=0), halves)
    assert info["batches"] == want["batches"] == 6
    for name in ("loss", *trm.TERMS):
        np.testing.assert_array_equal(info["history"][name], want["history"][name])
    np.testing.assert_array_equal(info["alpha_groups"]["l0/w"], want["alpha_groups"]["l0/w"])


def test_chunks_skip_a_ragged_rest(stream):
    """12-example chunks of the four 32-example batches: 8 held, the 4 rests of 8 skipped,
    each held chunk the right slice of its batch."""
    made = []
    cache = _BatchCache(
        stream["batches"], 0, lambda b, i, ctx: made.append(i) or {}, TASK, batch_size=12
    )
    for step in range(9):
        batch, _ = cache.get(step)
    assert (len(cache.entries), cache.skipped, made) == (8, 4, list(range(8)))
    np.testing.assert_array_equal(
        cache.entries[3][0]["image"], stream["batches"][1]["image"][12:24]
    )


def test_max_batches_default_bounds_the_held_batches(stream):
    """The default holds 8 distinct batches however many steps run (and cycles over them)."""

    def endless():
        while True:
            yield from stream["batches"]

    _, info = _merge(stream, _no_gr(steps=12, batch_size=16), endless())
    assert trm.default_config().max_batches == 8 == info["batches"]


def test_lazy_responsiveness_matches_a_reference_loop(stream):
    """``responsiveness_every=3`` over 6 steps: the L_GR gradient is computed at steps 0 and
    3 and reused in between. Reference: an eager Adam loop built from the public pieces
    (first-order terms every step, L_GR gradient refreshed every 3rd step)."""
    config = _config(steps=6, responsiveness_every=3, eval_batches=1, learning_rate=0.05)
    config.weights.responsiveness = 1.0
    _, info = _merge(stream, config)
    gr = info["history"]["responsiveness"]
    assert gr[1] == gr[2] == gr[0] != gr[3] == gr[4] == gr[5]

    base, prev, snaps = stream["base"], stream["previous"], stream["snapshots"]
    subspace, layout = trm.build_subspace(base, prev, snaps)
    ctx = trm.make_context(prev, snaps[-1], TASK, OLD, config, num_logits=CLASSES)
    full = trm.Spec(
        apply_fn,
        trm.align_distill,
        trm.consistency_kl,
        trm.responsiveness_probe,
        trm.reg_l2,
        layout,
    )
    hyper = trm.Hyper(jnp.float32(0.05), {k: jnp.float32(config.weights[k]) for k in trm.TERMS})
    seed_key, probe_key = jax.random.key(0), jax.random.fold_in(jax.random.key(0), 1)
    entries = [
        (
            b,
            trm.compute_targets(
                base,
                b,
                ctx,
                jax.random.fold_in(seed_key, i),
                jax.random.fold_in(probe_key, i),
                apply_fn=apply_fn,
                measure=trm.g_probe,
                probe_size=32,
            ),
        )
        for i, b in enumerate(stream["batches"])
    ]
    first = jax.jit(
        jax.grad(
            lambda a, b, t: trm.loss_terms(
                a, subspace, b, t, ctx, hyper, spec=full._replace(responsiveness=None)
            )[0]
        )
    )
    second = jax.jit(
        jax.grad(lambda a, b, t: trm.responsiveness_term(a, subspace, b, t, ctx, spec=full))
    )
    adam = optax.adam(0.05)
    alpha = subspace.alpha_init
    opt = adam.init(alpha)
    for step in range(6):
        batch, targets = entries[step % len(entries)]
        if step % 3 == 0:
            lazy = second(alpha, batch, targets)
        updates, opt = adam.update(first(alpha, batch, targets) + lazy, opt)
        alpha = alpha + updates
    got = np.stack([info["alpha_groups"][g] for g in layout.group_names])
    np.testing.assert_allclose(got, np.asarray(alpha), rtol=1e-5, atol=1e-6)


def test_zero_weight_terms_compute_no_targets(stream, monkeypatch):
    """With weight 0 the responsiveness reference g_ref is not computed per held batch: a
    counting g measure runs 3 times (g_ref, g_init, g_final of the one report batch) for 4
    held batches, against 4 + 2 with the term on (g_ref per batch, g_init, g_final), and
    2 + 2 with L_GR recomputed every 2nd step (g_ref only on the batches of steps 0 and 2)."""
    calls = []

    def counting_g(apply_fn, params, batch, targets, ctx):
        jax.debug.callback(lambda: calls.append(1))
        return trm.g_probe(apply_fn, params, batch, targets, ctx)

    monkeypatch.setitem(trm.MEASURES, "counting", counting_g)
    monkeypatch.setitem(trm.RESPONSIVENESS, "counting", trm.responsiveness_probe)
    counts = []
    for weight, every in ((0.0, 1), (0.1, 1), (0.1, 2)):
        calls.clear()
        config = _config(
            steps=4,
            responsiveness="counting",
            max_batches=4,
            eval_batches=1,
            responsiveness_every=every,
        )
        config.weights.responsiveness = weight
        _, info = _merge(stream, config)
        jax.effects_barrier()
        counts.append(len(calls))
        assert info["g_ref"] > 0 and np.isfinite(info["terms_final"]["responsiveness"])
    assert counts == [3, 6, 4]
    # report_g=False: with L_GR off g is measured nowhere (reported as NaN) and the merge
    # is otherwise the same; with L_GR on the flag is ignored
    calls.clear()
    quiet = _config(steps=4, responsiveness="counting", max_batches=4, eval_batches=1)
    quiet.weights.responsiveness, quiet.report_g = 0.0, False
    params_quiet, info = _merge(stream, quiet)
    jax.effects_barrier()
    assert len(calls) == 0 and all(np.isnan(info[k]) for k in ("g_ref", "g_init", "g_final"))
    loud = _config(steps=4, responsiveness="counting", max_batches=4, eval_batches=1)
    loud.weights.responsiveness = 0.0
    params_loud, _ = _merge(stream, loud)
    jax.tree.map(np.testing.assert_array_equal, params_quiet, params_loud)
    calls.clear()
    quiet.weights.responsiveness = 0.1
    _merge(stream, quiet)
    jax.effects_barrier()
    assert len(calls) == 6


# ----------------------------------------------------------------------------- errors


def test_error_paths(stream):
    base, prev, snaps, batches = (stream[k] for k in ("base", "previous", "snapshots", "batches"))
    config = _config()

    def call(previous=prev, snapshots=snaps, batches=batches, task=TASK, old=OLD, cfg=config):
        return trm.merge(
            apply_fn,
            base,
            previous,
            snapshots,
            batches,
            task_classes=task,
            old_classes=old,
            config=cfg,
        )

    with pytest.raises(ValueError, match=r"previous .*missing \['l1/b'\]"):
        call(previous={"l0": prev["l0"], "l1": {"w": prev["l1"]["w"]}})
    bad = jax.tree.map(lambda x: x, snaps[1])
    bad["l0"]["w"] = jnp.zeros((DIM + 1, HIDDEN))
    with pytest.raises(ValueError, match=r"snapshots\[1\] leaf 'l0/w'"):
        call(snapshots=[snaps[0], bad, snaps[2]])
    with pytest.raises(ConfigError, match="K = 0"):
        call(snapshots=[])
    with pytest.raises(DataError, match="no batches"):
        call(batches=iter([]))
    with pytest.raises(DataError, match=r"overlap at \[2\]"):
        call(old=[0, 1, 2])
    with pytest.raises(DataError, match="not in task_classes"):
        call(task=[2])
    with pytest.raises(DataError, match="beyond the 6 logits"):
        call(task=[2, 3], old=[0, 1, 7])
    with pytest.raises(ConfigError, match=r"'align' is 'kd'; choose one of \['distill'"):
        call(cfg=_config(align="kd"))
    with pytest.raises(ConfigError, match="directions"):
        call(cfg=_config(directions=("trajectory", "momentum")))
    with pytest.raises(ConfigError, match="granularity"):
        call(cfg=_config(granularity="(unclosed"))
    with pytest.raises(ConfigError, match="'responsiveness_every' must be an integer >= 1"):
        call(cfg=_config(responsiveness_every=0))


def test_non_finite_loss_names_the_step_and_term(stream):
    config = _config(steps=3, learning_rate=1e30, consistency="mse")
    config.weights.update(align=0.0, responsiveness=0.0, reg=0.0)
    with pytest.raises(TrainingError, match=r"step 1 \(term consistency: consistency=inf"):
        _merge(stream, config)
