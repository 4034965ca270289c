"""The storage-light baselines as runner methods: cmm, opcm, became, tunable_magmax, pam and
magmax_ind, on the 2-task tiny config.

For each method: (i) the run's merged models equal the pure merge function of
``trm_jax.merging`` re-run outside the runner on the recorded inputs (theta_0, theta_t, the
previous merged model and state), and where the method trains differently, a re-run of
that fine-tuning outside the loop; (ii) a run stopped after task 1 and resumed gives a
bit-identical accuracy matrix; (iii) ``stored_bytes`` is exactly theta_0 + theta_bar_t +
head rows + the bytes of the state the method declares (``state_like``), which are also
the bytes of the state it returns. A kill -9 test resumes a CLI run killed after its
first checkpoint.
"""

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import FMNIST, ROOT, tiny_config

from trm_jax import merging, metrics, runner
from trm_jax.data import pipeline
from trm_jax.merging import aligned, became, cmm, opcm, task_vectors, tunable_magmax
from trm_jax.models import heads
from trm_jax.runner import methods, setup, train
from trm_jax.runner.methods import became as became_method
from trm_jax.runner.methods import cmm as cmm_method
from trm_jax.tree_util import leaf_names, tree_bytes

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST IDX not installed")

NEW = ("cmm", "opcm", "became", "tunable_magmax", "pam", "magmax_ind")
# A visible representation correction; alignment at steps 2 and 4 of the 4-step tasks.
OVERRIDES = {
    "cmm": {"merge.cmm.representation_lr": 1e-3},
    "pam": {"merge.pam.align_every": 2},
}
ROWS_BYTES = 10 * 16 * 4  # the prototype rows of the tiny stream, float32 [10, 16]


class Rec(NamedTuple):
    """One ``merge`` call of a run: its inputs and outputs."""

    task: Any
    carry: Any
    finetuned: Any
    merged: Any
    state: Any


def _config(method, **over):
    return tiny_config(**{"merge.method": method, **OVERRIDES.get(method, {}), **over})


def _run_recorded(method, workdir, **over):
    """(config, metrics, [Rec per task]) of an uninterrupted run."""
    recs = []
    m = methods.get(method)
    orig = m.merge

    def merge(task, carry, finetuned):
        out = orig(task, carry, finetuned)
        recs.append(Rec(task, carry, finetuned, out[0], out[1]))
        return out

    cfg = _config(method, **over)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "merge", merge)
        out = runner.run(cfg, workdir)
    return cfg, out, recs


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """method -> (config, metrics, records) of its uninterrupted run, computed once."""
    cache = {}
    root = tmp_path_factory.mktemp("full")

    def get(method):
        if method not in cache:
            cache[method] = _run_recorded(method, str(root / method))
        return cache[method]

    return get


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol), a, b
    )


def _check_resume_and_bytes(tmp_path, method, full, state_bytes):
    """(ii) stop after task 1 + resume == uninterrupted; (iii) stored bytes."""
    cfg, out, recs = full(method)
    stopped = cfg.copy_and_resolve_references()
    stopped.debug.stop_after_task = 1
    wd = str(tmp_path / "resumed")
    assert runner.run(stopped, wd) == {"stopped_after_task": 1}
    resumed = runner.run(cfg, wd)
    np.testing.assert_array_equal(
        np.asarray(resumed["acc_matrix"], float), np.asarray(out["acc_matrix"], float)
    )
    np.testing.assert_array_equal(resumed["task_aware_matrix"], out["task_aware_matrix"])
    assert resumed["stored_bytes"] == out["stored_bytes"]

    theta0 = recs[0].task.theta0
    b = tree_bytes(theta0)
    declared = [tree_bytes(methods.get(method).state_like(cfg, theta0, n)) for n in (1, 2)]
    assert declared == [state_bytes(b, 1), state_bytes(b, 2)]
    assert [tree_bytes(r.state) for r in recs] == declared
    # theta_0 (the prototype rows' features) + theta_bar_t + rows + the state.
    assert out["stored_bytes"] == [2 * b + ROWS_BYTES + s for s in declared]


