"""runner/train.py and runner/regularizers.py against closed-form numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import metrics
from trm_jax.errors import TrainingError
from trm_jax.models import heads
from trm_jax.runner import regularizers, train

B, D_IN, D, C = 8, 6, 4, 5


def _features_fn(params, images):
    return images.reshape(images.shape[0], -1) @ params["w"]


def _preprocess(images, key=None, *, train=False):
    del key, train
    return images.astype(jnp.float32) / 255.0


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "backbone": {"w": jnp.asarray(rng.normal(size=(D_IN, D)), jnp.float32)},
        "head": {
            "w": jnp.asarray(rng.normal(size=(C, D)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(C,)), jnp.float32),
        },
    }
    batch = {
        "image": rng.integers(0, 256, size=(B, D_IN, 1, 1), dtype=np.uint8),
        "label": rng.integers(0, 3, size=(B,)).astype(np.int32),
    }
    return params, batch


def _np_grads(params, batch, mask):
    """Closed-form gradient of the masked mean cross-entropy of the linear model."""
    x = batch["image"].reshape(B, -1).astype(np.float64) / 255.0
    wb = np.asarray(params["backbone"]["w"], np.float64)
    wh = np.asarray(params["head"]["w"], np.float64)
    bh = np.asarray(params["head"]["b"], np.float64)
    f = x @ wb
    z = np.where(mask[None], f @ wh.T + bh, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.eye(C)[batch["label"]]
    loss = -np.log(p[np.arange(B), batch["label"]]).mean()
    dz = (p - y) / B
    return loss, {
        "backbone": {"w": x.T @ (dz @ wh)},
        "head": {"w": dz.T @ f, "b": dz.sum(0)},
    }


def _config(**kw):
    cfg = train.default_config()
    cfg.update(kw)
    return cfg


def test_one_adamw_step_matches_closed_form():
    params, batch = _setup()
    mask = np.array([True, True, True, False, False])
    cfg = _config(lr=1e-2, weight_decay=0.1, warmup_steps=0, grad_clip=0.0)
    opt = train.make_optimizer(cfg)
    logits_fn = heads.make_logits_fn(_features_fn, "linear", 1.0)
    step = train.make_train_step(
        train.make_loss_fn(logits_fn), opt, _preprocess, lr=cfg.lr, warmup_steps=0
    )
    state, m = step(
        train.init_state(params, opt, 100),
        batch,
        jax.random.key(0),
        {"rows": jnp.zeros((C, D)), "train_mask": jnp.asarray(mask)},
    )
    loss, g = _np_grads(params, batch, mask)
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-5)
    gnorm = np.sqrt(sum((v**2).sum() for v in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(m["grad_norm"]), gnorm, rtol=1e-5)
    # AdamW step 1: m_hat = g, v_hat = g^2 -> update = -lr * (g / (|g| + eps) + wd * theta).
    lr = 1e-2  # cosine at step 0 with no warm-up = peak
    expected = jax.tree.map(
        lambda p, gg: np.asarray(p) - lr * (gg / (np.abs(gg) + 1e-8) + 0.1 * np.asarray(p)),
        params,
        g,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state.params, expected
    )
    assert int(state.step) == 1


def test_grad_accum_and_clip_match_single_batch():
    params, batch = _setup(1)
    mask = np.ones(C, bool)
    ctx = {"rows": jnp.zeros((C, D)), "train_mask": jnp.asarray(mask)}
    logits_fn = heads.make_logits_fn(_features_fn, "linear", 1.0)
    loss_fn = train.make_loss_fn(logits_fn)
    out = []
    for accum in (1, 4):
        cfg = _config(lr=1e-2, warmup_steps=0, grad_clip=0.05)
        opt = train.make_optimizer(cfg)
        step = train.make_train_step(loss_fn, opt, _preprocess, lr=cfg.lr, grad_accum=accum)
        state = train.init_state(params, opt, 10)
        for _ in range(2):
            state, m = step(state, batch, jax.random.key(0), ctx)
        out.append((state.params, float(m["grad_norm"])))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[0][0], out[1][0]
    )
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5)


def test_update_mask_freezes_rows_under_weight_decay():
    params, batch = _setup(2)
    mask = np.array([True, True, False, False, False])
    ctx = {
        "rows": jnp.zeros((C, D)),
        "train_mask": jnp.asarray(mask),
        "update_mask": {
            "backbone": {"w": jnp.asarray(True)},
            "head": {"w": jnp.asarray(mask)[:, None], "b": jnp.asarray(mask)},
        },
    }
    batch["label"] = batch["label"] % 2
    opt = train.make_optimizer(_config())
    step = train.make_train_step(
        train.make_loss_fn(heads.make_logits_fn(_features_fn, "linear", 1.0)),
        opt,
        _preprocess,
        lr=0.1,
    )
    state, _ = step(train.init_state(params, opt, 10), batch, jax.random.key(0), ctx)
    np.testing.assert_array_equal(state.params["head"]["w"][2:], params["head"]["w"][2:])
    assert not np.allclose(state.params["head"]["w"][:2], params["head"]["w"][:2])


def _magmax_lr(base_lr, warmup, steps, step):
    """MagMax's published schedule, transcribed: linear warm-up from lr/warmup, cosine."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) * base_lr


