"""Sharded execution equals single-device execution (8 fake CPU devices, see conftest).

The reference for every check is the same function run on unsharded arrays (device 0).
Tolerances: elementwise programs (merges, replicated-parameter steps) must agree to
float32 rounding of reductions computed in a different order: atol 1e-5 on parameters
after a few AdamW steps, exact equality for merges that only compare and select, and
identical correct-prediction counts for evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import sharding
from trm_jax.errors import ConfigError, DataError
from trm_jax.models import heads
from trm_jax.runner import train

NUM_CLASSES = 6
WIDTH = 16
PATCH = 4
IMAGE = 8


# ----------------------------------------------------------------------------- a tiny ViT


def _init_vit(seed):
    """A one-block, one-head ViT on 8x8x1 images (4 patches of 4x4), width 16.

    Initialised with numpy: eager ``jax.random`` calls would compile once per shape.
    """
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out, bias=True):
        layer = {"kernel": jnp.asarray(rng.normal(0, n_in**-0.5, (n_in, n_out)), jnp.float32)}
        if bias:
            layer["bias"] = jnp.zeros((n_out,), jnp.float32)
        return layer

    return {
        "embed": dense(PATCH * PATCH, WIDTH),
        "pos": jnp.asarray(rng.normal(0, 0.02, (4, WIDTH)), jnp.float32),
        "block": {
            "ln1": {"scale": jnp.ones((WIDTH,))},
            # No qkv bias: the key bias has an exactly-zero gradient (softmax is
            # shift-invariant), and Adam would turn its rounding noise into +-lr steps.
            "qkv": dense(WIDTH, 3 * WIDTH, bias=False),
            "out": dense(WIDTH, WIDTH),
            "ln2": {"scale": jnp.ones((WIDTH,))},
            "mlp1": dense(WIDTH, 2 * WIDTH),
            "mlp2": dense(2 * WIDTH, WIDTH),
        },
    }


def _ln(x, scale):
    x = x - x.mean(-1, keepdims=True)
    return scale * x / jnp.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)


def _features(params, images):
    b = images.shape[0]
    x = images.reshape(b, 2, PATCH, 2, PATCH).transpose(0, 1, 3, 2, 4).reshape(b, 4, -1)
    x = x @ params["embed"]["kernel"] + params["embed"]["bias"] + params["pos"]
    p = params["block"]
    h = _ln(x, p["ln1"]["scale"])
    q, k, v = jnp.split(h @ p["qkv"]["kernel"], 3, axis=-1)
    att = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(WIDTH), axis=-1)
    x = x + (att @ v) @ p["out"]["kernel"] + p["out"]["bias"]
    h = _ln(x, p["ln2"]["scale"])
    h = jax.nn.gelu(h @ p["mlp1"]["kernel"] + p["mlp1"]["bias"])
    x = x + h @ p["mlp2"]["kernel"] + p["mlp2"]["bias"]
    return x.mean(1)


def _preprocess(images, key=None, *, train=False):
    del key, train
    return images.astype(jnp.float32) / 255.0


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    # Class-dependent mean so the tiny model can learn something.
    images = rng.normal(40.0 * labels[:, None, None, None], 30.0, (n, IMAGE, IMAGE, 1))
    return {"image": np.clip(images, 0, 255).astype(np.uint8), "label": labels}


def _cfg(data, fsdp, min_size=64):
    cfg = sharding.default_config()
    cfg.data, cfg.fsdp, cfg.fsdp_min_size = data, fsdp, min_size
    return cfg


def _ctx():
    rows = jnp.asarray(np.random.default_rng(7).normal(size=(NUM_CLASSES, WIDTH)), jnp.float32)
    return {"rows": rows, "train_mask": jnp.ones((NUM_CLASSES,), bool)}


def _is_split(x):
    """True when no device holds the whole array (it really is sharded)."""
    return x.addressable_shards[0].data.shape != x.shape


# ----------------------------------------------------------------------------- mesh, specs


def test_mesh_shape_and_errors():
    assert sharding.mesh_shape(_cfg(-1, 2), 8) == (4, 2)
    assert sharding.mesh_shape(_cfg(2, 4), 8) == (2, 4)
    mesh = sharding.make_mesh(_cfg(-1, 4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ConfigError, match="fsdp=3"):
        sharding.mesh_shape(_cfg(-1, 3), 8)
    with pytest.raises(ConfigError, match="must equal"):
        sharding.mesh_shape(_cfg(3, 2), 8)


def test_fsdp_specs_follow_name_size_and_divisibility():
    mesh = sharding.make_mesh(_cfg(2, 4))
    cfg = _cfg(2, 4, min_size=64)
    cfg.fsdp_regex = r"^block/"
    tree = {
        "block": {
            "a": np.zeros((6, 32)),
            "b": np.zeros((12, 8)),
            "c": np.zeros((6, 10)),
            "s": np.zeros((16,)),
        },
        "embed": np.zeros((32, 32)),
    }
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(tree, mesh, cfg))
    assert specs["block"]["a"] == jax.sharding.PartitionSpec(None, "fsdp")  # largest axis
    assert specs["block"]["b"] == jax.sharding.PartitionSpec("fsdp")  # 12 > 8, both divisible
    assert specs["block"]["c"] == jax.sharding.PartitionSpec()  # nothing divisible by 4
    assert specs["block"]["s"] == jax.sharding.PartitionSpec()  # below fsdp_min_size
    assert specs["embed"] == jax.sharding.PartitionSpec()  # name does not match
    # fsdp = 1: everything replicated whatever the regex says.
    specs1 = sharding.param_shardings(tree, sharding.make_mesh(_cfg(8, 1)), _cfg(8, 1, 1))
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(specs1))


def test_shard_params_keeps_values_and_splits_memory():
    cfg = _cfg(2, 4)
    mesh = sharding.make_mesh(cfg)
    params = _init_vit(0)
    sharded = sharding.shard_params(params, mesh, cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), sharding.fetch(b))
    qkv = sharded["block"]["qkv"]["kernel"]  # [16, 48] -> 48 split 4 ways
    assert qkv.addressable_shards[0].data.shape == (16, 12)
    assert sharded["block"]["ln1"]["scale"].addressable_shards[0].data.shape == (WIDTH,)


# ----------------------------------------------------------------------------- batches


def test_shard_batch_global_array_and_padding():
    mesh = sharding.make_mesh(_cfg(4, 2))
    batch = _data(16)
    g = sharding.shard_batch(batch, mesh)
    np.testing.assert_array_equal(sharding.fetch(g["label"]), batch["label"])
    assert g["image"].addressable_shards[0].data.shape == (2, IMAGE, IMAGE, 1)
    with pytest.raises(DataError, match="multiple of this host's 8 devices"):
        sharding.shard_batch(_data(12), mesh)
    padded = sharding.pad_batch(_data(12), 8)
    assert padded["label"].shape == (16,)
    np.testing.assert_array_equal(padded["mask"], [1] * 12 + [0] * 4)
    np.testing.assert_array_equal(padded["label"][:12], _data(12)["label"])


def test_initialize_refuses_late_memory_settings(monkeypatch):
    cfg = sharding.default_config()
    assert sharding.memory_env(cfg) == {}
    cfg.preallocate, cfg.memory_fraction = False, 0.5
    assert sharding.memory_env(cfg) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
    }
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    jnp.zeros(1).block_until_ready()  # the backend is running now
    with pytest.raises(ConfigError, match="before any JAX computation"):
        sharding.initialize(cfg)
    cfg.memory_fraction = 1.5
    with pytest.raises(ConfigError, match="memory_fraction"):
        sharding.memory_env(cfg)


# ----------------------------------------------------------------------------- train step


def _train(state, batches, step_fn, ctx, mesh=None):
    key = jax.random.key(3)
    for b in batches:
        b = sharding.shard_batch(b, mesh) if mesh is not None else b
        state, metrics = step_fn(state, b, key, ctx)
    return state, metrics


def _train_setup():
    tcfg = train.default_config()
    tcfg.lr, tcfg.warmup_steps, tcfg.weight_decay = 1e-2, 0, 0.1
    optimizer = train.make_optimizer(tcfg)
    loss_fn = train.make_loss_fn(heads.make_logits_fn(_features, "prototype", 10.0))
    params = {"backbone": _init_vit(0), "head": {}}
    state = train.init_state(params, optimizer, 10)
    batches = [_data(32, seed=s) for s in range(3)]
    make_step = lambda accum: train.make_train_step(
        loss_fn, optimizer, _preprocess, lr=tcfg.lr, grad_accum=accum
    )
    return state, batches, make_step


@pytest.fixture(scope="module")
def single_device_run():
    """Three steps of the runner's train step on one device (the reference)."""
    state, batches, make_step = _train_setup()
    return _train(state, batches, make_step(1), _ctx())