def _refinetune(rec, start, step=None):
    """Task ``rec.task.t``'s fine-tuning re-run outside the loop from ``start`` with the
    loop's data order, key and loss inputs; ``step``: (optimizer, step_fn), default the
    shared step of the run's config."""
    task, fin = rec.task, rec.finetuned
    cfg, tr = task.config, fin.training
    if step is None:
        opt, _, step_fn, _ = setup.make_step(
            cfg, task.model, cfg.train, methods.Method().loss_terms(cfg)
        )
    else:
        opt, step_fn = step
    batches = pipeline.endless_batches(
        tr.images, tr.labels, cfg.train.batch_size, setup.seed_of(cfg.seed, task.t, 1)
    )
    res = train.finetune(
        step_fn,
        train.init_state({"backbone": start, "head": task.head}, opt, tr.num_steps),
        batches,
        tr.num_steps,
        key=setup.key_of(cfg.seed, task.t, 2),
        ctx=fin.ctx,
        progress=False,
    )
    return res.state.params["backbone"], res.state.opt_state, res.losses


def test_registry_and_declarations():
    for name in NEW:
        m = methods.get(name)
        assert m.name == name and m.finetunes and m.merges
        assert m.needs_theta0 == (name != "became")
    cfg = tiny_config()
    for name in ("magmax_ind", "pam", "opcm"):
        assert not methods.get(name).chained(tiny_config(**{"merge.chain": "finetuned"}))
    assert methods.get("tunable_magmax").chained(tiny_config(**{"merge.chain": "finetuned"}))
    assert cfg.merge.cmm.representation_trainable == "auto"


# ----------------------------------------------------------------------------- cmm


def _lin_logits(fn, theta0, params, x, rows, scale):
    """The linearised backbone by hand (``jax.jvp``), with the cosine head after it."""
    tangent = jax.tree.map(jnp.subtract, params, theta0)
    out, dout = jax.jvp(lambda p: fn(p, x), (theta0,), (tangent,))
    return heads.cosine_logits(out + dout, rows, scale)


def _cmm_reference(rec, c, theta0, features_fn):
    """theta_bar_t and the state from ``merging.cmm.merge_task`` on the recorded inputs."""
    c = c.copy_and_resolve_references()
    c.representation_trainable = cmm_method.trainable_pattern("auto", theta0)
    nu = cmm.adam_nu(rec.finetuned.opt_state)["backbone"] if c.fisher_merge else None
    state = rec.carry.state if rec.carry.state is not None else cmm.init(theta0)
    merged, state, _ = cmm.merge_task(
        state,
        rec.carry.merged,
        rec.finetuned.theta_t,
        nu,
        config=c,
        features_fn=features_fn,
        batches=cmm_method.representation_batches(rec.task),
        params0=theta0,
    )
    return merged, state


