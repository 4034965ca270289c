"""TRM: Trajectory Regularized Merging over the task's K snapshots (docs/method.md).

Keeps nothing between tasks beyond theta_bar_t (and theta_0, which is public): the
snapshots of the current trajectory are dropped after the merge.
"""

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import merging
from trm_jax.data import pipeline
from trm_jax.runner import setup
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task


def apply_fn(config, model: setup.Model):
    """``apply_fn(tree, images)`` for ``trm.merge`` over ``{'backbone', 'rows', 'head'}``.

    The head (frozen rows, linear rows) travels inside the merged tree behind a
    ``stop_gradient``, instead of being closed over: the function object is then the same
    for every task and seed of a process, so TRM's jitted steps are reused, and the head
    gets no gradient (its directions are zero: it is identical in theta_0, the previous
    model and every snapshot, so the merge returns it unchanged)."""
    logits_fn = model.logits_fn

    def build():
        def fn(tree, images):
            head = jax.lax.stop_gradient(tree["head"])
            rows = jax.lax.stop_gradient(tree["rows"])
            return logits_fn({"backbone": tree["backbone"], "head": head}, images, {"rows": rows})

        return fn

    return setup.cached(setup.cache_key("trm_apply", config.model), build)


def preprocessed_batches(task: Task, batch_size: int, seed: int):
    """Endless batches of the task's data, preprocessed once (TRM reuses each many times)."""
    prep = setup.preprocess_fn(task.model)
    for b in pipeline.endless_batches(
        task.images, task.labels, batch_size, seed, what=f"TRM batches of task {task.t + 1}"
    ):
        out = {"image": prep(b["image"]), "label": jnp.asarray(b["label"])}
        yield task.place.batch(out)


class TRM(Method):
    name = "trm"
    description = "Trajectory Regularized Merging over the task's K snapshots"
    merges = True
    needs_theta0 = True

    def num_snapshots(self, config) -> int:
        return config.train.snapshots

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        config = task.config

        def wrap(backbone):
            return {"backbone": backbone, "rows": task.rows, "head": finetuned.head}

        batch_size = config.merge.batch_size or config.train.batch_size
        progress = None
        if config.debug.progress:
            progress = f"task {task.t + 1}/{task.num_tasks} TRM merge"
        merged, info = merging.trm.merge(
            apply_fn(config, task.model),
            wrap(task.theta0),
            wrap(carry.merged),
            [wrap(s) for s in finetuned.snapshots],
            preprocessed_batches(task, batch_size, setup.seed_of(config.seed, task.t, 3)),
            task_classes=np.asarray(task.classes.task),
            old_classes=np.asarray(task.classes.old),
            config=config.merge.trm,
            progress=progress,
        )
        return merged["backbone"], carry.state, info
