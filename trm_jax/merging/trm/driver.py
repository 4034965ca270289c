"""The driver: :func:`merge` checks its inputs, builds the subspace, draws batches lazily,
runs the jitted steps and reports.

Everything array-heavy lives in :mod:`.step`; this module holds the host-side bookkeeping
(class ids, batch chunking and caching, the probe head, the history and the report), so the
jitted step keeps one trace per stream however the batches arrive.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from trm_jax.errors import ConfigError, DataError, TrainingError
from trm_jax.merging import task_vectors as tv
from trm_jax.merging.trm.config import TERMS, validate_config
from trm_jax.merging.trm.objectives import (
    ALIGN,
    CONSISTENCY,
    MEASURES,
    REG,
    RESPONSIVENESS,
    ApplyFn,
    Context,
)
from trm_jax.merging.trm.step import (
    TARGETS,
    Hyper,
    Spec,
    State,
    compute_targets,
    evaluate,
    init_state,
    measure_g,
    train_step,
)
from trm_jax.merging.trm.subspace import Layout, Subspace, alpha_tree, build_subspace, combine
from trm_jax.tree_util import PyTree, fetch


def _chunks(batch: dict, size: int) -> list[dict]:
    """``batch`` split into consecutive chunks of ``size`` examples (a smaller rest last);
    ``[batch]`` when ``size`` is 0 or the batch is not larger."""
    n = int(np.shape(batch["label"])[0])
    if not size or n <= size:
        return [batch]
    return [jax.tree.map(lambda x, i=i: x[i : i + size], batch) for i in range(0, n, size)]


class _BatchCache:
    """Draws batches lazily, computes each one's targets once, cycles when they run out.

    Incoming batches are split into chunks of ``batch_size`` (0 = as given). Holds at most
    ``limit`` distinct chunks; chunks whose shapes differ from the first (a ragged last
    batch or rest) are skipped so the jitted step keeps one trace. Labels are checked on
    the host with ``tree_util.fetch`` (arrays split across hosts are gathered: every process
    draws the same batches, as SPMD code does).

    It also owns what depends on the first batch or is measured late: ``ctx``, built by
    ``make_context(first chunk)`` (the logits' count is only known from a batch; ``None``
    without ``make_context``), passed to ``make_targets(chunk, index, ctx)``; and each held
    chunk's ``g_ref``, measured by ``measure_ref(chunk, targets, ctx)`` only when first asked
    for (:meth:`g_ref`): a second-order measurement that most held chunks never need when
    the responsiveness term is recomputed only every N-th step. With ``keep_g_ref`` it is
    stored in the chunk's targets (the responsiveness term reads it there), else measured
    for the report only and not stored (the targets keep the structure the step traced).
    """

    def __init__(
        self,
        batches: Iterable[dict],
        limit: int,
        make_targets: Callable[[dict, int, Context | None], dict],
        task_classes: np.ndarray,
        batch_size: int = 0,
        *,
        make_context: Callable[[dict], Context] | None = None,
        measure_ref: Callable[[dict, dict, Context], jax.Array] | None = None,
        keep_g_ref: bool = False,
    ):
        self._iter = iter(batches)
        self._limit = limit
        self._make_targets = make_targets
        self._task_classes = task_classes
        self._batch_size = batch_size
        self._make_context = make_context
        self._measure_ref = measure_ref
        self._keep_g_ref = keep_g_ref
        self._pending: list[dict] = []
        self._measured: set[int] = set()  # entries whose targets hold a measured g_ref
        self.ctx: Context | None = None
        self.entries: list[tuple[dict, dict]] = []
        self.skipped = 0
        self._exhausted = False

    def _next_chunk(self) -> dict | None:
        while not self._pending:
            raw = next(self._iter, None)
            if raw is None:
                return None
            if not isinstance(raw, dict) or "image" not in raw or "label" not in raw:
                raise DataError("trm.merge: each batch must be a dict with 'image' and 'label'")
            batch = {"image": raw["image"], "label": raw["label"]}
            labels = np.asarray(fetch(batch["label"]))
            outside = np.setdiff1d(labels, self._task_classes)
            if outside.size:
                raise DataError(
                    f"trm.merge: batch labels {outside[:10].tolist()} are not in task_classes; "
                    "batches must hold the current task's data only"
                )
            self._pending = _chunks(batch, self._batch_size)
        return self._pending.pop(0)

    def _draw(self) -> bool:
        while (batch := self._next_chunk()) is not None:
            shapes = jax.tree.map(np.shape, batch)
            if self.entries and shapes != jax.tree.map(np.shape, self.entries[0][0]):
                self.skipped += 1
                continue
            if self.ctx is None and self._make_context is not None:
                self.ctx = self._make_context(batch)
            self.entries.append((batch, self._make_targets(batch, len(self.entries), self.ctx)))
            return True
        self._exhausted = True
        return False

    def get(self, step: int, *, g_ref: bool = False) -> tuple[dict, dict]:
        """The chunk and targets for ``step``: a newly drawn one while fewer than ``limit``
        are held and the batches last, else the held ones in turn. With ``g_ref``, its
        targets' ``g_ref`` is measured first (once per chunk; see :meth:`g_ref`)."""
        if (
            not self._exhausted
            and (not self._limit or len(self.entries) < self._limit)
            and self._draw()
        ):
            index = len(self.entries) - 1
        elif not self.entries:
            raise DataError("trm.merge: no batches; pass at least one batch of the current task")
        else:
            index = step % len(self.entries)
        if g_ref:
            self.g_ref(index)
        return self.entries[index]

    def g_ref(self, index: int) -> jax.Array:
        """g at the reference model on held chunk ``index`` (see the class docstring)."""
        batch, targets = self.entries[index]
        if not self._keep_g_ref:
            return self._measure_ref(batch, targets, self.ctx)
        if index not in self._measured:
            targets["g_ref"] = self._measure_ref(batch, targets, self.ctx)
            self._measured.add(index)
        return targets["g_ref"]