def test_cmm_end_to_end_reference_resume_bytes(tmp_path, full):
    cfg, out, recs = full("cmm")
    theta0, model = recs[0].task.theta0, recs[0].task.model
    fn = model.backbone.features_fn
    # The trainable pattern of stage (c) on our ViT (no projection): the final LayerNorm.
    pattern = cmm_method.trainable_pattern("auto", theta0)
    trainable = [n for n in leaf_names(theta0) if re.search(pattern, n)]
    assert trainable == ["Transformer/encoder_norm/bias", "Transformer/encoder_norm/scale"]

    # (a) Task 1 trains the linearised model: re-run with a hand-built jvp loss.
    def lin_logits_fn(params, images, ctx):
        return _lin_logits(fn, ctx["linearize_at"], params["backbone"], images, ctx["rows"], 10.0)

    loss = train.make_loss_fn(lin_logits_fn)
    opt = train.make_optimizer(cfg.train)
    step = train.make_train_step(loss, opt, model.preprocess, lr=cfg.train.lr, warmup_steps=1)
    theta1, opt_state, _ = _refinetune(recs[0], theta0, (opt, step))
    _assert_trees_close(theta1, recs[0].finetuned.theta_t)
    _assert_trees_close(cmm.adam_nu(opt_state), cmm.adam_nu(recs[0].finetuned.opt_state))
    _assert_trees_equal(recs[1].finetuned.training.start, recs[0].merged)  # sequential

    # (b) + (c): the pure merge_task on the recorded inputs gives the run's merge.
    for rec in recs:
        merged, state = _cmm_reference(rec, cfg.merge.cmm, theta0, fn)
        _assert_trees_equal(merged, rec.merged)
        _assert_trees_equal(state, rec.state)
    _assert_trees_equal(recs[0].merged, recs[0].finetuned.theta_t)  # task 1: theta_1
    # Stage (c) moved only the final LayerNorm of the stage-(b) merge.
    c = cfg.merge.cmm.copy_and_resolve_references()
    c.representation = False
    stage_b, _ = _cmm_reference(recs[1], c, theta0, fn)
    moved = {
        n
        for n, a, b in zip(
            leaf_names(theta0),
            jax.tree.leaves(stage_b),
            jax.tree.leaves(recs[1].merged),
            strict=True,
        )
        if not np.array_equal(a, b)
    }
    assert moved and moved <= set(trainable)

    # Evaluation is in the linearised model: the last accuracy row from a hand-built
    # linearised prediction of theta_bar_2.
    task = recs[1].task
    sets = [task.stream.split("test", j) for j in range(2)]
    x = np.concatenate([s[0] for s in sets])
    prep = setup.preprocess_fn(model)
    logits = np.asarray(_lin_logits(fn, theta0, recs[1].merged, prep(x), task.rows, 10.0))
    ids = np.concatenate([np.full(len(s[1]), j) for j, s in enumerate(sets)])
    labels = np.concatenate([s[1] for s in sets])
    agn, _ = metrics.task_accuracies(logits, labels, ids, task.stream.task_classes)
    np.testing.assert_allclose(out["acc_matrix"][1], agn, atol=1e-12)

    _check_resume_and_bytes(tmp_path, "cmm", full, lambda b, n: b + 4)


def test_cmm_every_switch_combination_runs_and_matches(tmp_path):
    for lin in (False, True):
        for fisher in (False, True):
            for rep in (False, True):
                if lin and fisher and rep:
                    continue  # the default: the test above
                over = {
                    "merge.cmm.linearize": lin,
                    "merge.cmm.fisher_merge": fisher,
                    "merge.cmm.representation": rep,
                }
                cfg, out, recs = _run_recorded("cmm", str(tmp_path / f"{lin}{fisher}{rep}"), **over)
                assert np.all(np.isfinite(np.asarray(out["acc_matrix"], float)[1]))
                theta0 = recs[0].task.theta0
                fn = recs[0].task.model.backbone.features_fn
                c = cfg.merge.cmm
                for rec in recs:
                    merged, state = _cmm_reference(rec, c, theta0, fn)
                    _assert_trees_equal(merged, rec.merged)
                    _assert_trees_equal(state, rec.state)
                if not fisher and not rep:  # the plain interpolation
                    want = jax.tree.map(
                        lambda p, q, a=cfg.merge.cmm.alpha: (1 - a) * p + a * q,
                        recs[1].carry.merged,
                        recs[1].finetuned.theta_t,
                    )
                    _assert_trees_close(recs[1].merged, want)
    sgd = tiny_config(**{"merge.method": "cmm", "train.optimizer": "sgd"})
    with pytest.raises(Exception, match="Adam's second moments"):
        runner.run(sgd, str(tmp_path / "sgd"))


# ----------------------------------------------------------------------------- opcm


