"""The full config tree, composed from each area's ``default_config()``.

Every experiment config starts from ``common.get_config()`` and overrides fields, so
every field the code reads is declared here (no hidden defaults in the code):

- ``seed``: run seed (fine-tuning order, augmentation, merge randomness).
- ``data``: ``trm_jax.data.default_config()`` (the stream).
- ``model``: ``trm_jax.models.default_config()`` (backbone and head kind).
- ``train``: ``trm_jax.train.default_config()`` (per-task fine-tuning).
- ``merge``: ``method``, ``chain``, ``lam``, ``k``, ``p``, ``seed``, ``include``,
  ``exclude``, ``trm`` (``trm_jax.merging.trm.default_config()``).
- ``pretrain``: pre-training of theta_0 (``enabled``, ``data``, ``train``, ``seed``,
  ``cache_dir``).
- ``cl``: LwF / EWC weights.  ``eval``: split and batch size.
- ``mesh``: ``trm_jax.sharding.default_config()``.  ``debug``: run control.
"""

from __future__ import annotations

import ml_collections

from trm_jax import continual, data, merging, models, sharding, train
from trm_jax.merging import trm


def merge_config() -> ml_collections.ConfigDict:
    """``merging.default_config()`` (method, lam, k, p, seed) plus the runner's fields."""
    c = merging.default_config()
    c.method = "trm"  # any of continual.method_choices()
    c.chain = "merged"  # merged: task t+1 starts from theta_bar_t; finetuned: from theta_t
    c.include = ""  # regex over leaf names: merge only these (others take theta_t)
    c.exclude = ""  # regex over leaf names: never merge these
    c.batch_size = 0  # TRM's minibatches of the current task (0 = train.batch_size)
    c.trm = trm.default_config()
    return c


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data.default_config()
    c.model = models.default_config()
    c.train = train.default_config()
    c.merge = merge_config()
    c.pretrain = continual.pretrain_config()
    c.cl = continual.cl_config()
    c.eval = continual.eval_config()
    c.mesh = sharding.default_config()
    c.debug = continual.debug_config()
    return c
