"""The method protocol: what a continual-learning method tells the task loop.

A method is one object of a ``Method`` subclass, registered by name in
``runner.methods.METHODS`` (``config.merge.method`` picks it). For task ``t`` the loop
(``runner.loop.run_task``) asks it, in order:

1. ``training(task, carry)``: where fine-tuning starts, on which data and classes, with
   which extra loss inputs (``ctx``), for how many steps, keeping how many snapshots;
2. ``step(config, model)``: the optimiser, loss and jitted train step (the shared step
   with the method's ``loss_terms``, unless the method brings its own);
3. ``merge(task, carry, finetuned)``: theta_bar_t and the method's new persisted state;
4. ``predict(config, model)`` and ``eval_ctx``: how theta_bar_t is evaluated;

and, around them, the declarations ``finetunes`` (False: no training at all), ``merges``
(a merge of models: ``merge.chain`` and ``merge.include``/``exclude`` apply and theta_0
is part of the stored state), ``needs_theta0`` and ``state_like`` (the structure of the
persisted state after ``n`` tasks, which resume restores into and ``stored_bytes``
counts). The loop itself names no method. The defaults below are sequential
fine-tuning: train on the current task from theta_bar_{t-1}, keep theta_t.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np

from trm_jax.runner import setup, train
from trm_jax.runner.setup import ClassSets, Model
from trm_jax.tree_util import PyTree


class Task(NamedTuple):
    """What the loop knows about task ``t`` (read-only for methods)."""

    t: int
    num_tasks: int
    config: ml_collections.ConfigDict
    model: Model
    stream: Any  # data.TaskStream
    theta0: PyTree
    rows: Any  # frozen head rows [C, D]
    head: PyTree  # trainable head at the start of the task ({} for frozen heads)
    images: np.ndarray  # the task's training images and labels
    labels: np.ndarray
    classes: ClassSets
    place: Any  # sharding.Placement
    loss_fn: Any  # the run's loss_fn(params, images, labels, ctx) -> (loss, aux)


class Carry(NamedTuple):
    """What persists from one task to the next (checkpointed after every task)."""

    merged: PyTree  # theta_bar_{t-1}
    chain: PyTree  # theta_{t-1}, the start of task t under merge.chain='finetuned'
    state: PyTree | None  # the method's own state (None: nothing)


class Training(NamedTuple):
    """How task ``t`` is fine-tuned."""

    start: PyTree  # backbone the task starts from
    from_merged: bool  # start is theta_bar_{t-1}: the run's first steps give the onset norm
    images: np.ndarray
    labels: np.ndarray
    train_mask: np.ndarray  # [C] bool: the classes the cross-entropy ranges over
    ctx: dict  # extra inputs of the loss (LwF teacher, EWC anchor, ...)
    num_steps: int
    num_snapshots: int  # K trajectory snapshots kept (the last is theta_t)


class Finetuned(NamedTuple):
    """What fine-tuning task ``t`` produced."""

    theta_t: PyTree
    snapshots: list  # K backbone trees along the trajectory, last = theta_t
    head: PyTree  # the trainable head after the task
    ctx: dict  # the loss inputs the task trained with
    training: Training
    opt_state: Any = None  # the optimiser state at theta_t (e.g. Adam's moments)


class Method:
    """Sequential fine-tuning; subclasses override what differs."""

    name = "seq_ft"
    description = "sequential fine-tuning, no merge (theta_bar_t = theta_t)"
    finetunes = True
    merges = False
    needs_theta0 = False

    def chained(self, config) -> bool:
        """True when task t+1 starts from theta_t rather than theta_bar_t."""
        return self.merges and config.merge.chain == "finetuned"

    def loss_terms(self, config) -> dict:
        """Keyword arguments of ``train.make_loss_fn`` beyond the cross-entropy."""
        return {
            "lwf_lambda": 0.0,
            "lwf_temperature": config.cl.lwf_temperature,
            "ewc_lambda": 0.0,
        }

    def step(self, config, model: Model):
        """(optimizer, loss_fn, jitted train step) of the run (cached per process)."""
        opt, loss_fn, step_fn, _ = setup.make_step(
            config, model, config.train, self.loss_terms(config)
        )
        return opt, loss_fn, step_fn

    def predict(self, config, model: Model):
        """Jitted ``predict(params, images, ctx) -> logits`` used for evaluation (a method
        that trains another function of the parameters, such as a linearised model,
        evaluates that function)."""
        return model.predict

    def eval_ctx(self, config, theta0: PyTree) -> dict:
        """Extra inputs of ``predict`` beyond the head rows (e.g. a linearisation point)."""
        return {}

    def num_snapshots(self, config) -> int:
        return 1

    def state_like(self, config, theta0: PyTree, tasks_done: int) -> PyTree | None:
        """The persisted state's structure after ``tasks_done`` tasks (None: none)."""
        return None

    def training(self, task: Task, carry: Carry) -> Training:
        chained = self.chained(task.config)
        return Training(
            start=carry.chain if chained else carry.merged,
            from_merged=not chained,
            images=task.images,
            labels=task.labels,
            train_mask=task.classes.task_mask,
            ctx={},
            num_steps=train.steps_per_task(len(task.labels), task.config.train),
            num_snapshots=self.num_snapshots(task.config),
        )

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        """(theta_bar_t, new state, info dict for metrics.json)."""
        return finetuned.theta_t, carry.state, {}
