"""BECAME (Li et al. 2025) in the runner: the closed-form, Fisher-weighted merging
coefficient between the previous merged model and the newly fine-tuned one.

Task t is fine-tuned from theta_bar_{t-1} (the runner's chain; BECAME's gradient-projection
first stage is left out, so theta_old = theta_bar_{t-1} and theta_new = theta_t). After it,
``merging.became`` takes the diagonal Fisher at theta_t on task t's training data, merges
``theta_bar_t = (1 - c*) theta_bar_{t-1} + c* theta_t`` and adds the Fisher at theta_bar_t
to the accumulated one. Both Fisher passes read the same in-order pass over task t's
training data (``train.batch_size``, evaluation preprocessing, the last partial batch
dropped), with the run's head (frozen rows or the trained linear head, behind a
``stop_gradient``) and the cross-entropy over task t's classes.

Persisted state: ``merging.became.BecameState``, one float32 backbone-sized Fisher and a
task counter. theta_0 is not used (``needs_theta0`` is False; a prototype head still
stores it, for its rows).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from trm_jax.data import pipeline
from trm_jax.merging import became
from trm_jax.runner import setup
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task
from trm_jax.runner.methods.trm import apply_fn
from trm_jax.tree_util import leaf_names


def fisher_batches(task: Task):
    """One in-order pass over task t's training data, preprocessed and placed (full batches
    of ``train.batch_size``, or the whole task when smaller)."""
    prep = setup.preprocess_fn(task.model)
    size = min(task.config.train.batch_size, len(task.labels))
    for b in pipeline.batches(task.images, task.labels, size, shuffle=False, drop_remainder=True):
        yield task.place.batch({"image": prep(b["image"]), "label": jnp.asarray(b["label"])})


class Became(Method):
    name = "became"
    description = "BECAME: closed-form Fisher-weighted merge of theta_bar_{t-1} and theta_t"
    merges = True

    def state_like(self, config, theta0, tasks_done):
        return became.init(theta0)

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        c = task.config.merge.became
        fn = apply_fn(task.config, task.model)
        mask = jnp.asarray(task.classes.task_mask)

        def wrap(backbone):
            return {"backbone": backbone, "rows": task.rows, "head": finetuned.head}

        def fisher(backbone):
            full = became.fisher_diag(
                fn, wrap(backbone), fisher_batches(task), mask, label_mode=c.fisher_labels
            )
            return full["backbone"]

        state = carry.state if carry.state is not None else became.init(task.theta0)
        theta_t = finetuned.theta_t
        if int(state.count) == 0:
            merged, coef = theta_t, jnp.ones((), jnp.float32)
        else:
            include = None
            if c.exclude:
                flags = [not re.search(c.exclude, n) for n in leaf_names(theta_t)]
                include = jax.tree.unflatten(jax.tree.structure(theta_t), flags)
            merged, coef = became.merge(
                state, carry.merged, theta_t, fisher(theta_t), include=include
            )
        state = became.update(state, fisher(merged), gamma=c.fisher_gamma)
        return merged, state, {"coef": coef}