# Data parallel with replicated parameters; FSDP with gradient accumulation.
@pytest.mark.parametrize("data,fsdp,accum", [(8, 1, 1), (2, 4, 2)])
def test_sharded_train_step_equals_single_device(single_device_run, data, fsdp, accum):
    ref_state, ref_metrics = single_device_run
    state, batches, make_step = _train_setup()
    cfg = _cfg(data, fsdp)
    mesh = sharding.make_mesh(cfg)
    sharded = sharding.shard_params(state, mesh, cfg)
    out, metrics = _train(
        sharded, batches, make_step(accum), sharding.replicate(_ctx(), mesh), mesh
    )

    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-4
    )
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(sharding.fetch(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    # The steps moved the parameters (agreement is not agreement on the initial point).
    kernel = lambda st: np.asarray(st.params["backbone"]["block"]["qkv"]["kernel"])
    assert np.abs(kernel(ref_state) - kernel(state)).max() > 1e-3
    # The parameters stay split: no device ever holds the whole model.
    assert _is_split(out.params["backbone"]["block"]["qkv"]["kernel"]) == (fsdp > 1)
    moments = [x for x in jax.tree.leaves(out.opt_state) if x.shape == (WIDTH, 3 * WIDTH)]
    assert len(moments) == 2 and all(_is_split(x) == (fsdp > 1) for x in moments)  # Adam mu, nu


# ----------------------------------------------------------------------------- evaluation


def test_sharded_evaluation_accuracy_identical():
    params = {"backbone": _init_vit(1), "head": {}}
    ctx = _ctx()
    logits_fn = heads.make_logits_fn(_features, "prototype", 10.0)
    data = _data(45, seed=9)  # not a multiple of 8: the last batch is padded and masked

    @jax.jit
    def correct(params, batch, ctx):
        logits = logits_fn(params, _preprocess(batch["image"]), ctx)
        hit = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        return (hit * batch["mask"]).sum(), logits

    ref_hits, ref_logits = correct(params, sharding.pad_batch(data, 1), ctx)

    cfg = _cfg(2, 4)
    mesh = sharding.make_mesh(cfg)
    batch = sharding.shard_batch(
        sharding.pad_batch(data, sharding.local_batch_multiple(mesh)), mesh
    )
    hits, logits = correct(
        sharding.shard_params(params, mesh, cfg), batch, sharding.replicate(ctx, mesh)
    )
    assert int(hits) == int(ref_hits)
    np.testing.assert_allclose(sharding.fetch(logits)[:45], np.asarray(ref_logits), atol=1e-5)


# ----------------------------------------------------------------------------- merges


def _noise_like(tree, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), tree)


def _merge_inputs(num_tasks=3):
    base = _init_vit(0)
    return base, [_noise_like(base, 10 + i) for i in range(num_tasks)]


@pytest.mark.parametrize(
    "name,hparams", [("magmax", {"lam": 0.5}), ("ties", {"lam": 0.55, "k": 0.2})]
)
def test_sharded_merge_equals_unsharded(name, hparams):
    from trm_jax import merging

    if not hasattr(merging, "get"):
        pytest.skip("trm_jax.merging.get not available yet")
    fn = merging.get(name)
    base, tvs = _merge_inputs()
    ref = fn(base, tvs, **hparams)

    cfg = _cfg(2, 4)
    mesh = sharding.make_mesh(cfg)
    sbase = sharding.shard_params(base, mesh, cfg)
    stvs = [sharding.shard_params(t, mesh, cfg) for t in tvs]
    out = jax.jit(lambda b, t: fn(b, t, **hparams))(sbase, stvs)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(sharding.fetch(b), np.asarray(a), atol=1e-6, rtol=1e-6)
    assert _is_split(out["block"]["qkv"]["kernel"])


def _mlp_features(params, images):
    x = images.reshape(images.shape[0], -1)
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def test_sharded_trm_merge_equals_unsharded():
    """TRM on FSDP-sharded parameters and a sharded batch equals TRM on one device.

    A two-layer MLP keeps the second-order step cheap to compile (twice: both runs).
    """
    from trm_jax.merging import trm

    rng = np.random.default_rng(0)
    base = {
        "w1": jnp.asarray(rng.normal(0, 0.125, (64, 32)), jnp.float32),
        "b1": jnp.zeros((32,), jnp.float32),
        "w2": jnp.asarray(rng.normal(0, 0.18, (32, WIDTH)), jnp.float32),
    }
    previous = jax.tree.map(jnp.add, base, _noise_like(base, 1, 0.05))
    step = _noise_like(base, 2, 0.05)
    snapshots = [jax.tree.map(lambda p, d, s=s: p + s * d, previous, step) for s in (0.5, 1.0)]
    rows = _ctx()["rows"]

    def apply_fn(params, images):
        return heads.cosine_logits(_mlp_features(params, images), rows, 10.0)

    data = _data(16, seed=3)
    batch = {"image": data["image"].astype(np.float32) / 255.0, "label": data["label"] % 3 + 3}
    config = trm.default_config()
    config.steps, config.eval_batches = 3, 1
    kwargs = dict(task_classes=[3, 4, 5], old_classes=[0, 1, 2], config=config)
    ref, ref_info = trm.merge(apply_fn, base, previous, snapshots, [batch], **kwargs)

    cfg = _cfg(2, 4)
    mesh = sharding.make_mesh(cfg)
    put = lambda tree: sharding.shard_params(tree, mesh, cfg)
    compiled = trm.train_step._cache_size(), trm.evaluate._cache_size()
    out, info = trm.merge(
        apply_fn,
        put(base),
        put(previous),
        [put(s) for s in snapshots],
        [sharding.shard_batch(batch, mesh)],
        **kwargs,
    )
    np.testing.assert_allclose(info["history"]["loss"], ref_info["history"]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(sharding.fetch(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    # The merge moved away from its init point, and the result stays split over devices.
    assert ref_info["history"]["loss"][-1] < ref_info["history"]["loss"][0]
    assert _is_split(out["w1"])
    # The coefficients and Adam state live on the mesh from step 0: the sharded merge
    # compiled its step and its evaluation once each (not again after step 1).
    assert trm.train_step._cache_size() - compiled[0] == 1
    assert trm.evaluate._cache_size() - compiled[1] == 1
