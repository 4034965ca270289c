"""The fashion_digits benchmark's pieces: its config, the train_part halves, the concat and
sklearn_digits sources, and the frozen rows read off the pre-training data."""

import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import data
from trm_jax.data import tasks
from trm_jax.errors import ConfigError, DataError
from trm_jax.models import heads
from trm_jax.runner import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="no Fashion-MNIST IDX files")


def _load_config(name):
    spec = importlib.util.spec_from_file_location(
        f"cfg_{name}", os.path.join(ROOT, "configs", name)
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _write_npz(path, n_classes=4, per_class=21, names=None):
    """Images encode their own index in pixels (0,0) and (0,1)."""
    n = n_classes * per_class
    idx = np.arange(n)
    x = np.zeros((n, 6, 6), np.uint8)
    x[:, 0, 0], x[:, 0, 1] = idx % 256, idx // 256
    y = idx % n_classes
    names = names or [f"c{i}" for i in range(n_classes)]
    np.savez(path, x_train=x, y_train=y, x_test=x[:n_classes], y_test=y[:n_classes],
             class_names=np.array(names))  # fmt: skip


def _index(images):
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def _cfg(**kw):
    c = data.default_config()
    c.update(kw)
    return c


def test_fashion_digits_config_loads_in_the_regime():
    c = _load_config("fashion_digits.py")
    assert c.data.name == "fashion_digits" and c.data.source == "concat"
    assert c.train.steps >= 100
    assert c.model.head == "zeroshot" and c.model.zeroshot_head in setup.PRETRAINED_ROWS
    stream_parts = tasks.parse_parts(c.data.parts)
    pre_parts = tasks.parse_parts(c.pretrain.data.parts)
    # the shared source takes disjoint halves; the digits come from different sources
    assert {stream_parts[0][2], pre_parts[0][2]} == {"a", "b"}
    assert stream_parts[0][:2] == pre_parts[0][:2] == ("fashion_mnist", "idx")
    assert stream_parts[1][1] != pre_parts[1][1]
    assert tasks.get_benchmark(c.data.name).num_classes % c.data.num_tasks == 0


def test_train_part_halves_are_disjoint_cover_and_ignore_seeds(tmp_path):
    path = str(tmp_path / "d.npz")
    _write_npz(path)
    seen = {}
    for part in ("a", "b"):
        ids = []
        for split_seed in (0, 5):
            s = data.load_stream(
                _cfg(
                    source="npz",
                    name="custom",
                    path=path,
                    num_tasks=1,
                    val_fraction=0.2,
                    split_seed=split_seed,
                    train_part=part,
                )  # fmt: skip
            )
            ids.append(
                np.sort(np.concatenate([_index(s.images["train"]), _index(s.images["val"])]))
            )
        np.testing.assert_array_equal(ids[0], ids[1])  # the half does not depend on split_seed
        seen[part] = ids[0]
    assert not np.intersect1d(seen["a"], seen["b"]).size
    np.testing.assert_array_equal(np.sort(np.concatenate([seen["a"], seen["b"]])), np.arange(84))
    labels = np.arange(84) % 4
    for part in ("a", "b"):  # halves are per class: 21 -> 10 + 11
        counts = np.bincount(labels[seen[part]], minlength=4)
        assert set(counts.tolist()) == {10 if part == "a" else 11}


def test_train_part_indices_reference():
    labels = np.array([0, 1, 0, 1, 0, 1, 0])
    a = tasks.train_part_indices(labels, "a")
    b = tasks.train_part_indices(labels, "b")
    ref = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([0, c, 4]).permutation(idx)
        ref.append(perm[: len(idx) // 2])
    np.testing.assert_array_equal(a, np.sort(np.concatenate(ref)))
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(7))
    np.testing.assert_array_equal(tasks.train_part_indices(labels, ""), np.arange(7))
    with pytest.raises(ConfigError):
        tasks.train_part_indices(labels, "c")


def test_parse_parts_errors():
    assert tasks.parse_parts("fashion_mnist:idx:b, mnist5k:mnist5k") == [
        ("fashion_mnist", "idx", "b"),
        ("mnist5k", "mnist5k", ""),
    ]
    for bad in ("", "fashion_mnist", "a:b:c:d", "fashion_mnist:idx:x"):
        with pytest.raises(ConfigError):
            tasks.parse_parts(bad)


def test_sklearn_digits_source():
    pytest.importorskip("sklearn")
    s = data.load_stream(_cfg(source="sklearn_digits", name="sklearn_digits", num_tasks=1))
    assert s.image_shape == (28, 28, 1)
    n = sum(len(s.labels[k]) for k in ("train", "val", "test"))
    assert n == 1797
    x = s.images["train"]
    assert x[:, :4].max() == 0 and x[:, 24:].max() == 0  # MNIST's 20x20 box in a 28x28 frame
    assert x.max() > 200


@needs_fmnist
def test_concat_parts_stack_label_spaces_and_match_train_part():
    pytest.importorskip("sklearn")
    c = _cfg(source="concat", name="fashion_digits", num_tasks=5, val_fraction=0.0,
             parts="fashion_mnist:idx:b,sklearn_digits:sklearn_digits")  # fmt: skip
    s = data.load_stream(c)
    assert s.num_classes == 20 and s.class_names[10:] == tuple(str(d) for d in range(10))
    fm = data.load_stream(_cfg(name="fashion_mnist", source="idx", num_tasks=5, val_fraction=0.0,
                               train_part="b"))  # fmt: skip
    is_fm = s.labels["train"] < 10
    np.testing.assert_array_equal(s.images["train"][is_fm], fm.images["train"])
    np.testing.assert_array_equal(s.labels["train"][is_fm], fm.labels["train"])
    # the other half of Fashion-MNIST (pre-training) shares no image index with this one
    raw = tasks.local.load_idx(tasks.get_benchmark("fashion_mnist"), _cfg())
    a = tasks.train_part_indices(raw.train_labels, "a")
    b = tasks.train_part_indices(raw.train_labels, "b")
    assert not np.intersect1d(a, b).size and len(a) + len(b) == 60000
    swapped = "sklearn_digits:sklearn_digits,fashion_mnist:idx"
    with pytest.raises(DataError):  # the parts' classes, in order, must be the benchmark's
        data.load_stream(_cfg(source="concat", name="fashion_digits", num_tasks=5, parts=swapped))


def test_pretrained_rows_match_classes_by_name(tmp_path):
    """Rows come from the pre-training data's features and follow the stream's class order."""
    path = str(tmp_path / "pre.npz")
    _write_npz(path, n_classes=3, per_class=30, names=["x", "y", "z"])
    pre_cfg = _cfg(source="npz", name="custom", path=path, num_tasks=1, val_fraction=0.0)
    # features: a fixed direction per class + noise, read off the label encoded in the image
    dirs = np.eye(3, 5, dtype=np.float32) + 0.1

    def features(params, x):
        idx = np.asarray(x[:, 0, 0, 0], np.int64) + 256 * np.asarray(x[:, 0, 1, 0], np.int64)
        noise = np.sin(idx[:, None] * np.arange(1.0, 6.0)).astype(np.float32)
        return jnp.asarray(dirs[idx % 3] + 0.3 * noise)

    model = types.SimpleNamespace(features=features)
    stream = types.SimpleNamespace(class_names=("z", "x", "y"))
    for kind in setup.PRETRAINED_ROWS:
        config = types.SimpleNamespace(
            pretrain=types.SimpleNamespace(data=pre_cfg),
            eval=types.SimpleNamespace(batch_size=16),
            model=types.SimpleNamespace(zeroshot_head=kind, head_scale=8.0),
        )
        rows = np.asarray(setup.pretrained_rows(config, model, stream, None))
        assert rows.shape == (3, 5)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
        # stream class i is the pre-training class named stream.class_names[i]
        best = np.argmax(rows @ np.asarray(heads.l2_normalize(dirs)).T, axis=1)
        np.testing.assert_array_equal(best, [2, 0, 1])
    stream = types.SimpleNamespace(class_names=("z", "w", "y"))
    with pytest.raises(ConfigError, match="lacks"):
        setup.pretrained_rows(config, model, stream, None)


def test_probe_fit_lowers_the_cosine_cross_entropy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    centers = rng.normal(size=(4, 8)).astype(np.float32)
    f = jnp.asarray(centers[y] + 0.8 * rng.normal(size=(400, 8)).astype(np.float32))
    onehot = jnp.asarray(np.eye(4, dtype=np.float32)[y])
    proto = heads.prototype_rows(f, y, np.arange(4))

    def ce(rows):
        logits = heads.cosine_logits(f, rows, 8.0)
        return float(-jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)))

    fitted = setup._probe_fit(f, onehot, proto, 8.0)
    assert ce(fitted) < ce(proto)


