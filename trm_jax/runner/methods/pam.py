"""PAM, aligned model merging (Sokar et al. 2025), in the runner.

Task t fine-tunes a copy of the global weights theta_bar_{t-1} (always: ``merge.chain`` does
not apply). Every ``merge.pam.align_every`` optimiser steps, inside the jitted step, the
copy's entries whose delta ``theta - theta_0`` conflicts in sign with the global delta's
top ``align_fraction`` entries (per leaf) are reset (``merging.aligned.align``; to theta_0
with ``reset='zero'``, to theta_bar_{t-1} with ``'global'``). The reset is a
``jax.lax.cond`` on the step counter; the global weights, theta_0 and the importance mask
(computed once per task) travel in ``ctx`` (``pam_global``, ``pam_base``, ``pam_mask``), so
one compiled step serves every task. Task 1 has no global weights yet and is not aligned
(``pam_active`` is False). ``penalty_weight > 0`` adds ``aligned.alignment_penalty`` to the
loss (our addition, off by default). After the task, its delta is averaged into the global
one (``aligned.merge_step``).

Persisted state: ``merging.aligned.AlignedState``, one float32 backbone-sized delta and a
task counter. theta_0 is needed at every step and merge (``needs_theta0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trm_jax.errors import ConfigError
from trm_jax.merging import aligned
from trm_jax.runner import setup
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task, Training
from trm_jax.runner.train import TrainState
from trm_jax.tree_util import f32


def make_aligned_step(inner_step, *, every: int, p: float, reset: str):
    """``step(state, batch, key, ctx)``: ``inner_step``, then, when ``ctx['pam_active']`` and
    the new step count is a multiple of ``every``, ``aligned.align`` of the backbone."""
    if reset not in aligned.RESETS:
        raise ConfigError(f"pam: reset={reset!r}; choices: {aligned.RESETS}")

    def step(state: TrainState, batch, key, ctx):
        state, metrics = inner_step(state, batch, key, ctx)
        backbone = state.params["backbone"]
        do = jnp.logical_and(ctx["pam_active"], state.step % every == 0)

        def align(b):
            return aligned.align(
                b, ctx["pam_global"], ctx["pam_base"], p=p, reset=reset, mask=ctx["pam_mask"]
            )

        backbone = jax.lax.cond(do, align, lambda b: b, backbone)
        params = {**state.params, "backbone": backbone}
        return state._replace(params=params), {**metrics, "aligned": do}

    return jax.jit(step, donate_argnums=())


def _with_penalty(loss_fn, c):
    """``loss_fn`` plus ``c.penalty_weight * aligned.alignment_penalty`` (tasks 2+)."""

    def penalised(params, images, labels, ctx):
        loss, aux = loss_fn(params, images, labels, ctx)
        pen = aligned.alignment_penalty(
            params["backbone"],
            ctx["pam_global"],
            ctx["pam_base"],
            p=c.align_fraction,
            mask=ctx["pam_mask"],
        )
        pen = jnp.where(ctx["pam_active"], pen, 0.0)
        return loss + c.penalty_weight * pen, {**aux, "pam_penalty": pen}

    return penalised


class PAM(Method):
    name = "pam"
    description = "PAM: aligned fine-tuning of the global weights, running-average merge"
    merges = True
    needs_theta0 = True

    def chained(self, config) -> bool:
        return False

    def step(self, config, model: setup.Model):
        c, tcfg, terms = config.merge.pam, config.train, self.loss_terms(config)
        if c.align_every < 0:
            raise ConfigError(f"pam: align_every={c.align_every} must be >= 0 (0: never)")

        def build():
            opt, loss_fn, step, _ = setup.make_step(config, model, tcfg, terms)
            if c.penalty_weight > 0:
                loss_fn = _with_penalty(loss_fn, c)
                step = setup.train_step_for(tcfg, model, loss_fn, opt)
            if c.align_every > 0:
                step = make_aligned_step(
                    step, every=c.align_every, p=c.align_fraction, reset=c.reset
                )
            return opt, loss_fn, step

        fields = (c.align_every, c.align_fraction, c.reset, c.penalty_weight)
        return setup.cached(setup.cache_key("pam_step", config.model, tcfg, terms, fields), build)

    def state_like(self, config, theta0, tasks_done):
        return aligned.init(theta0)

    def training(self, task: Task, carry: Carry) -> Training:
        c = task.config.merge.pam
        glob = carry.merged
        delta = jax.tree.map(lambda g, b: f32(g) - f32(b), glob, task.theta0)
        ctx = {
            "pam_global": glob,
            "pam_base": task.theta0,
            "pam_mask": aligned.importance_mask(delta, c.align_fraction),
            "pam_active": jnp.asarray(carry.state is not None),
        }
        return super().training(task, carry)._replace(ctx=ctx)

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        state = carry.state if carry.state is not None else aligned.init(task.theta0)
        merged, state = aligned.merge_step(
            task.theta0, state, finetuned.theta_t, weight=task.config.merge.pam.merge_weight
        )
        return merged, state, {}
