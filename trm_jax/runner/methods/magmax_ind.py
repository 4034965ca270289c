"""MagMax-IND (Marczak et al. 2024): MagMax over independently fine-tuned models.

Every task is fine-tuned from theta_0 (not from the previous model: ``merge.chain`` does
not apply), and the task vectors ``tau_t = theta_t - theta_0`` are merged by maximum
magnitude, ``theta_bar_t = theta_0 + lam * maxmag(tau_1..tau_t)`` (``merge.lam``), in the
running form of ``RunningRule('magmax')``. The loop's onset probe measures the gradient
norm at theta_bar_{t-1}, since the run itself starts elsewhere.

Persisted state: ``merging.running.MagMaxState``, one float32 backbone-sized tree and a
counter. theta_0 is needed at every task (``needs_theta0``).
"""

from __future__ import annotations

from trm_jax import merging
from trm_jax.merging import task_vectors
from trm_jax.runner.methods.base import Carry, Finetuned, Task, Training
from trm_jax.runner.methods.running_rule import RunningRule


class MagMaxInd(RunningRule):
    rule = "magmax"

    def __init__(self):
        super().__init__(self.rule)
        self.name = "magmax_ind"
        self.description = "MagMax-IND: every task fine-tuned from theta_0, running MagMax merge"

    def chained(self, config) -> bool:
        return False

    def state_like(self, config, theta0, tasks_done):
        return merging.running.init(self.rule, theta0)

    def training(self, task: Task, carry: Carry) -> Training:
        return super().training(task, carry)._replace(start=task.theta0, from_merged=False)

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        tau = task_vectors.task_vector(finetuned.theta_t, task.theta0)
        state = carry.state
        if state is None:
            state = merging.running.init(self.rule, task.theta0)
        state = merging.running.update(state, tau)
        hp = merging.hparams_for(self.rule, task.config.merge)
        return merging.running.result(task.theta0, state, **hp), state, {}
