"""Pieces every backbone shares: the ``Backbone`` record, name flattening, key checks.

Parameters cross the package boundary as plain pytrees: nested ``dict``s with ``str``
keys and ``jax.Array`` leaves, named after the published checkpoints. Flax NNX numbers
the entries of an ``nnx.List`` with ``int`` keys; ``to_param_keys`` / ``to_state_keys``
convert between the two spellings so that callers only ever see strings
(``'layers/0/mlp/fc1/kernel'``), which every serialiser (npz, safetensors, orbax)
round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trm_jax.errors import CheckpointError

PyTree = Any

# How many names a key-diff error lists per category before it says "... and N more".
_MAX_LISTED = 12


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A feature extractor behind a pure functional boundary.

    Attributes:
      name: registry key of the variant (``'vit_b16'``, ``'clip_vit_b16'``, ...).
      variant: the frozen variant config (``ViTConfig`` or ``CLIPConfig``) it was built from.
      params: plain pytree of the image tower (what fine-tuning and merging touch).
      features_fn: pure ``(params, images) -> [B, feature_dim] float32``; ``images`` are
        float32 ``[B, image_size, image_size, channels]``, already normalised. Jit-able and
        differentiable to any order w.r.t. ``params``.
      image_size: input side length in pixels.
      channels: input channels (3, or 1 for grayscale ViTs).
      feature_dim: width of the feature vector.
      normalization: pixel normalisation the weights expect: ``'clip'`` (OpenAI CLIP
        mean/std) or ``'inception'`` (``[-1, 1]``, big_vision / vision_transformer).
      text_params: CLIP only: plain pytree of the text tower, projection and logit scale.
      encode_text_fn: CLIP only: pure ``(text_params, tokens int32 [N, L]) -> [N, D]``.
    """

    name: str
    variant: Any
    params: PyTree
    features_fn: Callable[[PyTree, jax.Array], jax.Array]
    image_size: int
    channels: int
    feature_dim: int
    normalization: str
    text_params: PyTree | None = None
    encode_text_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None


def to_param_keys(tree: PyTree) -> PyTree:
    """Nested mapping with any ``int`` keys (``nnx.List`` indices) turned into ``str``."""
    if isinstance(tree, Mapping):
        return {str(k): to_param_keys(v) for k, v in tree.items()}
    return tree


def to_state_keys(tree: PyTree) -> PyTree:
    """Inverse of ``to_param_keys``: all-digit ``str`` keys back to ``int`` for ``nnx.merge``."""
    if isinstance(tree, Mapping):
        return {
            (int(k) if isinstance(k, str) and k.isdigit() else k): to_state_keys(v)
            for k, v in tree.items()
        }
    return tree


def module_params(module: nnx.Module) -> tuple[nnx.GraphDef, PyTree]:
    """``nnx.split(module, nnx.Param)`` as ``(graphdef, plain params with str keys)``."""
    graphdef, state = nnx.split(module, nnx.Param)
    return graphdef, to_param_keys(nnx.to_pure_dict(state))


def bind(graphdef: nnx.GraphDef, params: PyTree) -> nnx.Module:
    """Rebuild the NNX module from a plain param pytree (traceable: use inside jit/grad)."""
    return nnx.merge(graphdef, to_state_keys(params))


def flatten(tree: PyTree, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{'a/b/c': leaf}`` (insertion order preserved)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` -> nested dict (inverse of ``flatten``)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def count_params(tree: PyTree) -> int:
    """Total number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct``s."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    target: str,
    hint: str = "",
) -> None:
    """Raise ``CheckpointError`` unless ``found`` has exactly the names and shapes expected.

    Both arguments map flat names to shapes. The one-line message lists every missing,
    extra and mis-shaped name (the first dozen of each, then a count), so a wrong
    variant or a renamed layer is obvious at a glance.
    """
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    misshaped = [
        f"{k} file {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or extra or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} {_listing(missing)}")
    if extra:
        parts.append(f"extra {len(extra)} {_listing(extra)}")
    if misshaped:
        parts.append(f"mis-shaped {len(misshaped)} {_listing(misshaped)}")
    message = f"checkpoint {source} does not match {target}: " + "; ".join(parts)
    raise CheckpointError(message + (f" ({hint})" if hint else ""))


def resample_posemb(posemb: jax.typing.ArrayLike, new_grid: int, num_prefix: int = 1) -> jax.Array:
    """Resize a ``[..., num_prefix + g*g, D]`` position embedding to ``new_grid`` per side.

    The ``num_prefix`` leading rows (the class token's) are kept; the ``g x g`` patch grid
    is resized with ``jax.image.resize(method='bilinear')``, which antialiases when
    shrinking (a 14x14 grid resampled to 2x2 for 32 px inputs averages, not aliases).
    Leading batch dimensions (the ``[1, N, D]`` npz layout) are preserved.
    """
    posemb = jnp.asarray(posemb)
    lead = posemb.shape[:-2]
    tokens, dim = posemb.shape[-2:]
    grid = round((tokens - num_prefix) ** 0.5)
    if grid * grid + num_prefix != tokens:
        raise CheckpointError(
            f"position embedding with {tokens} rows is not {num_prefix} prefix row(s) plus a "
            "square grid; cannot resample it"
        )
    if grid == new_grid:
        return posemb
    flat = posemb.reshape(-1, tokens, dim)
    prefix, patches = flat[:, :num_prefix], flat[:, num_prefix:]
    patches = patches.reshape(-1, grid, grid, dim).astype(jnp.float32)
    patches = jax.image.resize(
        patches, (patches.shape[0], new_grid, new_grid, dim), method="bilinear"
    ).astype(posemb.dtype)
    out = jnp.concatenate([prefix, patches.reshape(-1, new_grid * new_grid, dim)], axis=1)
    return out.reshape(*lead, num_prefix + new_grid * new_grid, dim)