# ------------------------------------------------------------------- TRM options (part 3)


def _np_kl(teacher, student, tau, mask):
    def logsm(z):
        z = np.where(mask, z, -1e9) / tau
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    t, s = logsm(teacher), logsm(student)
    return tau**2 * np.mean(np.sum(np.where(mask, np.exp(t) * (t - s), 0.0), -1))


def _trm_ctx(w_prev, num_classes=5):
    from trm_jax.merging.trm.objectives import Context

    old = np.array([1, 1, 0, 0, 0], bool)[:num_classes]
    task = np.array([0, 0, 1, 1, 0], bool)[:num_classes]
    return Context(
        task_mask=jnp.asarray(task),
        old_mask=jnp.asarray(old),
        seen_mask=jnp.asarray(old | task),
        temperature=jnp.asarray(2.0),
        probe_head=None,
        previous=w_prev,
        expert=w_prev,
    )


def test_consistency_kl_mix_matches_numpy():
    from trm_jax.merging.trm import objectives as obj

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype(np.float64)
    w, w_prev = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    apply_fn = lambda p, images: images @ p  # noqa: E731
    ctx = _trm_ctx(jnp.asarray(w_prev))
    targets = {"previous_logits": jnp.asarray(x @ w_prev)}
    got = obj.CONSISTENCY["kl_mix"](
        apply_fn, jnp.asarray(w), jnp.asarray(x @ w), {"image": jnp.asarray(x)}, targets, ctx
    )
    mixed = 0.5 * (x + np.roll(x, -1, axis=0))
    old = np.asarray(ctx.old_mask)
    ref = 0.5 * (_np_kl(x @ w_prev, x @ w, 2.0, old) + _np_kl(mixed @ w_prev, mixed @ w, 2.0, old))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # equal models: zero; and only the student gets a gradient
    same = obj.consistency_kl_mix(
        apply_fn, jnp.asarray(w_prev), jnp.asarray(x @ w_prev), {"image": jnp.asarray(x)},
        targets, ctx,
    )  # fmt: skip
    assert abs(float(same)) < 1e-6


