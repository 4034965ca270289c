"""Class heads: one row per class over backbone features (the O(#classes) allowance).

- ``prototype_rows``: frozen rows = L2-normalised class means of the features of θ0.
- ``zeroshot_rows``: frozen rows = CLIP text embeddings of prompt templates filled with
  each class name, averaged over templates (OpenAI's zero-shot recipe).
- ``linear_init`` / ``linear_logits``: trainable ``[C, D]`` weights plus a bias.

``cosine_logits(features, rows, scale) = scale * <f/|f|, r/|r|>`` turns frozen rows into
logits; ``scale`` plays CLIP's learned logit multiplier (100 for OpenAI CLIP).
Rows are float32 ``[C, D]``, row ``i`` for class id ``i`` of whatever ``classes`` lists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.errors import CheckpointError, ConfigError, DataError
from trm_jax.models.common import Backbone, PyTree
from trm_jax.tree_util import batched_apply

HEADS = ("prototype", "zeroshot", "linear")


def l2_normalize(x: jax.typing.ArrayLike, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(|x|, eps)`` along ``axis``."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def prototype_rows(
    features: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    classes: Sequence[int] | jax.typing.ArrayLike,
) -> jax.Array:
    """Rows ``[len(classes), D]``: per class, the mean of the L2-normalised features of its
    examples, normalised again (so each row is a unit-length class direction).

    Normalising before averaging keeps one high-norm example from dominating a row.
    Host-side (concrete arrays, outside jit); raises ``DataError`` when a listed class
    has no example in ``labels``.
    """
    classes = np.asarray(classes)
    onehot = jnp.asarray(np.asarray(labels)[:, None] == classes[None, :], jnp.float32)
    counts = np.asarray(onehot.sum(0))
    if np.any(counts == 0):
        raise DataError(
            f"prototype head: classes {classes[counts == 0].tolist()[:10]} have no "
            "examples in the data given"
        )
    sums = onehot.T @ l2_normalize(features)
    return l2_normalize(sums / counts[:, None])


def cosine_logits(features: jax.Array, rows: jax.Array, scale: float) -> jax.Array:
    """``scale * cos(features, rows)``: ``[B, D] x [C, D] -> [B, C]``."""
    return scale * l2_normalize(features) @ l2_normalize(rows).T


def linear_init(num_classes: int, feature_dim: int) -> dict[str, jax.Array]:
    """A zero-initialised linear head ``{'w': [C, D], 'b': [C]}`` (big_vision's head init:
    fine-tuning starts from uniform predictions)."""
    return {
        "w": jnp.zeros((num_classes, feature_dim), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }


def linear_logits(features: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``features @ w.T + b`` with one row of ``w`` ``[C, D]`` per class."""
    return features @ w.T + b


def make_logits_fn(
    features_fn: Callable[[PyTree, jax.Array], jax.Array], head: str, scale: float
) -> Callable[[PyTree, jax.Array, PyTree], jax.Array]:
    """``logits_fn(params, images, ctx) -> [B, C]`` over every class of the stream.

    ``params = {'backbone': ..., 'head': ...}``. Frozen heads (``prototype``,
    ``zeroshot``) read their rows from ``ctx['rows']`` and give ``cosine_logits`` times
    ``scale``; ``linear`` reads ``params['head'] = {'w': [C, D], 'b': [C]}``. The rows
    travel in ``ctx`` (not a closure) so one compiled step serves every task.
    """
    if head not in HEADS:
        raise ConfigError(f"unknown model.head '{head}'; choices: {', '.join(HEADS)}")

    def logits_fn(params, images, ctx):
        feats = features_fn(params["backbone"], images).astype(jnp.float32)
        if head == "linear":
            return linear_logits(feats, params["head"]["w"], params["head"]["b"])
        return cosine_logits(feats, ctx["rows"], scale)

    return logits_fn


def cosine_apply_fn(features_fn: Callable, rows: jax.Array, scale: float) -> Callable:
    """``apply_fn(params, images) -> scale * cos(features, rows)`` closing over frozen rows."""

    def apply_fn(params: PyTree, images: jax.Array) -> jax.Array:
        return cosine_logits(features_fn(params, images), rows, scale)

    return apply_fn


def zeroshot_rows(
    backbone: Backbone,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenizer,
    *,
    batch_size: int = 256,
) -> jax.Array:
    """Zero-shot rows ``[C, D]`` from the CLIP text tower.

    For each class: fill every template (``'a photo of a {}.'``) with the class name
    (underscores read as spaces), embed with ``backbone.encode_text_fn``, L2-normalise,
    average over templates, L2-normalise again.
    """
    if backbone.encode_text_fn is None:
        raise CheckpointError(
            f"backbone {backbone.name!r} has no text tower: a zero-shot head "
            "needs a CLIP model (or a precomputed rows .npy)"
        )
    if not templates or not all("{}" in t for t in templates):
        raise ConfigError(
            f"every zero-shot template needs a '{{}}' for the class name: {templates}"
        )
    variant = backbone.variant
    if (tokenizer.vocab_size, tokenizer.eot_token_id) != (variant.vocab_size, variant.eot_id):
        raise CheckpointError(
            f"tokenizer vocab ({tokenizer.vocab_size} ids, end-of-text {tokenizer.eot_token_id}) "
            f"does not fit {variant.name!r} ({variant.vocab_size} ids, end-of-text "
            f"{variant.eot_id})"
        )
    texts = [t.format(name.replace("_", " ")) for name in class_names for t in templates]
    tokens = tokenizer(texts, context_length=variant.context_length)
    encode = jax.jit(backbone.encode_text_fn)
    embeds = l2_normalize(  # equal batches: one compilation
        batched_apply(
            lambda x: encode(backbone.text_params, x), tokens, min(batch_size, len(tokens))
        )
    )
    rows = embeds.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return l2_normalize(rows)


def load_rows(
    npy_path: str, *, num_classes: int | None = None, feature_dim: int | None = None
) -> jax.Array:
    """Precomputed head rows ``[C, D]`` from a ``.npy`` file, checked against the expected
    class count and feature width when given (``CheckpointError`` otherwise)."""
    if not os.path.isfile(npy_path):
        raise CheckpointError(f"head rows file not found: {npy_path}")
    try:
        rows = np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read head rows {npy_path}: {err}") from None
    ok = (
        rows.ndim == 2
        and np.issubdtype(rows.dtype, np.floating)
        and num_classes in (None, rows.shape[0])
        and feature_dim in (None, rows.shape[1])
    )
    if not ok:
        raise CheckpointError(
            f"head rows {npy_path} have shape {rows.shape} dtype {rows.dtype}; expected float "
            f"[{num_classes or 'C'}, {feature_dim or 'D'}]"
        )
    return jnp.asarray(rows, jnp.float32)


def save_rows(npy_path: str, rows: jax.typing.ArrayLike) -> None:
    """Write head rows as float32 ``.npy`` (readable by ``load_rows``)."""
    np.save(npy_path, np.asarray(rows, np.float32), allow_pickle=False)
