"""Training curves in TensorBoard: per-step fine-tuning metrics and TRM's terms per merge
step, written with tensorboardX when ``config.log.tensorboard`` is on.

tensorboardX writes the standard event files without TensorFlow (which this library does
not otherwise need; ``tf.summary`` would pull it in, and ``clu.metric_writers`` depends on
it too). Tags: ``task_<t>/train/<metric>`` by step within the task,
``task_<t>/trm/<term>`` by merge step, ``stream/<metric>`` by task. Only process 0 writes.
View with ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import os

import jax
import numpy as np

# Fine-tuning metrics logged every step (the loss terms are added as they appear).
TRAIN_KEYS = ("loss", "lr", "grad_norm")


class Writer:
    """A small facade over ``tensorboardX.SummaryWriter`` (a no-op when disabled)."""

    def __init__(self, logdir: str | None):
        self._w = None
        if logdir and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(logdir=logdir)

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def train_logger(self, task: int):
        """``log(step, metrics)`` for ``train.finetune`` (None when disabled)."""
        if self._w is None:
            return None

        def log(step: int, metrics: dict) -> None:
            for k, v in metrics.items():
                if np.ndim(v) == 0:
                    self._w.add_scalar(f"task_{task}/train/{k}", float(v), step)

        return log

    def trm_history(self, task: int, history: dict) -> None:
        """TRM's per-step loss terms (``info['history']``) of task ``task``'s merge."""
        if self._w is None:
            return
        for term, values in history.items():
            for step, v in enumerate(np.asarray(values, np.float64).ravel()):
                self._w.add_scalar(f"task_{task}/trm/{term}", v, step)

    def stream(self, task: int, values: dict) -> None:
        """Per-task scalars of the stream (accuracy on the seen classes, merge seconds)."""
        if self._w is None:
            return
        for k, v in values.items():
            self._w.add_scalar(f"stream/{k}", float(v), task)

    def close(self) -> None:
        if self._w is not None:
            self._w.flush()
            self._w.close()


def open_writer(config, workdir: str) -> Writer:
    """The run's writer under ``<workdir>/tensorboard`` (disabled unless
    ``config.log.tensorboard``)."""
    on = bool(config.log.tensorboard)
    return Writer(os.path.join(workdir, "tensorboard") if on else None)
