"""Pre-training of theta_0 on an offline dataset disjoint from the stream (cached).

The embedded benchmarks need a backbone that has seen related data but is not
specialised to the stream, as CLIP is for CIFAR-100. ``pretrain`` trains the backbone
with a linear head on ``config.pretrain.data`` once, and caches the backbone under a
path keyed by the pre-training and backbone config; later runs load the cache.
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


def pretrain(config: ml_collections.ConfigDict, model: Model) -> PyTree:
    """theta_0: the backbone pre-trained with a linear head on ``config.pretrain.data``
    (cached; a second call with the same config loads the cache)."""
    path = cache_path(config)
    init = models.build(config.model, key=key_of(config.pretrain.seed, 7)).params
    if os.path.isdir(path):
        _log(f"pre-train: reusing cached theta_0 {path}")
        return checkpointing.load_params(path, like=init)
    pcfg = config.pretrain
    stream = data.load_stream(pcfg.data)
    tasks = list(range(stream.num_tasks))
    images, labels = stream.split("train", tasks)
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
        images, labels, pcfg.train.batch_size, seed_of(pcfg.seed, 99), what="pre-training"
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
    checkpointing.save_params(path, theta0)
    return theta0
