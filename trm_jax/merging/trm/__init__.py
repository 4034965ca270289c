"""TRM: Trajectory Regularized Merging, as an optimisation over a small coefficient set.

At the end of task ``t`` the merged model is searched for inside an *augmented trajectory
subspace* built from four models only: the pre-trained base ``theta0``, the previous merged
model ``theta_prev`` (θ̄_{t-1}) and ``K`` snapshots of task ``t``'s own fine-tuning
trajectory (the last one is the expert ``theta_t``). Per parameter leaf ``l`` the directions
are

* ``d_k = theta_t^(k) - theta_prev`` for ``k = 1..K``            (``'trajectory'``)
* ``h   = theta_prev - theta0``                                   (``'history'``)
* ``m   = theta0 + lam * maxmag(h / lam, theta_t - theta0) - theta_prev``
                                                     (``'consensus'``, MagMax pair; lam = 1)

stacked as ``D_l`` with shape ``[J, *leaf.shape]``, and the merged model is

    theta(alpha)_l = theta_init_l + sum_j (alpha_{g(l), j} - alpha_init_j) * D_{l, j}

where ``theta_init`` is the exact initial point (the MagMax pair merge by default) and
``g(l)`` the coefficient group of leaf ``l`` (one group per leaf by default). When the init
point's own direction is in the subspace this is the reference formulation
``theta_prev + sum_j alpha_j D_j``; writing it around ``theta_init`` makes ``steps=0`` return
the MagMax point bit for bit. The coefficients are fitted with Adam on minibatches of the
current task only, against

    L(alpha) = w_align * L_align + w_consistency * L_consistency
             + w_responsiveness * L_responsiveness + w_reg * ||alpha - alpha_init||^2.

Every objective is a separate pure function with the *objective protocol*
``fn(apply_fn, params, logits, batch, targets, ctx) -> scalar`` (``params`` = theta(alpha),
``logits = apply_fn(params, batch['image'])``, ``targets`` = per-batch constants computed once
without gradient, ``ctx`` = a :class:`Context`) and is looked up by name in a registry
(``ALIGN``, ``CONSISTENCY``, ``RESPONSIVENESS``); register your own function under a new name
and select it in the config to swap one objective without touching anything else.

The optimisation step (all objectives, the second-order responsiveness term, the Adam update
of the coefficients) is one module-level jitted function, :func:`train_step`; the model
function is a static argument and class sets are fixed-shape masks, so one compile serves
every merge of a stream. Nothing here knows about models: only pytrees and a pure
``apply_fn(params, images) -> logits``.

The package is split along those lines: :mod:`.config` (fields, defaults, validation),
:mod:`.subspace` (directions, coefficient groups, theta(alpha)), :mod:`.objectives` (the
objective functions and their registries), :mod:`.step` (the jitted step and per-batch
targets) and :mod:`.driver` (``merge``, the orchestration). Every public name is re-exported
here; the registries are the single dict objects the validation and the step read, so
``trm.ALIGN['mine'] = fn`` makes ``config.align = 'mine'`` valid and used. "The reference
formulation" throughout is
the one in docs/method.md.
"""

from trm_jax.losses import mask_logits as masked
from trm_jax.losses import tempered_kl
from trm_jax.merging.trm.config import (
    DIRECTION_DTYPES,
    DIRECTIONS,
    G_REFS,
    INITS,
    TERMS,
    default_config,
    validate_config,
)
from trm_jax.merging.trm.driver import make_context, merge
from trm_jax.merging.trm.objectives import (
    ALIGN,
    CONSISTENCY,
    MEASURES,
    REG,
    RESPONSIVENESS,
    ApplyFn,
    Context,
    align_ce,
    align_ce_seen,
    align_distill,
    align_distill_seen,
    align_param,
    consistency_kl,
    consistency_mse,
    g_fisher,
    g_probe,
    grad_sq_norm,
    reg_l2,
    reg_theta,
    responsiveness_fisher,
    responsiveness_probe,
)
from trm_jax.merging.trm.step import (
    TARGETS,
    Hyper,
    Spec,
    State,
    compute_targets,
    evaluate,
    init_state,
    loss_terms,
    measure_g,
    responsiveness_term,
    train_step,
)
from trm_jax.merging.trm.subspace import (
    Layout,
    Subspace,
    alpha_tree,
    build_subspace,
    coefficient_dtype,
    coefficient_groups,
    combine,
    direction_names,
)
from trm_jax.tree_util import PyTree

__all__ = [
    "ALIGN",
    "CONSISTENCY",
    "DIRECTIONS",
    "DIRECTION_DTYPES",
    "G_REFS",
    "INITS",
    "MEASURES",
    "REG",
    "RESPONSIVENESS",
    "TARGETS",
    "TERMS",
    "ApplyFn",
    "Context",
    "Hyper",
    "Layout",
    "PyTree",
    "Spec",
    "State",
    "Subspace",
    "align_ce",
    "align_ce_seen",
    "align_distill",
    "align_distill_seen",
    "align_param",
    "alpha_tree",
    "build_subspace",
    "coefficient_dtype",
    "coefficient_groups",
    "combine",
    "compute_targets",
    "consistency_kl",
    "consistency_mse",
    "default_config",
    "direction_names",
    "evaluate",
    "g_fisher",
    "g_probe",
    "grad_sq_norm",
    "init_state",
    "loss_terms",
    "make_context",
    "masked",
    "measure_g",
    "merge",
    "reg_l2",
    "reg_theta",
    "responsiveness_fisher",
    "responsiveness_probe",
    "responsiveness_term",
    "tempered_kl",
    "train_step",
    "validate_config",
]