@pytest.mark.parametrize("total,warmup", [(110, 10), (390, 500), (14, 5), (100, 0), (7, 7)])
def test_schedule_matches_magmax(total, warmup):
    got = [float(train.lr_at(s, total, 0.3, warmup)) for s in range(total)]
    ref = [_magmax_lr(0.3, warmup, total, s) for s in range(total)]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)
    assert min(got) > 0.0  # no step is a no-op
    # Within the task the rate never reaches 0: the last step trains too.
    assert got[-1] > 0.0


def test_schedule_warmup_longer_than_task_only_ramps():
    # CIFAR-100/10 in MagMax's code: 390 steps per task, 500 warm-up: ends at 0.78 lr.
    np.testing.assert_allclose(float(train.lr_at(389, 390, 1.0, 500)), 390 / 500, rtol=1e-6)
    np.testing.assert_allclose(float(train.lr_at(0, 4, 1.0, 500)), 1 / 500, rtol=1e-6)


@pytest.mark.parametrize(
    "n,k,expected",
    [(100, 4, [25, 50, 75, 100]), (10, 3, [3, 7, 10]), (2, 5, [1, 2]), (7, 1, [7]), (5, 0, [])],
)
def test_snapshot_spacing(n, k, expected):
    assert train.snapshot_steps(n, k) == expected


def _run_finetune(params, batches, steps, cfg, mask, snapshots=0, onset=0, task=3):
    logits_fn = heads.make_logits_fn(_features_fn, "linear", 1.0)
    loss_fn = train.make_loss_fn(logits_fn)
    opt = train.make_optimizer(cfg)
    step = train.make_train_step(
        loss_fn, opt, _preprocess, lr=cfg.lr, warmup_steps=cfg.warmup_steps
    )
    ctx = {"rows": jnp.zeros((C, D)), "train_mask": jnp.asarray(mask)}
    return (
        train.finetune(
            step,
            train.init_state(params, opt, steps),
            iter(batches),
            steps,
            key=jax.random.key(0),
            ctx=ctx,
            num_snapshots=snapshots,
            onset_steps=onset,
            task=task,
            progress=False,
        ),
        loss_fn,
        ctx,
    )


