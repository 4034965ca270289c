"""Tunable MagMax (Hiroshima et al. 2026) in the runner: MagMax in which each task supplies
its preference share of every leaf's elements.

Training follows the runner's chain like the rule merges (``merge.chain='finetuned'`` is the
authors' sequential fine-tuning from theta_{t-1}). After task t, every task vector so far
is merged by ``merging.tunable_magmax.merge`` with ``lam`` and a key folded from
``merge.tunable_magmax.seed`` and the task index.

The preference. The authors count, per task, the labels of a small sample of the *target*
(test) environment that fall in that task's classes. A continual learner may not look at
test data at merge time, so here the per-task scores are the counts of each task's
*training* labels (``preference_from_labels`` over the task's own training labels), kept
in the state as one int32 per task; ``num_target_data`` is unused. On class-balanced
streams this is the uniform preference.

Persisted state: ``{'taus': [tau_1..tau_t], 'counts': int32 [t]}``: like batch MagMax it
needs every task vector at each merge, so the state grows by one backbone-sized tree per
task. theta_0 is needed at every merge (``needs_theta0``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from trm_jax.errors import ConfigError
from trm_jax.merging import task_vectors, tunable_magmax
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task
from trm_jax.runner.setup import key_of


class TunableMagMax(Method):
    name = "tunable_magmax"
    description = "Tunable MagMax: MagMax with per-task element quotas from label counts"
    merges = True
    needs_theta0 = True

    def state_like(self, config, theta0, tasks_done):
        return {"taus": [theta0] * tasks_done, "counts": jnp.zeros((tasks_done,), jnp.int32)}

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        c = task.config.merge.tunable_magmax
        if c.similarity_metric != "labels":
            raise ConfigError(
                f"tunable_magmax: similarity_metric={c.similarity_metric!r}; the runner "
                "implements 'labels' only"
            )
        tau = task_vectors.task_vector(finetuned.theta_t, task.theta0)
        count = int(np.isin(np.asarray(task.labels), np.asarray(task.classes.task)).sum())
        if carry.state is None:
            taus, counts = [tau], np.asarray([count], np.int32)
        else:
            taus = [*carry.state["taus"], tau]
            counts = np.append(np.asarray(carry.state["counts"], np.int32), np.int32(count))
        merged = tunable_magmax.merge(
            task.theta0,
            taus,
            preference=counts.tolist(),
            key=key_of(c.seed, 1000 + task.t),
            lam=c.lam,
        )
        return merged, {"taus": taus, "counts": jnp.asarray(counts, jnp.int32)}, {}
