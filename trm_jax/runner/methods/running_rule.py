"""Rule merges with an exact O(1)-state running form (average, task arithmetic, MagMax:
``merging.running``): the persisted state is one backbone-sized tree plus a counter."""

from trm_jax import merging
from trm_jax.merging import task_vectors
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task
from trm_jax.runner.methods.rule import rule_hparams


class RunningRule(Method):
    merges = True
    needs_theta0 = True

    def __init__(self, rule: str):
        self.name = rule
        self.description = f"merging.{rule} in its running form (O(1) state)"

    def state_like(self, config, theta0, tasks_done):
        return merging.running.init(self.name, theta0)

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        tau = task_vectors.task_vector(finetuned.theta_t, task.theta0)
        state = carry.state
        if state is None:
            state = merging.running.init(self.name, task.theta0)
        state = merging.running.update(state, tau)
        hp = rule_hparams(task.config, task.t)
        return merging.running.result(task.theta0, state, **hp), state, {}
