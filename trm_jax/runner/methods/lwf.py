"""LwF (Li & Hoiem, 2016): sequential fine-tuning plus distillation of the previous
model's old-class predictions on the current task's images (``regularizers.lwf_loss``)."""

import jax.numpy as jnp

from trm_jax.runner.methods.base import Carry, Method, Task, Training


class LwF(Method):
    name = "lwf"
    description = "sequential fine-tuning + LwF distillation on old-class logits"

    def loss_terms(self, config) -> dict:
        return {**super().loss_terms(config), "lwf_lambda": config.cl.lwf_lambda}

    def training(self, task: Task, carry: Carry) -> Training:
        ctx = {
            "teacher": {"backbone": carry.merged, "head": task.head},
            "old_mask": jnp.asarray(task.classes.old_mask),
        }
        return super().training(task, carry)._replace(ctx=ctx)