def make_context(
    previous: PyTree,
    expert: PyTree,
    task_classes: np.ndarray,
    old_classes: np.ndarray,
    config: ml_collections.ConfigDict,
    dtype: jnp.dtype = jnp.float32,
    *,
    num_logits: int,
) -> Context:
    """The :class:`Context` of one merge over ``num_logits`` outputs.

    The probe head is one fixed ``[num_logits, P]`` draw from ``probe.seed`` (so a class keeps
    its probe row along the stream), unseen rows zeroed, scaled by ``1/sqrt(#seen)``.
    """
    masks = []
    for ids in (task_classes, old_classes):
        mask = np.zeros(num_logits, bool)
        mask[np.asarray(ids, np.int64)] = True
        masks.append(mask)
    task_mask, old_mask = masks
    seen_mask = task_mask | old_mask
    probe_head = None
    if config.probe.num_classes:
        key = jax.random.fold_in(jax.random.key(config.probe.seed), 0)
        probe_head = jax.random.normal(key, (num_logits, config.probe.num_classes), dtype)
        probe_head = probe_head * jnp.asarray(seen_mask[:, None] / np.sqrt(seen_mask.sum()), dtype)
    return Context(
        task_mask=jnp.asarray(task_mask),
        old_mask=jnp.asarray(old_mask),
        seen_mask=jnp.asarray(seen_mask),
        temperature=jnp.asarray(config.temperature, dtype),
        probe_head=probe_head,
        previous=previous,
        expert=expert,
    )


def _class_ids(values: Any, label: str) -> np.ndarray:
    """``values`` as a flat int32 array of class ids; ``DataError`` (naming ``label``) for
    non-integer, repeated or negative ids."""
    ids = np.asarray(values).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"trm.merge: {label} must hold integer class ids, got {ids.dtype}")
    ids = ids.astype(np.int32)
    if np.unique(ids).size != ids.size:
        raise DataError(f"trm.merge: {label} repeats class ids")
    if ids.size and ids.min() < 0:
        raise DataError(f"trm.merge: {label} holds negative class ids")
    return ids


