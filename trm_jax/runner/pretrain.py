"""Pre-training of theta_0 on an offline dataset disjoint from the stream (cached).

The embedded benchmarks need a backbone that has seen related data but is not
specialised to the stream, as CLIP is for CIFAR-100. ``pretrain`` trains the backbone
with a linear head on ``config.pretrain.data`` once, and caches the backbone under a
path keyed by the pre-training and backbone config; later runs load the cache.

Concurrent runs with the same key pre-train once: the first takes the cache's lock
(``<path>.lock``) and pre-trains, the others wait for it and then load its result. The
cache is written atomically (``checkpointing.save_params``: a temporary directory renamed
into place) with per-array checksums, so a reader sees a whole tree or none, and a cache
corrupted on disk fails in one line that says to delete it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

from trm_jax import checkpointing, data, models
from trm_jax.data import pipeline
from trm_jax.errors import CheckpointError, ConfigError
from trm_jax.runner import train
from trm_jax.runner.setup import Model, key_of, make_step, seed_of
from trm_jax.tree_util import PyTree


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_path(config: ml_collections.ConfigDict) -> str:
    """Cache directory of theta_0, keyed by the pre-training and backbone config."""
    model = config.model.to_dict()
    for k in ("head", "head_scale", "zeroshot_head", "templates"):
        model.pop(k, None)
    blob = json.dumps(
        {
            "pretrain": {k: v for k, v in config.pretrain.to_dict().items() if k != "cache_dir"},
            "model": model,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(config.pretrain.cache_dir), f"theta0_{digest}")


def _load_cache(path: str, like: PyTree) -> PyTree:
    """The cached theta_0; a corrupt cache is a ``CheckpointError`` saying to rebuild it."""
    try:
        theta0 = checkpointing.load_params(path, like=like)
    except CheckpointError as e:
        raise CheckpointError(
            f"the pre-training cache is unusable: {e}; delete {path} to rebuild it"
        ) from e
    _log(f"pre-train: reusing cached theta_0 {path}")
    return theta0


def pretrain(config: ml_collections.ConfigDict, model: Model) -> PyTree:
    """theta_0: the backbone pre-trained with a linear head on ``config.pretrain.data``
    (cached; a second call with the same config loads the cache, a concurrent one waits
    for the first to write it)."""
    path = cache_path(config)
    init = models.build(config.model, key=key_of(config.pretrain.seed, 7)).params
    if os.path.isdir(path):  # complete: the cache is renamed into place whole
        return _load_cache(path, init)
    checkpointing.check_writable(os.path.dirname(path), "pretrain.cache_dir")
    lock = checkpointing.DirLock(
        f"{path}.lock",
        what=f"the pre-training cache {path}",
        wait=True,
        enabled=jax.process_count() == 1,
    )
    with lock:
        if os.path.isdir(path):  # written while this process waited
            lock.remove_files()  # a lock file the wait re-created after the writer's removal
            return _load_cache(path, init)
        theta0 = _pretrain(config, model, init)
        checkpointing.save_params(path, theta0)
        lock.remove_files()  # the cache exists: later runs never take the lock again
    return theta0


def _pretrain(config: ml_collections.ConfigDict, model: Model, init: PyTree) -> PyTree:
    """Train ``init`` with a linear head on ``config.pretrain.data``; the backbone."""
    pcfg = config.pretrain
    stream = data.load_stream(pcfg.data)
    tasks = list(range(stream.num_tasks))
    images, labels = stream.split("train", tasks)
    if pcfg.train.batch_size > len(labels):
        raise ConfigError(
            f"pretrain.train.batch_size={pcfg.train.batch_size} exceeds the {len(labels)} "
            f"pre-training examples ({pcfg.data.name}); lower it to at most {len(labels)}"
        )
    c = stream.num_classes
    d = model.backbone.feature_dim
    k = key_of(pcfg.seed, 11)
    params = {
        "backbone": init,
        "head": {
            "w": 0.01 * jax.random.normal(k, (c, d), jnp.float32),
            "b": jnp.zeros((c,), jnp.float32),
        },
    }
    opt, _, step, logits_fn = make_step(config, model, pcfg.train, {}, head="linear")
    num_steps = train.steps_per_task(len(labels), pcfg.train)
    ctx = {"train_mask": jnp.ones((c,), bool)}
    batches = pipeline.endless_batches(
        images,
        labels,
        pcfg.train.batch_size,
        seed_of(pcfg.seed, 99),
        what="pre-training (pretrain.train.batch_size)",
    )
    res = train.finetune(
        step,
        train.init_state(params, opt, num_steps),
        batches,
        num_steps,
        key=key_of(pcfg.seed, 12),
        ctx=ctx,
        task="pretrain",
        desc="pre-train",
        progress=config.debug.progress,
    )
    theta0 = res.state.params["backbone"]
    msg = (
        f"pre-train: {num_steps} steps in {res.seconds:.1f}s, "
        f"final loss {res.losses[-5:].mean():.4f}"
    )
    val_images, val_labels = stream.split("val", tasks)  # empty when val_fraction is 0
    if len(val_labels):
        predict = train.make_predict_fn(logits_fn, model.preprocess)
        logits = train.predict_all(
            predict, res.state.params, ctx, val_images, config.eval.batch_size
        )
        msg += f", val accuracy {(logits.argmax(-1) == val_labels).mean():.4f}"
    _log(msg)
    return theta0
