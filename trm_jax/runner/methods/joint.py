"""Joint training: the upper bound that sees every task's data at once."""

import numpy as np

from trm_jax.runner import train
from trm_jax.runner.methods.base import Carry, Method, Task, Training


class Joint(Method):
    """After task t, fine-tune theta_0 on the data of tasks 1..t together (loss over
    every seen class). With ``train.steps > 0`` it takes ``steps * t`` steps, so each
    task's data gets as many steps as in the sequential methods."""

    name = "joint"
    description = "upper bound: after task t, fine-tune theta_0 on the data of tasks 1..t"
    needs_theta0 = True

    def training(self, task: Task, carry: Carry) -> Training:
        tcfg = task.config.train
        parts = [task.stream.split("train", j) for j in range(task.t + 1)]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        num_steps = train.steps_per_task(len(labels), tcfg)
        if tcfg.steps > 0:
            num_steps = tcfg.steps * (task.t + 1)
        return Training(
            start=task.theta0,
            from_merged=False,
            images=images,
            labels=labels,
            train_mask=task.classes.seen_mask,
            ctx={},
            num_steps=num_steps,
            num_snapshots=1,
        )
