"""Whole-config validation, before any work: ranges as data, then the checks that need data.

``runner.run`` calls, in order:

- ``check(config)`` first, before touching the disk: every choice field (method, chain,
  head, dtype, model, benchmark, source, class order, split), every numeric range in
  ``RULES`` (a table of ``Rule(field, predicate, message, when)``), the cross-field rules
  and the TRM config (``trm.validate_config``). A bad config fails in one
  ``ConfigError`` line listing its first problems, instead of after a task of
  fine-tuning (where the merge rules' own checks would fire).
- ``check_data(config, stream, method)`` once the stream is loaded: every batch size
  must fit into the smallest task it is drawn from (full batches only: an epoch with
  no batch would never end).
- ``warnings(config, stream, method)``: settings that are legal but make the run
  meaningless (too few optimisation steps, a warm-up longer than the task, ...), one
  line each, printed by the loop before the first task.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

from trm_jax import data, merging, models
from trm_jax.data import tasks
from trm_jax.errors import ConfigError, check_choice
from trm_jax.merging import trm
from trm_jax.runner import methods, train
from trm_jax.runner.config import CHAINS
from trm_jax.runner.methods import Method
from trm_jax.tree_util import DTYPES

# Fewer optimisation steps per task than this and the accuracy matrix is mostly noise.
MIN_STEPS = 10
# merge.lam scales a (sum of) task vectors; beyond this the merge only amplifies noise
# (and at 1e38 it overflows float32).
MAX_LAM = 100.0
OPTIMIZERS = ("adamw", "sgd")
EVAL_SPLITS = tuple(data.SPLITS)


class Rule(NamedTuple):
    """``field`` (dotted) must satisfy ``ok``; ``message`` says how (after the field name).
    ``when(config)`` limits the rule to the runs that read the field."""

    field: str
    ok: Callable[[Any], bool]
    message: str
    when: Callable[[ml_collections.ConfigDict], bool] | None = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo


def number(lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False):
    def ok(v) -> bool:
        if not _is_num(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    return ok


def _method_is(*names: str):
    return lambda c: c.merge.method in names


def _rule_reads(field: str):
    """True when the run's method is a merge rule that takes hparam ``field``."""
    return lambda c: (
        c.merge.method in merging.MERGERS and field in merging.hparam_names(c.merge.method)
    )


def _pretraining(c) -> bool:
    return bool(c.pretrain.enabled)


# The fields every fine-tuning section (train, pretrain.train) holds.
TRAIN_RULES = (
    Rule("lr", number(0, lo_open=True), "must be a finite number > 0"),
    Rule("weight_decay", number(0), "must be a finite number >= 0"),
    Rule("momentum", number(0, 1, hi_open=True), "must be in [0, 1)"),
    Rule("batch_size", integer(1), "must be an integer >= 1"),
    Rule("epochs", integer(1), "must be an integer >= 1 (train.steps > 0 overrides it)"),
    Rule("steps", integer(0), "must be an integer >= 0 (0: train.epochs decides)"),
    Rule("warmup_steps", integer(0), "must be an integer >= 0"),
    Rule("grad_clip", number(0), "must be a finite number >= 0 (0 = off)"),
    Rule("grad_accum", integer(1), "must be an integer >= 1"),
    Rule("snapshots", integer(1), "must be an integer >= 1 (K snapshots, the last is theta_t)"),
    Rule("onset_steps", integer(0), "must be an integer >= 0"),
    Rule("label_smoothing", number(0, 1, hi_open=True), "must be in [0, 1)"),
)

RULES = (
    *(r._replace(field=f"train.{r.field}") for r in TRAIN_RULES),
    *(r._replace(field=f"pretrain.train.{r.field}", when=_pretraining) for r in TRAIN_RULES),
    Rule("seed", _is_int, "must be an integer"),
    Rule("pretrain.seed", _is_int, "must be an integer", _pretraining),
    Rule("data.num_tasks", integer(1), "must be an integer >= 1"),
    Rule("pretrain.data.num_tasks", integer(1), "must be an integer >= 1", _pretraining),
    Rule("model.head_scale", number(0, lo_open=True), "must be a finite number > 0"),
    Rule(
        "merge.lam",
        number(0, MAX_LAM, lo_open=True),
        f"must be a finite number in (0, {MAX_LAM:g}]",
        _rule_reads("lam"),
    ),
    Rule("merge.k", number(0, 1), "must be in [0, 1] (TIES: fraction kept)", _method_is("ties")),
    Rule(
        "merge.p",
        number(0, 1 - 2.0**-25, hi_open=True),
        "must be in [0, 1) (DARE: drop probability; it must not round to 1 at 2^-24)",
        _method_is("dare"),
    ),
    Rule("merge.seed", _is_int, "must be an integer"),
    Rule("merge.batch_size", integer(0), "must be an integer >= 0 (0 = train.batch_size)"),
    Rule("cl.lwf_lambda", number(0), "must be a finite number >= 0", _method_is("lwf")),
    Rule(
        "cl.lwf_temperature",
        number(0, lo_open=True),
        "must be a finite number > 0",
        _method_is("lwf"),
    ),  # fmt: skip
    Rule("cl.ewc_lambda", number(0), "must be a finite number >= 0", _method_is("ewc")),
    Rule("cl.ewc_batches", integer(1), "must be an integer >= 1", _method_is("ewc")),
    Rule("eval.batch_size", integer(1), "must be an integer >= 1"),
    Rule("debug.stop_after_task", integer(0), "must be an integer >= 0 (0 = run every task)"),
)


def _get(config, field: str):
    obj = config
    for part in field.split("."):
        obj = obj[part]
    return obj


