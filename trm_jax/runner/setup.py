"""What a run builds once: the model and its jitted functions, the train step, the heads,
the class sets of a task, and the run's seeds and keys.

Jitted functions are cached per process, keyed by the config sections they depend on, so
several runs in one process (``experiments/compare_methods.py``, the tests) compile them
once. The cache is an explicit module-level dict (``_CACHE``); ``clear_cache()`` empties it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trm_jax import data, models
from trm_jax.data import pipeline
from trm_jax.errors import ConfigError
from trm_jax.models import heads
from trm_jax.runner import train
from trm_jax.tree_util import PyTree, batched_apply

_CACHE: dict[str, Any] = {}  # jitted functions reused across runs of one process


def clear_cache() -> None:
    """Forget every cached jitted function (they are rebuilt on next use)."""
    _CACHE.clear()


def cache_key(*parts) -> str:
    """A stable string key from config sections and plain values."""
    return json.dumps(
        [p.to_dict() if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str
    )


def cached(key: str, build):
    """``_CACHE[key]``, built by ``build()`` on first use."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def seed_of(*parts: int) -> int:
    """A 31-bit integer seed from (seed, task, ...), stable across runs."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def key_of(seed: int, *parts: int) -> jax.Array:
    """``jax.random.key(seed)`` folded with each of ``parts`` in turn."""
    k = jax.random.key(seed)
    for p in parts:
        k = jax.random.fold_in(k, p)
    return k


@dataclasses.dataclass
class Model:
    """The backbone plus the jitted functions built once per run."""

    backbone: Any
    preprocess: Any
    logits_fn: Any
    predict: Any
    features: Any  # jitted (backbone_params, uint8 images) -> features


def build_model(config: ml_collections.ConfigDict) -> Model:
    """The backbone (random init or checkpoint) and its jitted functions (cached per
    process and model config)."""
    backbone = models.build(config.model, key=key_of(config.seed, 7))

    def build():
        preprocess = pipeline.make_preprocess(
            backbone.image_size, backbone.channels, backbone.normalization
        )
        logits_fn = heads.make_logits_fn(
            backbone.features_fn, config.model.head, config.model.head_scale
        )
        feats = jax.jit(lambda p, x: backbone.features_fn(p, preprocess(x, None, train=False)))
        return preprocess, logits_fn, train.make_predict_fn(logits_fn, preprocess), feats

    preprocess, logits_fn, predict, feats = cached(cache_key("model", config.model), build)
    return Model(backbone, preprocess, logits_fn, predict, feats)


def loss_fn_for(tcfg, logits_fn, loss_kwargs: dict):
    """The loss of ``train.make_loss_fn`` around ``logits_fn`` with ``tcfg``'s settings."""
    return train.make_loss_fn(
        logits_fn, label_smoothing=tcfg.label_smoothing, dtype=tcfg.dtype, **loss_kwargs
    )


def train_step_for(tcfg, model: Model, loss_fn, opt):
    """The jitted train step of ``tcfg`` (rate, warm-up, augmentation, accumulation)."""
    return train.make_train_step(
        loss_fn,
        opt,
        model.preprocess,
        lr=tcfg.lr,
        warmup_steps=tcfg.warmup_steps,
        augment=tcfg.augment,
        grad_accum=tcfg.grad_accum,
    )


def make_step(config, model: Model, tcfg, loss_kwargs: dict, head: str | None = None):
    """(optimizer, loss_fn, jitted step, logits_fn) for ``tcfg`` and the loss terms, cached.
    ``head`` overrides the model's head kind (pre-training uses a linear head)."""

    def build():
        logits_fn = model.logits_fn
        if head is not None:
            logits_fn = heads.make_logits_fn(model.backbone.features_fn, head, 1.0)
        loss_fn = loss_fn_for(tcfg, logits_fn, loss_kwargs)
        opt = train.make_optimizer(tcfg)
        return opt, loss_fn, train_step_for(tcfg, model, loss_fn, opt), logits_fn

    return cached(cache_key("step", config.model, tcfg, loss_kwargs, head), build)


def preprocess_fn(model: Model):
    """Jitted evaluation-mode preprocessing (uint8 -> model input), cached."""
    bb = model.backbone
    return cached(
        cache_key("prep", bb.image_size, bb.channels, bb.normalization),
        lambda: jax.jit(lambda x: model.preprocess(x, None, train=False)),
    )


