"""OPCM (Tang et al. 2025) in the runner: orthogonal-projection continual merging.

After task t, ``tau_t = theta_t - theta_0`` is folded into the running merged task vector by
``merging.opcm.merge_step`` (projection out of the merged vector's principal directions,
then rescaling to the mean task-vector norm); theta_bar_t = theta_0 + delta.

Training: with ``merge.opcm.from_theta0`` (the default) every task is fine-tuned from
theta_0, as OPCM is published (it merges independently fine-tuned models arriving one at a
time; ``merge.chain`` does not apply); False: the runner's chain (theta_bar_{t-1}, or
theta_{t-1} with ``merge.chain='finetuned'``).

Persisted state: ``merging.opcm.OPCMState``, one float32 backbone-sized tree (``delta``) and
three scalars. theta_0 is needed at every merge (``needs_theta0``).
"""

from __future__ import annotations

from trm_jax.merging import opcm
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task, Training


class OPCM(Method):
    name = "opcm"
    description = "OPCM: orthogonal-projection continual merging of task vectors (O(1) state)"
    merges = True
    needs_theta0 = True

    def chained(self, config) -> bool:
        return not config.merge.opcm.from_theta0 and super().chained(config)

    def state_like(self, config, theta0, tasks_done):
        return opcm.init(theta0)

    def training(self, task: Task, carry: Carry) -> Training:
        training = super().training(task, carry)
        if task.config.merge.opcm.from_theta0:
            return training._replace(start=task.theta0, from_merged=False)
        return training

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        c = task.config.merge.opcm
        state = carry.state if carry.state is not None else opcm.init(task.theta0)
        merged, state = opcm.merge_step(
            task.theta0,
            state,
            finetuned.theta_t,
            alpha=c.alpha,
            kinds=opcm.kinds_from_config(task.theta0, c),
        )
        return merged, state, {"lam": state.lam}