def _regex(value: str, field: str) -> str | None:
    try:
        re.compile(value)
    except re.error as e:
        return f"{field} {value!r} is not a valid regex ({e})"
    return None


def _range_problems(config) -> list[str]:
    out = []
    for rule in RULES:
        if rule.when is not None and not rule.when(config):
            continue
        value = _get(config, rule.field)
        if not rule.ok(value):
            out.append(f"{rule.field} {rule.message}, got {value!r}")
    for section in ("train", "pretrain.train") if config.pretrain.enabled else ("train",):
        tcfg = _get(config, section)
        if _is_int(tcfg.batch_size) and _is_int(tcfg.grad_accum) and tcfg.grad_accum >= 1:
            if tcfg.batch_size % tcfg.grad_accum:
                out.append(
                    f"{section}.batch_size={tcfg.batch_size} must be a multiple of "
                    f"{section}.grad_accum={tcfg.grad_accum}"
                )
    for field in ("merge.include", "merge.exclude"):
        value = _get(config, field)
        if value and (problem := _regex(value, field)):
            out.append(problem)
    if config.eval.split == "val" and not config.data.val_fraction > 0:
        out.append("eval.split='val' needs data.val_fraction > 0 (the val split is empty)")
    return out


def _check_trm(config) -> None:
    """``trm.validate_config`` with its fields named as the runner's (``merge.trm.x``)."""
    try:
        trm.validate_config(config.merge.trm)
    except ConfigError as e:
        raise ConfigError(re.sub(r"trm config '([\w.]+)'", r"merge.trm.\1", str(e))) from None


def check(config: ml_collections.ConfigDict) -> Method:
    """Check the whole config (no disk, no data, no JAX work); return the run's method.

    Raises ``UnknownNameError`` for an unknown name in a choice field and ``ConfigError``
    (one line, the first problems) for anything out of range.
    """
    method = methods.get(config.merge.method)
    check_choice(config.merge.chain, CHAINS, "merge.chain")
    check_choice(config.model.head, models.HEADS, "model.head")
    check_choice(config.eval.split, EVAL_SPLITS, "eval.split")
    sections = [("train", config.train)]
    if config.pretrain.enabled:
        sections.append(("pretrain.train", config.pretrain.train))
    for name, tcfg in sections:
        check_choice(tcfg.dtype, DTYPES, f"{name}.dtype")
        check_choice(tcfg.optimizer, OPTIMIZERS, f"{name}.optimizer")
    models.variant_from_config(config.model)
    tasks.check_config(config.data)
    if config.pretrain.enabled:
        tasks.check_config(config.pretrain.data)
    problems = _range_problems(config)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(f"invalid config: {'; '.join(problems[:3])}{more}")
    if config.merge.method == "trm":
        _check_trm(config)
    return method


# ----------------------------------------------------------------------------- data


def _smallest_task(stream, split: str) -> tuple[int, int]:
    """(examples, task index) of the task with the fewest ``split`` examples."""
    counts = stream.counts(split)
    t = int(counts.argmin())
    return int(counts[t]), t


def _too_big(field: str, size: int, n: int, t: int, what: str) -> str:
    return (
        f"{field}={size} exceeds the {n} training examples of task {t + 1} ({what} draws "
        f"full batches); lower {field} to at most {n}"
    )


def check_data(config: ml_collections.ConfigDict, stream, method: Method) -> None:
    """Every batch size against the smallest task it is drawn from: fine-tuning, the onset
    probe and EWC's Fisher use ``train.batch_size``, TRM ``merge.batch_size``. Raises
    ``ConfigError`` (an epoch with no full batch would never end)."""
    n, t = _smallest_task(stream, "train")
    tcfg = config.train
    probe = tcfg.onset_steps > 0 and stream.num_tasks > 1
    if (method.finetunes or probe) and tcfg.batch_size > n:
        what = "fine-tuning" if method.finetunes else "the onset probe"
        raise ConfigError(_too_big("train.batch_size", tcfg.batch_size, n, t, what))
    if config.merge.method == "trm" and config.merge.batch_size > n:
        raise ConfigError(_too_big("merge.batch_size", config.merge.batch_size, n, t, "TRM"))


def task_steps(config: ml_collections.ConfigDict, stream) -> list[int]:
    """Optimisation steps of each task (``train.steps_per_task`` of its examples)."""
    return [train.steps_per_task(int(n), config.train) for n in stream.counts("train")]


def warnings(config: ml_collections.ConfigDict, stream, method: Method) -> list[str]:
    """One line per legal setting that makes the run (nearly) meaningless."""
    out = []
    if method.finetunes:
        steps = min(task_steps(config, stream))
        if steps < MIN_STEPS:
            out.append(
                f"only {steps} optimisation step(s) per task (train.steps / train.epochs); "
                f"with fewer than {MIN_STEPS} the accuracies are mostly noise"
            )
        if config.train.warmup_steps >= steps > 0:
            out.append(
                f"train.warmup_steps={config.train.warmup_steps} covers all {steps} steps of "
                "a task: the learning rate only ramps up and never decays"
            )
        if config.merge.method == "trm" and config.train.snapshots > steps:
            out.append(
                f"train.snapshots={config.train.snapshots} exceeds the {steps} steps of a task: "
                f"TRM gets only {steps} distinct snapshot(s)"
            )
    if config.merge.method == "trm" and config.merge.trm.steps == 0:
        out.append(
            "merge.trm.steps=0: TRM returns its starting point "
            f"(merge.trm.init={config.merge.trm.init!r}) without optimising it"
        )
    return out
