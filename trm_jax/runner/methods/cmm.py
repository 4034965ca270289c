"""CMM (Phan et al. 2025) in the runner: tangent-space fine-tuning, the Adam-nu Fisher merge
and the representation correction, each switched by ``config.merge.cmm``.

(a) ``linearize``: task t is fine-tuned from theta_bar_{t-1} in the first-order Taylor model
    of the backbone features around theta_0 (``merging.cmm.linearized_apply``, one
    ``jax.jvp``), the head applied to those features. theta_0 reaches the jitted step as
    ``ctx['linearize_at']``, an argument, so one compiled step serves every task and no
    backbone-sized constant is baked into it. The merged model is evaluated in the same
    linearised model (``predict`` / ``eval_ctx``), as the authors' code does: their
    ``LinearizedImageEncoder`` is what ``eval_single_dataset`` scores after every task and
    what the merge scripts apply task vectors to.
(b) ``fisher_merge``: Adam's second moments at theta_t (``finetuned.opt_state`` of the fresh
    per-task AdamW, ``merging.cmm.adam_nu``) weight the merge with theta_bar_{t-1}; the merged
    Fisher ``F_t`` is the persisted state. Off: ``(1-alpha) theta_bar_{t-1} + alpha theta_t``.
(c) ``representation``: from task 2 on, one pass over task t's training batches (shuffled
    with ``seed_of(seed, t, 5)``, evaluation preprocessing, the last partial batch dropped)
    moves only ``representation_trainable`` of theta_bar_t so that its features match those
    of theta_bar_{t-1} (linearised features when (a) is on).

Persisted state: ``merging.cmm.CMMState`` (one float32 backbone-sized Fisher and a task
counter), kept whatever the switches (with ``fisher_merge`` off the Fisher stays zero).
theta_0 counts as stored (``needs_theta0``): stage (a) evaluates and trains around it.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from trm_jax.data import pipeline
from trm_jax.errors import ConfigError
from trm_jax.merging import cmm
from trm_jax.models import heads
from trm_jax.runner import setup, train
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task, Training
from trm_jax.tree_util import leaf_names

REPRESENTATION_TAG = 5  # seed_of(seed, t, 5): the batches of stage (c)

# ``representation_trainable='auto'``: the first of these that names a backbone leaf. CLIP's
# image tower ends in ``visual_projection`` (the [768, 512] matrix the authors train); a ViT
# with a representation layer ends in ``pre_logits``. A ViT without one (our default) ends in
# its final LayerNorm: its scale and bias are the last parametrised map before the features,
# which are affine in them as CLIP's features are linear in the projection.
AUTO_TRAINABLE = (
    r"(^|/)visual_projection/kernel$",
    r"(^|/)pre_logits/kernel$",
    r"(^|/)encoder_norm/(scale|bias)$",
)


def trainable_pattern(pattern: str, backbone) -> str:
    """The regex of the leaves stage (c) moves: ``pattern`` itself, or for ``'auto'`` the
    first ``AUTO_TRAINABLE`` entry that matches a leaf of ``backbone`` (``ConfigError``
    when none does)."""
    if pattern != "auto":
        return pattern
    names = leaf_names(backbone)
    for candidate in AUTO_TRAINABLE:
        if any(re.search(candidate, n) for n in names):
            return candidate
    raise ConfigError(
        "cmm: representation_trainable='auto' finds no output projection or final norm "
        f"(leaves look like {names[:3]}); set merge.cmm.representation_trainable"
    )


def linearized_logits_fn(config, model: setup.Model):
    """``logits_fn(params, images, ctx)``: the head over the backbone features linearised
    around ``ctx['linearize_at']`` (cached per model config)."""

    def build():
        features_fn = model.backbone.features_fn
        head, scale = config.model.head, config.model.head_scale

        def logits_fn(params, images, ctx):
            def lin_features(p, x):
                return cmm.linearized_apply(features_fn, ctx["linearize_at"], p, x)

            return heads.make_logits_fn(lin_features, head, scale)(params, images, ctx)

        return logits_fn

    return setup.cached(setup.cache_key("cmm_logits", config.model), build)


def task_batches(task: Task, seed: int):
    """One shuffled pass over task t's training data, preprocessed (evaluation mode) and
    placed, in full batches of ``train.batch_size`` (or the whole task when smaller)."""
    prep = setup.preprocess_fn(task.model)
    size = min(task.config.train.batch_size, len(task.labels))
    for b in pipeline.batches(
        task.images, task.labels, size, shuffle=True, seed=seed, drop_remainder=True
    ):
        yield task.place.batch({"image": prep(b["image"]), "label": jnp.asarray(b["label"])})


class CMM(Method):
    name = "cmm"
    description = "CMM: tangent-space fine-tuning, Adam-nu Fisher merge, representation fix"
    merges = True
    needs_theta0 = True

    def step(self, config, model: setup.Model):
        if not config.merge.cmm.linearize:
            return super().step(config, model)
        tcfg, terms = config.train, self.loss_terms(config)

        def build():
            loss_fn = setup.loss_fn_for(tcfg, linearized_logits_fn(config, model), terms)
            opt = train.make_optimizer(tcfg)
            return opt, loss_fn, setup.train_step_for(tcfg, model, loss_fn, opt)

        return setup.cached(setup.cache_key("cmm_step", config.model, tcfg, terms), build)

    def predict(self, config, model: setup.Model):
        if not config.merge.cmm.linearize:
            return model.predict
        return setup.cached(
            setup.cache_key("cmm_predict", config.model),
            lambda: train.make_predict_fn(linearized_logits_fn(config, model), model.preprocess),
        )

    def eval_ctx(self, config, theta0) -> dict:
        return {"linearize_at": theta0} if config.merge.cmm.linearize else {}

    def state_like(self, config, theta0, tasks_done):
        return cmm.init(theta0)

    def training(self, task: Task, carry: Carry) -> Training:
        config = task.config
        if config.merge.cmm.fisher_merge and config.train.optimizer != "adamw":
            raise ConfigError(
                f"cmm: fisher_merge reads Adam's second moments; train.optimizer="
                f"{config.train.optimizer!r} has none (use 'adamw' or merge.cmm.fisher_merge=False)"
            )
        training = super().training(task, carry)
        return training._replace(ctx=self.eval_ctx(config, task.theta0))

    def _optimizer(self, config, theta0):
        """Stage (c)'s optimiser, built once per (model, cmm config): it is a static
        argument of the jitted ``representation_step``."""
        c = config.merge.cmm
        pattern = trainable_pattern(c.representation_trainable, theta0)
        return setup.cached(
            setup.cache_key("cmm_rep_opt", config.model, c, pattern),
            lambda: cmm.representation_optimizer(
                theta0,
                pattern=pattern,
                learning_rate=c.representation_lr,
                weight_decay=c.representation_weight_decay,
                clip_norm=c.representation_clip_norm,
            ),
        )

    def merge(self, task: Task, carry: Carry, finetuned: Finetuned):
        config, c = task.config, task.config.merge.cmm
        state = carry.state if carry.state is not None else cmm.init(task.theta0)
        first = int(state.count) == 0
        nu = cmm.adam_nu(finetuned.opt_state)["backbone"] if c.fisher_merge else None
        merged, state = cmm.update(
            state,
            carry.merged,
            finetuned.theta_t,
            nu,
            alpha=c.alpha,
            damping=c.fisher_damping,
            use_fisher=c.fisher_merge,
        )
        info = {}
        if c.representation and not first:
            seed = setup.seed_of(config.seed, task.t, REPRESENTATION_TAG)
            merged, losses = cmm.representation_correction(
                task.model.backbone.features_fn,
                merged,
                carry.merged,
                task_batches(task, seed),
                config=c,
                params0=task.theta0 if c.linearize else None,
                optimizer=self._optimizer(config, task.theta0),
            )
            if losses:
                info = {"representation_first": losses[0], "representation_last": losses[-1]}
        return merged, state, info


def representation_batches(task: Task):
    """The batches stage (c) of task ``task.t`` reads (for references outside the runner)."""
    seed = setup.seed_of(task.config.seed, task.t, REPRESENTATION_TAG)
    return task_batches(task, seed)