def features_all(model: Model, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Backbone features of every image (``tree_util.batched_apply``)."""
    return batched_apply(lambda x: model.features(params, x), images, batch_size)


class ClassSets(NamedTuple):
    """The class ids and ``[C]`` boolean masks of task ``t``: its own classes, the earlier
    tasks' (``old``) and both (``seen``). Built once per task, read by every step."""

    task: np.ndarray
    old: np.ndarray
    seen: np.ndarray
    task_mask: np.ndarray
    old_mask: np.ndarray
    seen_mask: np.ndarray

    @classmethod
    def at(cls, task_classes: list[np.ndarray], t: int, num_classes: int) -> ClassSets:
        def mask(ids):
            m = np.zeros(num_classes, bool)
            m[ids] = True
            return m

        old = np.concatenate(task_classes[:t]) if t else np.zeros((0,), np.int32)
        seen = np.concatenate(task_classes[: t + 1])
        return cls(task_classes[t], old, seen, mask(task_classes[t]), mask(old), mask(seen))


# ----------------------------------------------------------------------------- heads


# ``model.zeroshot_head`` values that take the frozen rows from theta_0's pre-training data
# instead of a file or a text tower (``pretrained_rows``): the CLIP analog for backbones
# pre-trained with a classifier on data disjoint from the stream, in its label space.
PRETRAINED_ROWS = ("pretrain_probe", "pretrain_prototype")
PROBE_STEPS, PROBE_LR = 500, 0.05  # the cosine probe's full-batch Adam (fixed, not tuned)


@jax.jit
def _probe_fit(feats, onehot, rows0, scale):
    """Cosine-classifier rows minimising the mean cross-entropy of
    ``scale * cos(feats, rows)`` (full batch, Adam from ``rows0``)."""
    opt = optax.adam(PROBE_LR)

    def loss(rows):
        logits = heads.cosine_logits(feats, rows, scale)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))

    def body(_, carry):
        rows, state = carry
        updates, state = opt.update(jax.grad(loss)(rows), state)
        return rows + updates, state

    rows, _ = jax.lax.fori_loop(0, PROBE_STEPS, body, (rows0, opt.init(rows0)))
    return heads.l2_normalize(rows)


def pretrained_rows(config, model: Model, stream, theta0) -> jax.Array:
    """Frozen rows ``[C, D]`` read off theta_0's pre-training data (``config.pretrain.data``,
    train split), matched to the stream's classes by name.

    ``model.zeroshot_head = 'pretrain_prototype'``: per class, the normalised mean theta_0
    feature of the pre-training images. ``'pretrain_probe'``: a cosine classifier on frozen
    theta_0 features of those images (``model.head_scale``, ``PROBE_STEPS`` full-batch Adam
    steps from the prototypes): the pre-trained classifier's rows in the logit form the stream
    uses. Either way no stream image is read: the stream's zero-shot accuracy is then the
    pre-trained model's, as with CLIP's text head.
    """
    pre = data.load_stream(config.pretrain.data)
    images, labels = pre.split("train", list(range(pre.num_tasks)))
    feats = features_all(model, theta0, images, config.eval.batch_size)
    ids = np.arange(pre.num_classes)
    rows = heads.prototype_rows(feats, labels, ids)
    if config.model.zeroshot_head == "pretrain_probe":
        onehot = jnp.asarray(labels[:, None] == ids[None, :], jnp.float32)
        rows = _probe_fit(jnp.asarray(feats, jnp.float32), onehot, rows, config.model.head_scale)
    index = {name: i for i, name in enumerate(pre.class_names)}
    missing = [n for n in stream.class_names if n not in index]
    if missing:
        raise ConfigError(
            f"model.zeroshot_head={config.model.zeroshot_head!r}: the pre-training data "
            f"({config.pretrain.data.name}) lacks the stream's classes {missing[:5]}"
        )
    return jnp.asarray(rows)[np.asarray([index[n] for n in stream.class_names])]


def initial_head(config, model: Model, stream, theta0) -> tuple[PyTree, PyTree]:
    """(frozen rows [C, D], trainable head params) at the start of the stream."""
    c, d = stream.num_classes, model.backbone.feature_dim
    kind = config.model.head
    if kind == "zeroshot" and config.model.zeroshot_head in PRETRAINED_ROWS:
        return pretrained_rows(config, model, stream, theta0), {}
    if kind == "zeroshot":
        rows = models.zeroshot_head(model.backbone, list(stream.class_names), config.model)
        rows = jnp.asarray(rows, jnp.float32)
        if rows.shape != (c, d):
            raise ConfigError(
                f"zero-shot head has shape {tuple(rows.shape)}, expected ({c}, {d}) for {c} classes"
            )
        return rows, {}
    if kind == "prototype":
        return jnp.zeros((c, d), jnp.float32), {}
    return jnp.zeros((c, d), jnp.float32), heads.linear_init(c, d)


def add_task_rows(config, model: Model, theta0, rows, head, images, labels, classes):
    """Prototype rows (mean theta_0 feature of each new class) for ``classes``; for the
    linear head they also initialise the trainable rows (scaled like the cosine head)."""
    if config.model.head == "zeroshot":
        return rows, head
    feats = features_all(model, theta0, images, config.eval.batch_size)
    proto = np.asarray(heads.prototype_rows(feats, labels, np.asarray(classes)), np.float32)
    rows = rows.at[np.asarray(classes)].set(proto)
    if config.model.head == "linear":
        head = {
            "w": head["w"].at[np.asarray(classes)].set(proto * config.model.head_scale),
            "b": head["b"],
        }
    return rows, head
