"""EWC (Kirkpatrick et al., 2017): sequential fine-tuning plus a quadratic pull toward the
previous task's parameters, weighted by the accumulated diagonal Fisher.

Persisted state: ``{'anchor': theta_t, 'fisher': sum of the tasks' Fisher diagonals}``,
two backbone-sized trees.
"""

import jax
import jax.numpy as jnp

from trm_jax.data import pipeline
from trm_jax.runner import regularizers
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task, Training
from trm_jax.runner.setup import seed_of


class EWC(Method):
    name = "ewc"
    description = "sequential fine-tuning + EWC diagonal-Fisher penalty"

    def loss_terms(self, config) -> dict:
        return {**super().loss_terms(config), "ewc_lambda": config.cl.ewc_lambda}

    def state_like(self, config, theta0, tasks_done):
        return {"anchor": theta0, "fisher": theta0}

    def training(self, task: Task, carry: Carry) -> Training:
        state = carry.state or {
            "anchor": carry.merged,
            "fisher": jax.tree.map(jnp.zeros_like, carry.merged),
        }
        ctx = {"anchor": state["anchor"], "fisher": state["fisher"]}
        return super().training(task, carry)._replace(ctx=ctx)

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        config, theta_t = task.config, finetuned.theta_t
        preprocess = task.model.preprocess

        def loss(p, batch):
            zero = jax.tree.map(jnp.zeros_like, p)
            x = preprocess(batch["image"], None, train=False)
            ctx = {**finetuned.ctx, "anchor": p, "fisher": zero}
            return task.loss_fn({"backbone": p, "head": finetuned.head}, x, batch["label"], ctx)[0]

        batches = pipeline.endless_batches(
            task.images,
            task.labels,
            config.train.batch_size,
            seed_of(config.seed, task.t, 4),
            what=f"EWC Fisher batches of task {task.t + 1}",
        )
        fisher_t = regularizers.fisher_diagonal(
            loss, theta_t, (next(batches) for _ in range(config.cl.ewc_batches))
        )
        old = carry.state["fisher"] if carry.state else jax.tree.map(jnp.zeros_like, theta_t)
        state = {"anchor": theta_t, "fisher": jax.tree.map(jnp.add, old, fisher_t)}
        return theta_t, state, {}
