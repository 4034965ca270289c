"""The runner's complete config tree, composed from each part's ``default_config()``.

Every experiment config starts from ``get_config()`` and overrides fields, so every field
the code reads is declared here (no hidden defaults in the code)::

    from trm_jax.runner import config as base

    def get_config(arg=None):
        c = base.get_config()
        c.merge.method = "magmax"
        return c

- ``seed``: run seed (fine-tuning order, augmentation, merge randomness).
- ``data``: ``trm_jax.data.default_config()`` (the stream).
- ``model``: ``trm_jax.models.default_config()`` (backbone and head kind).
- ``train``: ``trm_jax.runner.train.default_config()`` (per-task fine-tuning).
- ``merge``: ``method`` (a ``runner.methods.METHODS`` name), ``chain``, the rule hparams
  (``lam``, ``k``, ``p``, ``seed``), ``include``, ``exclude``, ``batch_size``, ``trm``
  (``trm_jax.merging.trm.default_config()``) and one section per stateful baseline
  (``cmm``, ``opcm``, ``became``, ``tunable_magmax``, ``pam``: each module's
  ``default_config()`` plus the runner's fields, see ``merge_config``).
- ``pretrain``: pre-training of theta_0 (``enabled``, ``data``, ``train``, ``seed``,
  ``cache_dir``).
- ``cl``: LwF / EWC weights.  ``eval``: split and batch size.
- ``mesh``: ``trm_jax.sharding.default_config()``.  ``debug``: run control.
- ``log``: training curves (``tensorboard``).
"""

from __future__ import annotations

import ml_collections

from trm_jax import data, merging, models, sharding
from trm_jax.merging import aligned, became, cmm, opcm, trm, tunable_magmax
from trm_jax.runner import train

CHAINS = ("finetuned", "merged")
# Config sections that do not change the result (excluded from the workdir check).
VOLATILE_FIELDS = ("debug", "log")


def debug_config() -> ml_collections.ConfigDict:
    """Run-control fields that do not change results (ignored by the workdir check)."""
    c = ml_collections.ConfigDict()
    c.stop_after_task = 0  # > 0: return after checkpointing this many tasks (tests)
    c.progress = True  # tqdm progress bars
    return c


def eval_config() -> ml_collections.ConfigDict:
    """Which split the accuracy matrix is measured on, in batches of ``batch_size``."""
    c = ml_collections.ConfigDict()
    c.split = "test"  # test | val (sweeps tune on val, never test)
    c.batch_size = 256
    return c


def pretrain_config() -> ml_collections.ConfigDict:
    """Pre-training of theta_0 on an offline dataset disjoint from the stream."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.data = data.default_config()
    c.train = train.default_config()
    c.seed = 0
    c.cache_dir = "~/.cache/trm_jax/pretrain"  # keyed by a hash of (pretrain, model) config
    return c


def cl_config() -> ml_collections.ConfigDict:
    """Weights of the regularisation baselines (docs/methods.md)."""
    c = ml_collections.ConfigDict()
    c.lwf_lambda = 0.3
    c.lwf_temperature = 2.0
    c.ewc_lambda = 1e6
    c.ewc_batches = 10  # batches used for the diagonal Fisher
    return c


def log_config() -> ml_collections.ConfigDict:
    """Training curves (they do not change results: ignored by the workdir check)."""
    c = ml_collections.ConfigDict()
    c.tensorboard = False  # per-step loss, lr, grad norm and TRM's terms under workdir/
    return c


def merge_config() -> ml_collections.ConfigDict:
    """``merging.default_config()`` (method, lam, k, p, seed) plus the runner's fields."""
    c = merging.default_config()
    c.method = "trm"  # any of runner.methods.choices()
    c.chain = "merged"  # merged: task t+1 starts from theta_bar_t; finetuned: from theta_t
    c.include = ""  # regex over leaf names: merge only these (others take theta_t)
    c.exclude = ""  # regex over leaf names: never merge these
    c.batch_size = 0  # TRM's minibatches of the current task (0 = train.batch_size)
    c.trm = trm.default_config()
    c.cmm = cmm.default_config()
    # 'auto': the backbone's output projection (CLIP's visual_projection, a ViT's
    # pre_logits), else a ViT's final LayerNorm (methods/cmm.py, trainable_pattern).
    c.cmm.representation_trainable = "auto"
    c.opcm = opcm.default_config()
    c.opcm.from_theta0 = True  # every task fine-tuned from theta_0 (OPCM merges such models)
    c.became = became.default_config()
    c.tunable_magmax = tunable_magmax.default_config()
    c.pam = aligned.default_config()
    return c


def get_config() -> ml_collections.ConfigDict:
    """The whole tree with every part's defaults (the base of every experiment config)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data.default_config()
    c.model = models.default_config()
    c.train = train.default_config()
    c.merge = merge_config()
    c.pretrain = pretrain_config()
    c.cl = cl_config()
    c.eval = eval_config()
    c.mesh = sharding.default_config()
    c.debug = debug_config()
    c.log = log_config()
    return c
