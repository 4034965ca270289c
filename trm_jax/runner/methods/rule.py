"""Rule-based merges of task vectors (TIES, DARE, RandMix, ...: ``merging.MERGERS``).

theta_bar_t = rule(theta_0, [tau_1..tau_t], **hparams) with tau_i = theta_i - theta_0.
Rules without an exact running form keep every task vector: that list is the persisted
state, and ``stored_bytes`` counts it.
"""

from trm_jax import merging
from trm_jax.merging import task_vectors
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task
from trm_jax.runner.setup import key_of


def rule_hparams(config, t: int) -> dict:
    """The rule's keyword hparams; random rules get a key folded with the task index."""
    name = config.merge.method
    return merging.hparams_for(name, config.merge, key=key_of(config.merge.seed, 1000 + t))


class RuleMerge(Method):
    merges = True
    needs_theta0 = True

    def __init__(self, rule: str):
        self.name = rule
        self.description = f"merging.{rule} over every task vector so far"

    def state_like(self, config, theta0, tasks_done):
        return [theta0] * tasks_done

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        tau = task_vectors.task_vector(finetuned.theta_t, task.theta0)
        taus = [tau] if carry.state is None else [*carry.state, tau]
        hp = rule_hparams(task.config, task.t)
        return merging.get(self.name)(task.theta0, taus, **hp), taus, {}