def test_finetune_snapshots_and_onset_grad_norm():
    params, _ = _setup(3)
    mask = np.ones(C, bool)
    batches = [_setup(10 + i)[1] for i in range(6)]
    # lr = 0: params never move, so the onset norm is the mean closed-form gradient norm.
    res, loss_fn, ctx = _run_finetune(
        params, batches, 6, _config(lr=0.0), mask, snapshots=3, onset=4
    )
    ref = np.mean(
        [
            np.sqrt(sum((v**2).sum() for v in jax.tree.leaves(_np_grads(params, b, mask)[1])))
            for b in batches[:4]
        ]
    )
    np.testing.assert_allclose(res.onset_grad_norm, ref, rtol=1e-5)
    direct = train.onset_grad_norm(
        loss_fn, params, batches[:4], _preprocess, key=jax.random.key(0), ctx=ctx
    )
    np.testing.assert_allclose(direct, ref, rtol=1e-5)
    assert len(res.snapshots) == 3
    # With training, snapshot 3 is the end point and snapshot 1 is the state after 2 steps.
    res, _, _ = _run_finetune(
        params, batches, 6, _config(lr=1e-2, warmup_steps=0), mask, snapshots=3
    )
    np.testing.assert_array_equal(res.snapshots[-1]["w"], res.state.params["backbone"]["w"])
    every, _, _ = _run_finetune(
        params, batches, 6, _config(lr=1e-2, warmup_steps=0), mask, snapshots=6
    )
    np.testing.assert_array_equal(res.snapshots[0]["w"], every.snapshots[1]["w"])
    np.testing.assert_array_equal(res.snapshots[1]["w"], every.snapshots[3]["w"])
    assert not np.allclose(res.snapshots[0]["w"], params["backbone"]["w"])
    assert res.losses.shape == (6,)


def test_nan_loss_names_task_and_step():
    params, batch = _setup(4)
    params["backbone"]["w"] = params["backbone"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(TrainingError, match=r"task 3 at step 1"):
        _run_finetune(params, [batch], 1, _config(), np.ones(C, bool))


def test_accuracies_task_agnostic_and_aware():
    logits = np.array([[5, 1, 0, 9], [0, 3, 0, 0], [1, 0, 2, 3], [0, 0, 1, 0.5]], float)
    labels = np.array([0, 0, 2, 3])
    tasks = np.array([0, 0, 1, 1])
    tc = [np.array([0, 1]), np.array([2, 3])]
    agn, aware = metrics.task_accuracies(logits, labels, tasks, tc)
    # agnostic argmax: [3, 1, 3, 2] -> task0 0/2, task1 0/2; aware: [0,1] -> task0 1/2, [3,2] 0/2
    np.testing.assert_allclose(agn, [0.0, 0.0])
    np.testing.assert_allclose(aware, [0.5, 0.0])
    agn, _ = metrics.task_accuracies(logits[:2], labels[:2], tasks[:2], tc)
    np.testing.assert_allclose(agn, [0.5])


def test_lwf_loss_matches_numpy_kl():
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    old = np.array([True, True, False, True, False, False])
    T = 2.0

    def sm(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt, ps = sm(zt[:, old] / T), sm(zs[:, old] / T)
    ref = T**2 * (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
    got = regularizers.lwf_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(old), T)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    assert (
        float(regularizers.lwf_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.zeros(6, bool), T)) == 0.0
    )


def test_ewc_penalty_and_fisher():
    p = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    a = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([[1.0]])}
    f = {"a": jnp.array([2.0, 0.5]), "b": jnp.array([[4.0]])}
    np.testing.assert_allclose(
        float(regularizers.ewc_penalty(p, a, f)), 0.5 * (2 * 1 + 0.5 * 1 + 4 * 4), rtol=1e-6
    )
    # loss = sum(x * w): grad = x, Fisher = mean of x^2 over batches.
    xs = [np.array([1.0, 2.0]), np.array([3.0, -1.0])]
    fisher = regularizers.fisher_diagonal(lambda w, x: jnp.sum(x * w), jnp.zeros(2), xs)
    np.testing.assert_allclose(fisher, [5.0, 2.5])
