"""Model merging: task-vector arithmetic, the rule-based merges, their running forms, TRM.

Every rule in ``MERGERS`` is ``fn(base, task_vectors, **hparams) -> params`` with
``task_vectors`` a list of pytrees shaped like ``base`` and each rule taking exactly its
own keyword hparams (``lam``, ``k``, ``p``, ``key``)::

    from trm_jax import merging
    taus = [merging.task_vector(ft, base) for ft in finetuned_models]
    merged = merging.magmax(base, taus, lam=0.5)
    merged = merging.get(config.merge.method)(base, taus,
                                              **merging.hparams_for(config.merge.method,
                                                                    config.merge))

``merging.running`` holds the O(1)-state forms of average, task_arithmetic and magmax;
``merging.trm`` is Trajectory Regularized Merging.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from trm_jax.errors import ConfigError, UnknownNameError
from trm_jax.merging import running, trm
from trm_jax.merging.rules import average, dare, magmax, randmix, task_arithmetic, ties
from trm_jax.merging.task_vectors import (
    NonFiniteError,
    TreeMismatchError,
    apply,
    check_finite,
    check_like,
    leaf_names,
    masked,
    maxmag,
    name_mask,
    task_vector,
)

Merger = Callable[..., Any]

MERGERS: dict[str, Merger] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "magmax": magmax,
    "randmix": randmix,
}


def get(name: str) -> Merger:
    """The merge function registered under ``name``; ``UnknownNameError`` (a ``KeyError``)
    lists the valid names."""
    try:
        return MERGERS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown merge method {name!r}; choose one of: {', '.join(sorted(MERGERS))}"
        ) from None


def hparam_names(name: str) -> tuple[str, ...]:
    """The keyword hparams the rule ``name`` takes, read from its signature."""
    params = inspect.signature(get(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def hparams_for(
    name: str, merge_config: ml_collections.ConfigDict, *, key: jax.Array | None = None
) -> dict[str, Any]:
    """Keyword hparams for rule ``name`` picked from ``merge_config`` (fields ``lam``,
    ``k``, ``p``, ``seed``; see ``default_config``). Rules that take a ``key`` get the
    given one, else ``jax.random.key(merge_config.seed)``; pass
    ``key=jax.random.fold_in(key, task)`` to draw fresh randomness for every merge."""
    out: dict[str, Any] = {}
    for field in hparam_names(name):
        if field == "key":
            out["key"] = (
                key if key is not None else jax.random.key(_field(merge_config, "seed", name))
            )
        else:
            out[field] = _field(merge_config, field, name)
    return out


def _field(config: ml_collections.ConfigDict, field: str, name: str) -> Any:
    try:
        return getattr(config, field)
    except AttributeError:
        raise ConfigError(
            f"merge config has no field '{field}', needed by method '{name}'"
        ) from None


def default_config() -> ml_collections.ConfigDict:
    """Every field ``hparams_for`` reads, with the defaults of docs/methods.md."""
    config = ml_collections.ConfigDict()
    config.method = "magmax"  # a MERGERS name (the runner adds 'trm' and 'none')
    config.lam = 0.5  # scale of the merged task vector (MagMax 0.5, TIES 0.55)
    config.k = 0.2  # TIES: fraction of each task vector's entries kept
    config.p = 0.9  # DARE: drop probability
    config.seed = 0  # DARE / RandMix randomness
    return config


__all__ = [
    "MERGERS",
    "NonFiniteError",
    "TreeMismatchError",
    "apply",
    "average",
    "check_finite",
    "check_like",
    "dare",
    "default_config",
    "get",
    "hparam_names",
    "hparams_for",
    "leaf_names",
    "magmax",
    "masked",
    "maxmag",
    "name_mask",
    "randmix",
    "running",
    "task_arithmetic",
    "task_vector",
    "ties",
    "trm",
]