def test_g_probe_relative_matches_numpy():
    from trm_jax.merging.trm import objectives as obj

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3))
    w = rng.normal(size=(3, 5))
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    ctx = _trm_ctx(None)
    seen = np.asarray(ctx.seen_mask)
    targets = {"probe_labels": jnp.asarray(labels), "g_ref": jnp.asarray(1.0)}
    apply_fn = lambda p, images: images @ p  # noqa: E731
    got = obj.MEASURES["probe_relative"](
        apply_fn, jnp.asarray(w), {"image": jnp.asarray(x)}, targets, ctx
    )
    z = np.where(seen, x @ w, -1e9)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(5)[labels]
    loss = -np.mean(np.log(p[np.arange(8), labels]))
    grad = x.T @ (p - onehot) / 8
    np.testing.assert_allclose(float(got), np.sum(grad**2) / loss, rtol=1e-4)
    term = obj.RESPONSIVENESS["probe_relative"](
        apply_fn, jnp.asarray(w), None, {"image": jnp.asarray(x)}, targets, ctx
    )
    np.testing.assert_allclose(
        float(term), np.log1p(np.exp(np.log(1.0) - np.log(np.sum(grad**2) / loss))), rtol=1e-4
    )


def test_increments_span_the_trajectory_and_init_exactly():
    from trm_jax.merging.trm import config as tcfg
    from trm_jax.merging.trm import subspace as sub

    rng = np.random.default_rng(2)
    tree = lambda: {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=4))}  # noqa: E731
    base, prev = tree(), tree()
    snaps = [tree() for _ in range(3)]
    kw = dict(granularity="leaf", lam=0.5)
    s_d, lay_d = sub.build_subspace(
        base, prev, snaps, directions=("trajectory", "history"), init="previous", **kw
    )
    s_i, lay_i = sub.build_subspace(
        base, prev, snaps, directions=("increments", "history"), init="previous", **kw
    )
    assert lay_i.direction_names == ("i1", "i2", "i3", "h")
    d = np.asarray(s_i.directions["a"])
    step = np.asarray(snaps[1]["a"] - snaps[0]["a"])
    np.testing.assert_allclose(d[1], step, rtol=1e-5, atol=1e-6)
    # same span: sum_k c_k i_k = sum_k (c_k - c_{k+1}) d_k
    c = rng.normal(size=(len(lay_i.group_names), 4))
    a = c.copy()
    a[:, :2] = c[:, :2] - c[:, 1:3]
    for leaf in ("a", "b"):
        np.testing.assert_allclose(
            np.asarray(sub.combine(s_i, jnp.asarray(c), lay_i)[leaf]),
            np.asarray(sub.combine(s_d, jnp.asarray(a), lay_d)[leaf]),
            rtol=1e-5,
            atol=1e-6,
        )
    s_e, lay_e = sub.build_subspace(
        base, prev, snaps, directions=("increments",), init="expert", **kw
    )
    np.testing.assert_array_equal(np.asarray(s_e.alpha_init), 1.0)
    # alpha_init reproduces the anchor (theta_t) through the directions too
    moved = {
        k: np.asarray(prev[k]) + np.tensordot(np.ones(3), np.asarray(s_e.directions[k]), 1)
        for k in ("a", "b")
    }
    for k in ("a", "b"):
        np.testing.assert_allclose(moved[k], np.asarray(snaps[-1][k]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(s_e.anchor[k]), np.asarray(snaps[-1][k]))
    cfg = _trm_default(directions=("trajectory", "increments"))
    with pytest.raises(ConfigError, match="same subspace"):
        tcfg.validate_config(cfg)
    tcfg.validate_config(_trm_default(directions=("increments", "consensus")))
    assert tuple(tcfg.default_config().directions) == tcfg.DIRECTIONS  # default unchanged


def _trm_default(**kw):
    from trm_jax.merging.trm import config as tcfg

    c = tcfg.default_config()
    c.update(kw)
    return c


def test_reg_theta_is_the_relative_squared_move_of_the_parameters():
    from trm_jax.merging import trm
    from trm_jax.merging.trm import subspace as sub

    rng = np.random.default_rng(3)
    tree = lambda: {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=4))}  # noqa: E731
    base, prev = tree(), tree()
    snaps = [tree() for _ in range(3)]
    s, lay = sub.build_subspace(base, prev, snaps, granularity="leaf", lam=0.5, init="magmax")
    alpha = s.alpha_init + jnp.asarray(rng.normal(size=s.alpha_init.shape))
    params = sub.combine(s, alpha, lay)
    ctx = _trm_ctx(None)._replace(previous=prev, expert=snaps[-1])
    got = trm.REG["theta"](alpha, s.alpha_init, params, s.anchor, ctx)
    # NumPy: theta(alpha) rebuilt from the directions, not from combine
    move = sum(
        np.sum(
            np.tensordot(
                np.asarray(alpha - s.alpha_init)[lay.groups[i]], np.asarray(s.directions[k]), 1
            )
            ** 2
        )
        for i, k in enumerate(("a", "b"))
    )
    scale = sum(np.sum((np.asarray(snaps[-1][k]) - np.asarray(prev[k])) ** 2) for k in ("a", "b"))
    np.testing.assert_allclose(float(got), move / scale, rtol=1e-5)
    assert float(trm.REG["theta"](s.alpha_init, s.alpha_init, s.anchor, s.anchor, ctx)) == 0.0
    # the reference term is unchanged and ignores the extra arguments
    l2 = trm.REG["l2"](alpha, s.alpha_init, params, s.anchor, ctx)
    np.testing.assert_allclose(float(l2), np.sum(np.asarray(alpha - s.alpha_init) ** 2), rtol=1e-6)
    with pytest.raises(ConfigError, match="'reg' is 'l1'"):
        trm.validate_config(_trm_default(reg="l1"))


def test_prepare_checks_every_concat_part_and_sklearn_digits():
    from trm_jax import prepare

    c = _load_config("fashion_digits.py")
    c.data.parts = "sklearn_digits:sklearn_digits,mnist5k:mnist5k"  # both ship with pip
    item = prepare._data_item("data", c.data, fetch=False)
    assert item.ok and item.status == "found", item
    assert "scikit-learn" in item.where
    c.data.parts = "sklearn_digits:sklearn_digits,mnist5k:npz"  # npz part: no file given
    item = prepare._data_item("data", c.data, fetch=False)
    assert not item.ok and item.status == "missing mnist5k:npz", item
    with pytest.raises(ConfigError, match="is not 'benchmark:source"):
        c.data.parts = "mnist5k"
        prepare._data_item("data", c.data, fetch=False)