def test_opcm_end_to_end_reference_resume_bytes(tmp_path, full):
    cfg, out, recs = full("opcm")
    theta0 = recs[0].task.theta0
    state = opcm.init(theta0)
    kinds = opcm.kinds_from_config(theta0, cfg.merge.opcm)
    for rec in recs:
        assert rec.finetuned.training.start is theta0 and not rec.finetuned.training.from_merged
        merged, state = opcm.merge_step(
            theta0, state, rec.finetuned.theta_t, alpha=cfg.merge.opcm.alpha, kinds=kinds
        )
        _assert_trees_equal(merged, rec.merged)
        _assert_trees_equal(state, rec.state)
    # Task 2 fine-tuned from theta_0 (re-run outside the loop).
    theta2, _, _ = _refinetune(recs[1], theta0)
    _assert_trees_equal(theta2, recs[1].finetuned.theta_t)
    _check_resume_and_bytes(tmp_path, "opcm", full, lambda b, n: b + 12)


# ----------------------------------------------------------------------------- became


def test_became_end_to_end_reference_resume_bytes(tmp_path, full):
    cfg, out, recs = full("became")
    theta0, model = recs[0].task.theta0, recs[0].task.model
    state = became.init(theta0)
    for rec in recs:
        task = rec.task
        apply_fn = heads.cosine_apply_fn(model.backbone.features_fn, task.rows, 10.0)
        merged, state, coef = became.merge_task(
            state,
            rec.carry.merged,
            rec.finetuned.theta_t,
            apply_fn,
            lambda task=task: became_method.fisher_batches(task),
            jnp.asarray(task.classes.task_mask),
            config=cfg.merge.became,
        )
        _assert_trees_close(merged, rec.merged)
        _assert_trees_close(state, rec.state, rtol=1e-4, atol=1e-10)
    assert 0.0 < float(coef) < 1.0
    np.testing.assert_allclose(out["merge_info"][1]["coef"], float(coef), rtol=1e-5)
    # Sequential: task 2 starts from theta_bar_1.
    _assert_trees_equal(recs[1].finetuned.training.start, recs[0].merged)
    _check_resume_and_bytes(tmp_path, "became", full, lambda b, n: b + 4)


# ----------------------------------------------------------------------------- tunable


def test_tunable_magmax_end_to_end_reference_resume_bytes(tmp_path, full):
    cfg, out, recs = full("tunable_magmax")
    theta0 = recs[0].task.theta0
    c = cfg.merge.tunable_magmax
    taus = [task_vectors.task_vector(r.finetuned.theta_t, theta0) for r in recs]
    train_counts = [len(r.task.labels) for r in recs]  # training labels, never test data
    for t, rec in enumerate(recs):
        merged = tunable_magmax.merge(
            theta0,
            taus[: t + 1],
            preference=train_counts[: t + 1],
            key=setup.key_of(c.seed, 1000 + t),
            lam=c.lam,
        )
        _assert_trees_equal(merged, rec.merged)
        _assert_trees_equal(rec.state["taus"], taus[: t + 1])
        assert np.asarray(rec.state["counts"]).tolist() == train_counts[: t + 1]
    _check_resume_and_bytes(tmp_path, "tunable_magmax", full, lambda b, n: n * b + 4 * n)


# ----------------------------------------------------------------------------- pam


def test_pam_end_to_end_reference_resume_bytes(tmp_path, full):
    cfg, out, recs = full("pam")
    theta0, c = recs[0].task.theta0, cfg.merge.pam
    state = aligned.init(theta0)
    for rec in recs:
        merged, state = aligned.merge_step(theta0, state, rec.finetuned.theta_t)
        _assert_trees_equal(merged, rec.merged)
        _assert_trees_equal(state, rec.state)
    # Task 2 starts from the global weights theta_bar_1; re-run with the shared step and
    # the reset applied from Python after steps 2 and 4.
    rec = recs[1]
    glob = rec.carry.merged
    _assert_trees_equal(rec.finetuned.training.start, glob)
    opt, _, shared, _ = setup.make_step(
        cfg, rec.task.model, cfg.train, methods.Method().loss_terms(cfg)
    )
    aligned_calls = []

    def step_with_reset(state, batch, key, ctx):
        state, m = shared(state, batch, key, ctx)
        if int(state.step) % c.align_every == 0:
            aligned_calls.append(int(state.step))
            bb = aligned.align(
                state.params["backbone"], glob, theta0, p=c.align_fraction, reset=c.reset
            )
            state = state._replace(params={**state.params, "backbone": bb})
        return state, m

    theta2, _, _ = _refinetune(rec, glob, (opt, step_with_reset))
    assert aligned_calls == [2, 4]
    _assert_trees_close(theta2, rec.finetuned.theta_t)
    # The end point was aligned: no conflicting entry left; unaligned training has some.
    _, left = aligned.align(rec.finetuned.theta_t, glob, theta0, return_count=True)
    assert int(left) == 0
    plain, _, _ = _refinetune(rec, glob, (opt, shared))
    _, conflicts = aligned.align(plain, glob, theta0, return_count=True)
    assert int(conflicts) > 0
    # Task 1 has no global weights yet: no reset (plain fine-tuning from theta_0).
    theta1, _, _ = _refinetune(recs[0], theta0, (opt, shared))
    _assert_trees_close(theta1, recs[0].finetuned.theta_t)
    _check_resume_and_bytes(tmp_path, "pam", full, lambda b, n: b + 4)