def _check_inputs(
    base: PyTree, previous: PyTree, snapshots: Sequence[PyTree], task_classes: Any, old_classes: Any
) -> tuple[list[PyTree], np.ndarray, np.ndarray]:
    """The snapshots as a list and the task / old class ids, after checking that the trees
    match ``base`` and that the class sets are valid and disjoint (see :func:`merge`)."""
    snapshots = list(snapshots)
    if not snapshots:
        raise ConfigError(
            "trm.merge: no snapshots (K = 0); pass at least the expert theta_t (the runner "
            "keeps train.snapshots of each task's trajectory: it must be >= 1, and the task "
            "must take at least one step)"
        )
    tv.check_like(
        base,
        previous,
        *snapshots,
        names=["previous"] + [f"snapshots[{k}]" for k in range(len(snapshots))],
    )
    task_ids = _class_ids(task_classes, "task_classes")
    old_ids = _class_ids(old_classes, "old_classes")
    if task_ids.size == 0:
        raise DataError("trm.merge: task_classes is empty")
    overlap = np.intersect1d(task_ids, old_ids)
    if overlap.size:
        raise DataError(
            f"trm.merge: task_classes and old_classes overlap at {overlap[:10].tolist()}"
        )
    return snapshots, task_ids, old_ids


def _spec_and_hyper(
    apply_fn: ApplyFn, config: ml_collections.ConfigDict, layout: Layout, dtype: jnp.dtype
) -> tuple[Spec, Hyper]:
    """The static step description (objectives looked up in the registries now, ``None``
    for a zero weight) and the traced hyperparameters in the coefficients' dtype."""
    weights = {name: float(config.weights[name]) for name in TERMS}
    spec = Spec(
        apply_fn=apply_fn,
        align=ALIGN[config.align] if weights["align"] else None,
        consistency=CONSISTENCY[config.consistency] if weights["consistency"] else None,
        responsiveness=(
            RESPONSIVENESS[config.responsiveness] if weights["responsiveness"] else None
        ),
        reg=REG[config.reg] if weights["reg"] else None,
        layout=layout,
        responsiveness_every=int(config.responsiveness_every),
    )
    hyper = Hyper(
        learning_rate=jnp.asarray(config.learning_rate, dtype),
        weights={name: jnp.asarray(w, dtype) for name, w in weights.items()},
    )
    return spec, hyper


def _first_context(
    batch: dict,
    *,
    apply_fn: ApplyFn,
    previous: PyTree,
    expert: PyTree,
    task_ids: np.ndarray,
    old_ids: np.ndarray,
    config: ml_collections.ConfigDict,
    dtype: jnp.dtype,
) -> Context:
    """:func:`make_context` over as many logits as ``apply_fn`` returns on ``batch`` (a
    shape-only evaluation); ``DataError`` when a class id is beyond them."""
    logits = jax.eval_shape(apply_fn, expert, batch["image"])
    num_logits = int(logits.shape[-1])
    top = int(max(task_ids.max(), old_ids.max(initial=0)))
    if top >= num_logits:
        raise DataError(
            f"trm.merge: class id {top} is beyond the {num_logits} logits apply_fn returns"
        )
    return make_context(previous, expert, task_ids, old_ids, config, dtype, num_logits=num_logits)


def _batch_targets(
    batch: dict,
    index: int,
    ctx: Context,
    *,
    reference: PyTree,
    seed_key: jax.Array,
    probe_key: jax.Array,
    probe_batch_size: int,
    apply_fn: ApplyFn,
    measure: Callable,
    needs: tuple[str, ...],
) -> dict:
    """:func:`compute_targets` of held chunk ``index``: its keys are the seeds folded with
    ``index``, its probe examples the first ``probe_batch_size`` (0 = all)."""
    size = int(np.shape(batch["label"])[0])
    probe_size = min(size, probe_batch_size) if probe_batch_size else size
    return compute_targets(
        reference,
        batch,
        ctx,
        jax.random.fold_in(seed_key, index),
        jax.random.fold_in(probe_key, index),
        apply_fn=apply_fn,
        measure=measure,
        probe_size=probe_size,
        needs=needs,
    )


