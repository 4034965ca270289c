"""TRM's config: every field :func:`~trm_jax.merging.trm.merge` reads, and its validation.

Validation runs before any array work, so a bad field fails in one line that names the
field and its valid choices. The objective names are checked against the live registries
of :mod:`.objectives` (the same dict objects), so a function registered under a new name is
accepted here without further changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from trm_jax.errors import ConfigError
from trm_jax.merging.trm.objectives import ALIGN, CONSISTENCY, MEASURES, REG, RESPONSIVENESS
from trm_jax.tree_util import DTYPES

DIRECTIONS = ("trajectory", "history", "consensus")
# Every direction kind ``directions`` accepts; ``DIRECTIONS`` (above) stays the default.
# ``increments`` is the trajectory as its K steps (same span as ``trajectory``; not both).
DIRECTION_KINDS = DIRECTIONS + ("increments",)
INITS = ("magmax", "expert", "previous")
# Storage dtypes of the stacked directions: the shared table, one object.
DIRECTION_DTYPES = DTYPES
G_REFS = ("base", "previous")
TERMS = ("align", "consistency", "responsiveness", "reg")


def default_config() -> ml_collections.ConfigDict:
    """Every field :func:`merge` reads, with the reference formulation's defaults.

    The cost defaults (``steps``, ``learning_rate``, ``batch_size``, ``probe.batch_size``,
    ``responsiveness_every``, ``max_batches``, ``eval_batches``) were measured: 21x cheaper
    than 100 steps at 1e-2 on the caller's batches with L_GR every step, with the same
    validation accuracy on the embedded Fashion-MNIST stream (docs/method.md, "Cost").

    * ``steps`` (30), ``learning_rate`` (5e-2): Adam on the coefficients only.
    * ``temperature`` (2.0): tau of the distillation / consistency KLs (scaled by tau^2).
    * ``weights.{align, consistency, responsiveness, reg}``: term weights; a weight of 0
      removes the term from the jitted step (it is not computed).
    * ``align``: ``'distill'`` (KL to the expert over the task's classes), ``'distill_seen'``
      (the same over every class seen so far), ``'ce'`` (labels over the task's classes),
      ``'ce_seen'`` (labels over every seen class), ``'param'`` (cosine to the expert's
      displacement, per leaf).
    * ``consistency``: ``'kl'`` (KL to the previous merged model over old classes),
      ``'mse'`` (raw old-class logits) or ``'kl_mix'`` (the KL on the batch and on mixups of
      its images, the previous model's logits on those computed in the step).
    * ``responsiveness``: ``'probe'`` (squared gradient norm of a fixed random probe loss),
      ``'fisher'`` (trace of the Fisher, labels sampled from the model) or ``'probe_relative'``
      (the probe's squared gradient norm over its loss: responsiveness per unit of loss).
    * ``reg``: ``'l2'`` (||alpha - alpha_init||^2, the reference formulation) or
      ``'theta'`` (||theta(alpha) - theta_init||^2 / ||theta_t - theta_prev||^2: a leash on
      the parameters' move, relative to the task's own displacement).
    * ``directions``: any non-empty subset of ``('trajectory', 'history', 'consensus')``, or
      ``'increments'`` in place of ``'trajectory'``: the trajectory as its steps
      ``theta_t^(k) - theta_t^(k-1)`` (``theta_t^(0)`` = theta_prev), columns ``i1..iK``. Same
      span, but the cumulative ``d_k`` of a decaying learning-rate schedule are nearly
      collinear (docs/diagnosis.md), the increments much less.
    * ``granularity``: ``'leaf'`` (one coefficient per leaf and direction), ``'global'`` (one
      per direction for the whole model) or name regexes (a string or a tuple of strings):
      leaves whose first matching regex matches the same text share coefficients, so
      ``'block_\\d+'`` gives one group per block; unmatched leaves keep their own.
    * ``init``: ``'magmax'`` (the consensus point, below), ``'expert'`` (theta_t) or
      ``'previous'`` (theta_prev).
    * ``lam`` (1.0): MagMax's lambda in the consensus point
      ``theta0 + lam * maxmag(h / lam, theta_t - theta0)``. 1 is the reference formulation's
      pair merge ``theta0 + maxmag(h, tau_t)``. With ``lam < 1`` and a previous model of the
      form ``theta0 + lam * M`` (a MagMax chain), ``h / lam = M`` and the point is exactly the
      running MagMax merge with that lambda (``theta0 + lam * maxmag(M, tau_t)``), so TRM
      starts from MagMax as the runner configures it instead of from its lambda = 1 form.
    * ``direction_dtype``: storage of the stacked directions, ``'float32'`` or ``'bfloat16'``.
    * ``g_ref``: the model whose responsiveness is the reference, ``'base'`` (theta0, fixed for
      the whole stream) or ``'previous'``.
    * ``probe.seed``, ``probe.num_classes`` (outputs of the random probe head; 0 = use the
      model's own seen-class logits), ``probe.batch_size`` (examples per batch used by the
      responsiveness term, whose memory and time are second order; 0 = the whole batch;
      default 16: ViT-B/16 needs ~0.5 GB per probe example in float32).
    * ``responsiveness_every``: compute the second-order responsiveness term (value and
      coefficient gradient) on every N-th step only and reuse the last computed gradient
      on the steps between ("lazy" regularisation); 1 = every step. Default 4.
    * ``batch_size``: examples per coefficient step; larger incoming batches are split into
      chunks of this size (a ragged rest is skipped), so the merge can use smaller batches
      than the caller's data pipeline; 0 = the batches as given. Default 32: the
      coefficients are few (J x leaves, a few hundred), so small batches suffice.
    * ``max_batches``: distinct (chunked) batches held, with their targets, and cycled over
      when ``steps`` exceeds them; 0 = up to ``steps``. Default 8: each held batch stays in
      memory (at 224 px a chunk of 32 float32 images is 19 MB, a batch of 128 is 77 MB).
    * ``eval_batches``: how many of the held batches the before/after report in ``info``
      (``terms_init``, ``terms_final``, ``g_*``) averages over; 0 = all (costs ~2 steps
      each). Default 1.
    * ``report_g`` (True): measure g at the reference, the init point and the result for
      ``info`` (``g_ref``, ``g_init``, ``g_final``; three second-order passes per report
      batch). With L_GR off (``weights.responsiveness = 0``) g enters no objective, and
      ``False`` skips those passes (the values are NaN); with L_GR on it is always measured.
    * ``seed``: the key for the Fisher variant's sampled labels.
    """
    config = ml_collections.ConfigDict()
    config.steps = 30
    config.learning_rate = 5e-2
    config.temperature = 2.0
    config.weights = ml_collections.ConfigDict(
        {"align": 1.0, "consistency": 1.0, "responsiveness": 0.1, "reg": 0.01}
    )
    config.align = "distill"
    config.consistency = "kl"
    config.responsiveness = "probe"
    config.reg = "l2"
    config.directions = DIRECTIONS
    # A string or a tuple of regexes: declared as an object field so either type is accepted.
    config.granularity = config_dict.FieldReference("leaf", field_type=object)
    config.init = "magmax"
    config.lam = 1.0
    config.direction_dtype = "float32"
    config.g_ref = "base"
    config.probe = ml_collections.ConfigDict({"seed": 0, "num_classes": 10, "batch_size": 16})
    config.responsiveness_every = 4
    config.batch_size = 32
    config.max_batches = 8
    config.eval_batches = 1
    config.report_g = True
    config.seed = 0
    return config


def _choice(value: str, choices: Iterable[str], field: str) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices`` (listed in their order).

    Kept instead of ``errors.check_choice``: that one words the message differently
    (``unknown align 'kd'; choices: ...``, sorted), and callers and tests match this
    module's wording (``trm config 'align' is 'kd'; choose one of ['distill', ...]``).
    """
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"trm config '{field}' is {value!r}; choose one of {choices}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` (one line, naming the field and the valid choices) on a bad field."""
    if int(config.steps) != config.steps or config.steps < 0:
        raise ConfigError(f"trm config 'steps' must be an integer >= 0, got {config.steps!r}")
    if not config.learning_rate > 0:
        raise ConfigError(f"trm config 'learning_rate' must be > 0, got {config.learning_rate}")
    if not (np.isfinite(config.lam) and config.lam > 0):
        raise ConfigError(f"trm config 'lam' must be finite and > 0, got {config.lam}")
    if not config.temperature > 0:
        raise ConfigError(f"trm config 'temperature' must be > 0, got {config.temperature}")
    for term in TERMS:
        weight = config.weights[term]
        if not (np.isfinite(weight) and weight >= 0):
            raise ConfigError(f"trm config 'weights.{term}' must be finite and >= 0, got {weight}")
    _choice(config.align, ALIGN, "align")
    _choice(config.consistency, CONSISTENCY, "consistency")
    _choice(config.responsiveness, RESPONSIVENESS, "responsiveness")
    _choice(config.reg, REG, "reg")
    _choice(config.responsiveness, MEASURES, "responsiveness (its g measure in MEASURES)")
    _choice(config.init, INITS, "init")
    _choice(config.direction_dtype, DIRECTION_DTYPES, "direction_dtype")
    _choice(config.g_ref, G_REFS, "g_ref")
    directions = tuple(config.directions)
    if not directions or len(set(directions)) != len(directions):
        raise ConfigError(
            f"trm config 'directions' must be a non-empty subset of {list(DIRECTION_KINDS)} "
            f"without repeats, got {directions!r}"
        )
    for name in directions:
        _choice(name, DIRECTION_KINDS, "directions")
    if "trajectory" in directions and "increments" in directions:
        raise ConfigError(
            "trm config 'directions': 'trajectory' and 'increments' span the same subspace; "
            "choose one"
        )
    _granularity_patterns(config.granularity)
    counts = {
        "probe.num_classes": config.probe.num_classes,
        "probe.batch_size": config.probe.batch_size,
        "batch_size": config.batch_size,
        "max_batches": config.max_batches,
        "eval_batches": config.eval_batches,
    }
    for field, value in counts.items():
        if int(value) != value or value < 0:
            raise ConfigError(f"trm config '{field}' must be an integer >= 0, got {value!r}")
    every = config.responsiveness_every
    if int(every) != every or every < 1:
        raise ConfigError(
            f"trm config 'responsiveness_every' must be an integer >= 1, got {every!r}"
        )


def _granularity_patterns(granularity: Any) -> tuple[str, ...] | str:
    """``'leaf'`` / ``'global'``, or the regexes as a tuple (each compiled once to check it)."""
    if granularity in ("leaf", "global"):
        return granularity
    patterns = (granularity,) if isinstance(granularity, str) else tuple(granularity)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(
            "trm config 'granularity' must be 'leaf', 'global' or non-empty name regexes, "
            f"got {granularity!r}"
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"trm config 'granularity' regex {pattern!r} is invalid: {err}"
            ) from None
    return patterns