# ----------------------------------------------------------------------------- magmax_ind


def test_magmax_ind_starts_every_task_at_theta0(tmp_path, full):
    cfg, out, recs = full("magmax_ind")
    theta0 = recs[0].task.theta0
    for rec in recs:
        assert rec.finetuned.training.start is theta0 and not rec.finetuned.training.from_merged
    # Task 2's fine-tuning re-run outside the loop from theta_0 gives the run's theta_2,
    # and its first loss is a from-theta_0 loss, unlike sequential fine-tuning's.
    theta2, _, losses = _refinetune(recs[1], theta0)
    _assert_trees_equal(theta2, recs[1].finetuned.theta_t)
    _, _, seq_losses = _refinetune(recs[1], recs[0].finetuned.theta_t)
    assert losses[0] != seq_losses[0]
    taus = [task_vectors.task_vector(r.finetuned.theta_t, theta0) for r in recs]
    for t, rec in enumerate(recs):
        _assert_trees_equal(merging.magmax(theta0, taus[: t + 1], lam=cfg.merge.lam), rec.merged)
    # The onset probe (at theta_bar_1) is recorded, since the run starts elsewhere.
    assert len(out["onset_grad_norm"]) == 1 and out["onset_grad_norm"][0] > 0
    _check_resume_and_bytes(tmp_path, "magmax_ind", full, lambda b, n: b + 4)


# ----------------------------------------------------------------------------- kill -9


def _flags(method):
    over = {"merge.method": method, **OVERRIDES.get(method, {})}
    return [f"--config.{k}={v}" for k, v in over.items()]


# Every new method, killed by the OS while it runs task 2 (each CLI start pays JAX's
# import; the compilation cache is shared).
KILLED = ("cmm", "opcm", "became", "tunable_magmax", "pam", "magmax_ind")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by the CLI runs (same executables)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.parametrize("method", KILLED)
def test_kill_dash_nine_after_first_checkpoint_resumes_exactly(tmp_path, full, jax_cache, method):
    cfg, out, _ = full(method)
    wd = str(tmp_path / "killed")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # XLA_FLAGS as in-process
    cmd = [sys.executable, "-m", "trm_jax.main", "--config", os.path.join(ROOT, "configs/tiny.py")]
    cmd += ["--workdir", wd, f"--jax_cache={jax_cache}", *_flags(method)]
    log = tmp_path / "stderr.txt"
    first = os.path.join(wd, "checkpoints", "1")
    with open(log, "w") as err:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 240
            while not os.path.isdir(first) and child.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            alive = child.poll() is None
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert alive and os.path.isdir(first), log.read_text()[-2000:]
    assert child.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(wd, "metrics.json"))
    resumed = runner.run(cfg, wd)
    np.testing.assert_array_equal(
        np.asarray(resumed["acc_matrix"], float), np.asarray(out["acc_matrix"], float)
    )
    assert resumed["stored_bytes"] == out["stored_bytes"]