def _needs(spec: Spec) -> tuple[str, ...]:
    """The targets the active terms read. g_ref is never computed with the others: with the
    responsiveness term on it is a NaN placeholder (``'g_ref_later'``) that the cache fills
    on the chunks a step recomputes L_GR on (every N-th step), so most never pay for it."""
    active = spec.active
    needs = tuple(name for name, term in TARGETS.items() if term in active and name != "g_ref")
    return needs + ("g_ref_later",) if spec.responsiveness is not None else needs


def _batch_cache(
    batches: Iterable[dict],
    config: ml_collections.ConfigDict,
    spec: Spec,
    reference: PyTree,
    previous: PyTree,
    expert: PyTree,
    task_ids: np.ndarray,
    old_ids: np.ndarray,
    dtype: jnp.dtype,
) -> _BatchCache:
    """The merge's :class:`_BatchCache`: targets by :func:`_batch_targets`, the context by
    :func:`_first_context`, g_ref measured at ``reference`` and stored when L_GR is on."""
    apply_fn, measure = spec.apply_fn, MEASURES[config.responsiveness]
    make_targets = functools.partial(
        _batch_targets,
        reference=reference,
        seed_key=jax.random.key(config.seed),
        probe_key=jax.random.fold_in(jax.random.key(config.probe.seed), 1),
        probe_batch_size=config.probe.batch_size,
        apply_fn=apply_fn,
        measure=measure,
        needs=_needs(spec),
    )
    make_context = functools.partial(
        _first_context,
        apply_fn=apply_fn,
        previous=previous,
        expert=expert,
        task_ids=task_ids,
        old_ids=old_ids,
        config=config,
        dtype=dtype,
    )
    return _BatchCache(
        batches,
        config.max_batches or max(1, config.steps),
        make_targets,
        task_ids,
        config.batch_size,
        make_context=make_context,
        measure_ref=functools.partial(measure_g, reference, apply_fn=apply_fn, measure=measure),
        keep_g_ref=spec.responsiveness is not None,
    )


def _optimise(
    state: State,
    subspace: Subspace,
    cache: _BatchCache,
    hyper: Hyper,
    spec: Spec,
    steps: int,
    progress: str | None,
) -> tuple[State, list[dict]]:
    """``steps`` jitted steps over the cache's chunks: the final state and each step's terms.
    With ``steps = 0`` one chunk is still drawn, for the report's g measurements."""
    records = []
    bar = tqdm(
        range(steps), desc=progress, leave=False, disable=progress is None, dynamic_ncols=True
    )
    for step in bar:
        fresh = spec.responsiveness is not None and step % spec.responsiveness_every == 0
        batch, targets = cache.get(step, g_ref=fresh)
        state, terms = train_step(state, subspace, batch, targets, cache.ctx, hyper, spec=spec)
        records.append(terms)
    if not cache.entries:
        cache.get(0)
    return state, records


def _history(records: list[dict], spec: Spec) -> dict[str, np.ndarray]:
    """Per-step float64 arrays ``loss`` and each term (one device->host copy), after checking
    that every loss is finite."""
    names = ("loss", *TERMS)
    stacked = [jnp.stack([r[name] for r in records]) for name in names] if records else []
    history = {
        name: np.asarray(values, np.float64).reshape(-1)
        for name, values in zip(names, fetch(stacked) or [[]] * len(names), strict=True)
    }
    _check_finite_history(history, spec.active)
    return history


def merge(
    apply_fn: ApplyFn,
    base: PyTree,
    previous: PyTree,
    snapshots: Sequence[PyTree],
    batches: Iterable[dict],
    *,
    task_classes: Any,
    old_classes: Any,
    config: ml_collections.ConfigDict,
    progress: str | None = None,
) -> tuple[PyTree, dict[str, Any]]:
    """TRM merge of task ``t`` (see the package docstring for the subspace and objectives).

    Args:
      apply_fn: pure ``(params, images) -> logits`` over every class of the stream.
      base: theta0. previous: theta_prev (= ``base`` for the first task).
      snapshots: the K >= 1 snapshots of task t's trajectory; the last is the expert theta_t.
      batches: iterable of ``{'image', 'label'}`` dicts from the current task only (numpy
        or jax arrays, sharded ones included); drawn lazily, split into chunks of
        ``config.batch_size``; at most ``config.max_batches`` (0: ``max(1, steps)``)
        distinct chunks are held and cycled over.
      task_classes: class ids of task t. old_classes: ids of earlier tasks (may be empty).
      config: :func:`default_config`.
      progress: a description to show a progress bar over the steps with (None: no bar).

    Returns:
      ``(params, info)``: the merged parameters (dtypes of ``base``) and a dict with
      ``alpha`` (coefficients, a pytree shaped like ``base`` with a numpy ``[J]`` row per
      leaf), ``alpha_groups`` (group name -> row), ``directions`` (column names),
      ``history`` (per-step numpy arrays ``loss``, ``align``, ``consistency``,
      ``responsiveness``, ``reg``; terms at the coefficients *before* each step, unweighted;
      with ``responsiveness_every > 1`` the responsiveness value the step reused),
      ``g_ref``, ``g_init``, ``g_final`` (mean g at the reference, the init point and the
      result; NaN when ``report_g`` is False and L_GR is off), ``terms_init`` /
      ``terms_final`` (mean loss and unweighted terms at ``alpha_init`` and at the result;
      these five average over the first
      ``eval_batches`` held batches), ``active`` (terms with a non-zero weight),
      ``batches`` / ``skipped_batches`` (held / ragged chunks) and ``seconds`` (wall time
      of the whole merge).

    Raises:
      ValueError: previous or a snapshot not shaped like base.
      ConfigError: a bad config field, or no snapshots.
      DataError: no batches, malformed batches, labels outside ``task_classes``, bad class
        ids (not integers, repeated, negative), task and old classes overlapping, class ids
        beyond the logits.
      TrainingError: a non-finite loss (names the first step and term).
    """
    start = time.perf_counter()
    validate_config(config)
    snapshots, task_ids, old_ids = _check_inputs(
        base, previous, snapshots, task_classes, old_classes
    )
    subspace, layout = build_subspace(
        base,
        previous,
        snapshots,
        directions=tuple(config.directions),
        granularity=config.granularity,
        init=config.init,
        lam=float(config.lam),
        direction_dtype=config.direction_dtype,
    )
    dtype = subspace.alpha_init.dtype
    spec, hyper = _spec_and_hyper(apply_fn, config, layout, dtype)
    reference = base if config.g_ref == "base" else previous
    cache = _batch_cache(
        batches, config, spec, reference, previous, snapshots[-1], task_ids, old_ids, dtype
    )
    state, records = _optimise(
        init_state(subspace), subspace, cache, hyper, spec, config.steps, progress
    )
    try:
        history = _history(records, spec)
    except TrainingError:
        _check_finite_inputs(base, previous, snapshots)  # blame NaN inputs, not the rate
        raise
    params = combine(subspace, state.alpha, layout)
    info = _summarise(cache, subspace, state, params, hyper, spec, base, history, config)
    params = jax.block_until_ready(params)
    info["seconds"] = time.perf_counter() - start
    return params, info


def _summarise(
    cache: _BatchCache,
    subspace: Subspace,
    state: State,
    params: PyTree,
    hyper: Hyper,
    spec: Spec,
    base: PyTree,
    history: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """``info`` of :func:`merge` but ``seconds``: the coefficients, the history, and g and
    the terms at the init point and the result over the first ``eval_batches`` held chunks.

    With ``steps = 0`` the result is the init point: its numbers are reused, not remeasured.
    """
    ctx, layout = cache.ctx, spec.layout
    measure = MEASURES[config.responsiveness]
    g = functools.partial(measure_g, apply_fn=spec.apply_fn, measure=measure)
    g_ref, g_init, g_final, terms_init, terms_final = [], [], [], [], []
    # g is second-order; without L_GR it is only reported, and ``report_g=False`` skips it.
    report_g = bool(config.report_g) or spec.responsiveness is not None
    nan = jnp.full((), jnp.nan, jnp.float32)
    for index, (batch, targets) in enumerate(cache.entries[: config.eval_batches or None]):
        # g_ref before evaluating: the report's L_GR reads it
        g_ref.append(cache.g_ref(index) if report_g else nan)
        loss, terms = evaluate(subspace.alpha_init, subspace, batch, targets, ctx, hyper, spec=spec)
        terms_init.append({"loss": loss, **terms})
        g_init.append(g(subspace.anchor, batch, targets, ctx) if report_g else nan)
        if config.steps:
            loss, terms = evaluate(state.alpha, subspace, batch, targets, ctx, hyper, spec=spec)
            terms_final.append({"loss": loss, **terms})
            g_final.append(g(params, batch, targets, ctx) if report_g else nan)
    if not config.steps:
        terms_final, g_final = terms_init, g_init
    alpha, g_ref, g_init, g_final, terms_init, terms_final = fetch(
        (state.alpha, g_ref, g_init, g_final, terms_init, terms_final)
    )
    return {
        "alpha": alpha_tree(alpha, layout, base),
        "alpha_groups": dict(zip(layout.group_names, alpha, strict=True)),
        "directions": layout.direction_names,
        "history": history,
        "g_ref": float(np.mean(g_ref)),
        "g_init": float(np.mean(g_init)),
        "g_final": float(np.mean(g_final)),
        "terms_init": _mean_terms(terms_init),
        "terms_final": _mean_terms(terms_final),
        "active": spec.active,
        "batches": len(cache.entries),
        "skipped_batches": cache.skipped,
    }


def _mean_terms(records: list[dict]) -> dict[str, float]:
    """Mean of each term over the held batches (host values), as Python floats."""
    return {name: float(np.mean([r[name] for r in records])) for name in records[0]}


def _check_finite_inputs(base: PyTree, previous: PyTree, snapshots: Sequence[PyTree]) -> None:
    """``NonFiniteError`` naming the input tree and leaves that hold NaN or Inf (checked
    only once the loss went non-finite, so the common path pays nothing)."""
    trees = [("base", base), ("previous", previous)]
    trees += [(f"snapshots[{k}]", snap) for k, snap in enumerate(snapshots)]
    for name, tree in trees:
        try:
            tv.check_finite(tree, f"trm.merge: input {name}")
        except tv.NonFiniteError as e:
            raise tv.NonFiniteError(
                f"{e}; the non-finite loss comes from the inputs, not the learning rate"
            ) from None


def _check_finite_history(history: dict[str, np.ndarray], active: Sequence[str]) -> None:
    """Raise ``TrainingError`` naming the first step whose loss is not finite and the active
    terms that were not finite there."""
    bad = ~np.isfinite(history["loss"])
    if not bad.any():
        return
    step = int(np.argmax(bad))
    terms = [name for name in active if not np.isfinite(history[name][step])] or ["loss"]
    weights = ", ".join(f"weights.{n}" for n in terms if n != "loss") or "the term weights"
    raise TrainingError(
        f"trm.merge: non-finite loss at step {step} (term {', '.join(terms)}: "
        f"{', '.join(f'{n}={history[n][step]}' for n in terms)}); lower the TRM config's "
        f"learning_rate (the runner's merge.trm.learning_rate) or {weights}"
    )
