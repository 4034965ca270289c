"""The class-incremental task loop: fine-tune -> merge -> evaluate -> checkpoint -> report.

    from trm_jax import runner
    from configs import default
    metrics = runner.run(default.get_config(), "runs/demo")

For task t (docs/runner.md): the method (``runner.methods``) says where fine-tuning
starts and on what; fine-tune on D_t keeping K trajectory snapshots; the method merges;
evaluate the merged model on the test data of tasks 1..t (task-agnostic and task-aware);
record the onset gradient norm (mean ||grad L|| over the first S steps of task t, started
from theta_bar_{t-1}); checkpoint; and at the end write ``metrics.json``, ``report.md``
and the plots. The loop names no method.

Before any work ``run`` checks the whole config (``runner.validate``), makes sure the
workdir is a writable directory, locks it (a second run on it fails in one line naming
the pid that holds it), and checks ``config.json``; once the stream is loaded it checks
the batch sizes against the tasks and prints a one-line warning for each setting that is
legal but makes the run meaningless.

Resume: every task ends with a checkpoint of everything that persists between tasks
(the merged model, the chain start, the head, the method's state) plus the metrics so
far. All randomness derives from (seed, task, step), so re-running an interrupted task
from the last checkpoint replays it exactly. A workdir whose ``config.json`` differs
from the requested config is refused once it holds a checkpoint; before that (a run that
failed early, say on a NaN loss) the file is replaced, with a note. Each checkpoint also
carries the hash of the result-relevant config (``config_hash``), checked on resume, so
a run cannot resume another config's checkpoints even when ``config.json`` is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trm_jax import checkpointing, data, metrics, prepare, report
from trm_jax.data import pipeline
from trm_jax.data import tasks as data_tasks
from trm_jax.errors import DataError, TrainingError
from trm_jax.merging import task_vectors
from trm_jax.runner import setup, tensorboard, train
from trm_jax.runner import validate as validation
from trm_jax.runner.config import VOLATILE_FIELDS
from trm_jax.runner.methods import Carry, Finetuned, Method, Task
from trm_jax.runner.pretrain import cache_path, pretrain
from trm_jax.sharding import Placement
from trm_jax.tree_util import PyTree, tree_bytes

META_KEYS = (
    "acc",
    "aware",
    "onset_grad_norm",
    "finetune_seconds",
    "merge_seconds",
    "stored_bytes",
    "merge_info",
    "losses",
)
LOCK_FILE = ".lock"  # in the workdir, held for the whole run (its holder in .lock.owner)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_json(config: ml_collections.ConfigDict) -> str:
    """The config as the JSON text ``config.json`` holds (sorted keys)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_hash(config: ml_collections.ConfigDict) -> str:
    """16 hex digits of the sha256 of the result-relevant config (everything but the
    ``VOLATILE_FIELDS`` sections), stored with every checkpoint and checked on resume."""
    tree = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_FIELDS}
    blob = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_workdir(config: ml_collections.ConfigDict, workdir: str, *, write: bool = True) -> None:
    """The workdir before any work: a writable directory (its ``checkpoints/`` too, and
    the pre-training cache folder when the cache must be written), and ``config.json``
    written, or compared with the requested config: another config is refused while the
    workdir holds a checkpoint, and replaced (with a one-line note) when it holds none.
    ``write=False`` checks without writing (``run`` writes once the data checks pass)."""
    checkpointing.check_writable(workdir, "--workdir")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.lexists(ckpt_dir):
        checkpointing.check_writable(ckpt_dir, "checkpoint directory")
    if config.pretrain.enabled and not os.path.isdir(cache_path(config)):
        checkpointing.check_writable(os.path.dirname(cache_path(config)), "pretrain.cache_dir")
    resumable = bool(checkpointing.saved_steps(ckpt_dir))
    replaced = checkpointing.config_guard(
        workdir, config_json(config), ignore=VOLATILE_FIELDS, replace=not resumable, write=write
    )
    if replaced and write:
        more = f" (+{len(replaced) - 3} more)" if len(replaced) > 3 else ""
        _log(
            f"note: {workdir} held the config.json of a run that saved no checkpoint; "
            f"replaced it [{'; '.join(replaced[:3])}{more}]"
        )


def validate(config: ml_collections.ConfigDict) -> Method:
    """The run's method, after checking the whole config (``runner.validate.check``)."""
    return validation.check(config)


def apply_include_exclude(config, merged: PyTree, fallback: PyTree) -> PyTree:
    """Leaves outside ``merge.include`` or inside ``merge.exclude`` take ``fallback``."""
    inc, exc = config.merge.include, config.merge.exclude
    if not inc and not exc:
        return merged
    mask = task_vectors.name_mask(merged, inc or None, exc or None)
    return task_vectors.masked(merged, fallback, mask)


class Run(NamedTuple):
    """What every task of a run shares (built once by ``run``)."""

    config: ml_collections.ConfigDict
    method: Method
    stream: data.TaskStream
    model: setup.Model
    theta0: PyTree
    place: Placement
    eval_sets: list
    step: tuple  # (optimizer, loss_fn, jitted step)
    writer: tensorboard.Writer  # training curves (a no-op unless config.log.tensorboard)


def _persisted(job: Run, carry: Carry, rows, head) -> dict:
    tree = {"merged": carry.merged, "rows": rows, "head": head}
    if job.method.chained(job.config):
        tree["chain"] = carry.chain
    if carry.state is not None:
        tree["merge_state"] = carry.state
    return tree


def _restore_like(job: Run, tasks_done: int, rows, head) -> PyTree:
    theta0 = job.theta0
    state = job.method.state_like(job.config, theta0, tasks_done)
    tree = _persisted(job, Carry(theta0, theta0, state), rows, head)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def _onset_probe(job: Run, task: Task, carry: Carry, training, ctx, head) -> float:
    """Mean gradient norm over the first S steps of this task started from theta_bar_{t-1}
    (for methods whose own run starts elsewhere)."""
    opt, _, step_fn = job.step
    tcfg = job.config.train
    probe = train.finetune(
        step_fn,
        train.init_state({"backbone": carry.merged, "head": head}, opt, training.num_steps),
        job.place.batches(
            pipeline.endless_batches(
                task.images,
                task.labels,
                tcfg.batch_size,
                setup.seed_of(job.config.seed, task.t, 1),
                what=f"onset probe of task {task.t + 1}",
            )
        ),
        tcfg.onset_steps,
        onset_steps=tcfg.onset_steps,
        key=setup.key_of(job.config.seed, task.t, 2),
        ctx={**ctx, "train_mask": jnp.asarray(task.classes.task_mask)},
        task=task.t + 1,
        desc=f"onset probe {task.t + 1}",
        progress=False,
    )
    return probe.onset_grad_norm


def _finetune(job: Run, task: Task, training, ctx, head):
    """(Finetuned, onset gradient norm of the run, per-step losses, seconds)."""
    if not job.method.finetunes:
        return Finetuned(task.theta0, [task.theta0], head, ctx, training), None, [], 0.0
    opt, _, step_fn = job.step
    cfg, t = job.config, task.t
    batches = pipeline.endless_batches(
        training.images,
        training.labels,
        cfg.train.batch_size,
        setup.seed_of(cfg.seed, t, 1),
        what=f"task {t + 1}",
    )
    res = train.finetune(
        step_fn,
        train.init_state({"backbone": training.start, "head": head}, opt, training.num_steps),
        job.place.batches(batches),
        training.num_steps,
        key=setup.key_of(cfg.seed, t, 2),
        ctx=ctx,
        num_snapshots=training.num_snapshots,
        onset_steps=cfg.train.onset_steps,
        task=t + 1,
        desc=f"task {t + 1}/{task.num_tasks} {job.method.name}",
        progress=cfg.debug.progress,
        log=job.writer.train_logger(t + 1),
    )
    theta_t, head = res.state.params["backbone"], res.state.params["head"]
    finetuned = Finetuned(theta_t, res.snapshots, head, ctx, training, res.state.opt_state)
    return finetuned, res.onset_grad_norm, res.losses.tolist(), res.seconds


def _evaluate(job: Run, t: int, merged: PyTree, rows, head) -> tuple[np.ndarray, np.ndarray]:
    """Task-agnostic and task-aware accuracy of ``merged`` on tasks 0..t."""
    sets = job.eval_sets[: t + 1]
    logits = train.predict_all(
        job.method.predict(job.config, job.model),
        {"backbone": merged, "head": head},
        {"rows": rows, **job.method.eval_ctx(job.config, job.theta0)},
        np.concatenate([s[0] for s in sets]),
        job.config.eval.batch_size,
        place=job.place.images,
    )
    labels = np.concatenate([s[1] for s in sets])
    task_ids = np.concatenate([np.full(len(s[1]), j) for j, s in enumerate(sets)])
    return metrics.task_accuracies(logits, labels, task_ids, job.stream.task_classes)


def run_task(job: Run, t: int, carry: Carry, rows, head, meta: dict):
    """Task ``t`` from ``carry``: returns the new (carry, rows, head), the tree to
    checkpoint and the task's summary line; appends to ``meta``."""
    cfg, method, stream = job.config, job.method, job.stream
    t_wall = time.perf_counter()
    images, labels = stream.split("train", t)
    classes = setup.ClassSets.at(stream.task_classes, t, stream.num_classes)
    rows, head = setup.add_task_rows(
        cfg, job.model, job.theta0, rows, head, images, labels, classes.task
    )
    task = Task(
        t, stream.num_tasks, cfg, job.model, stream, job.theta0, rows, head, images, labels,
        classes, job.place, job.step[1],
    )  # fmt: skip
    training = method.training(task, carry)
    ctx = {"rows": rows, "train_mask": jnp.asarray(training.train_mask), **training.ctx}
    if cfg.model.head == "linear":
        mask = jnp.asarray(training.train_mask)
        ctx["update_mask"] = {
            "backbone": jax.tree.map(lambda _: jnp.asarray(True), training.start),
            "head": {"w": mask[:, None], "b": mask},
        }

    onset_from_run = t > 0 and method.finetunes and training.from_merged
    if t > 0 and not onset_from_run and cfg.train.onset_steps > 0:
        meta["onset_grad_norm"].append(_onset_probe(job, task, carry, training, ctx, head))
    finetuned, onset, losses, ft_sec = _finetune(job, task, training, ctx, head)
    if onset_from_run:
        meta["onset_grad_norm"].append(onset)
    head = finetuned.head

    t_merge = time.perf_counter()
    try:
        merged, state, info = method.merge(task, carry, finetuned)
    except TrainingError as e:  # the merge knows no task: name it
        raise type(e)(
            f"task {t + 1}/{stream.num_tasks} merge ({method.name}): {e} (checkpoints are intact)"
        ) from e
    if method.merges:
        merged = apply_include_exclude(cfg, merged, finetuned.theta_t)
    merged = jax.block_until_ready(merged)
    merge_sec = time.perf_counter() - t_merge
    try:
        task_vectors.check_finite(merged, f"merged model of task {t + 1}")
    except task_vectors.NonFiniteError as e:
        raise task_vectors.NonFiniteError(f"{e} (checkpoints are intact)") from None
    carry = Carry(merged, finetuned.theta_t, state)

    agn, aware = _evaluate(job, t, merged, rows, head)
    meta["acc"].append(agn.tolist())
    meta["aware"].append(aware.tolist())
    meta["finetune_seconds"].append(ft_sec)
    meta["merge_seconds"].append(merge_sec)
    meta["losses"].append(losses[-1] if losses else None)
    meta["merge_info"].append(_merge_summary(info))
    tree = _persisted(job, carry, rows, head)
    needs_theta0 = method.needs_theta0 or cfg.model.head == "prototype"
    meta["stored_bytes"].append(tree_bytes(tree) + (tree_bytes(job.theta0) if needs_theta0 else 0))

    sizes = np.asarray([len(s[1]) for s in job.eval_sets[: t + 1]])
    acc_seen = float((agn * sizes).sum() / sizes.sum())
    job.writer.trm_history(t + 1, info.get("history", {}))
    job.writer.stream(t + 1, {"acc_seen": acc_seen, "merge_seconds": merge_sec})
    line = (
        f"task {t + 1}/{stream.num_tasks} {method.name}: acc(seen) "
        f"{acc_seen:.4f} per-task {np.round(agn, 3).tolist()} "
        f"| fine-tune {ft_sec:.1f}s merge {merge_sec:.2f}s "
        f"| total {time.perf_counter() - t_wall:.1f}s"
    )
    return carry, rows, head, tree, line


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the stream of ``config`` in ``workdir`` (resuming if it holds a checkpoint);
    return the metrics dict written to ``metrics.json``.

    The whole config is checked first, then the workdir (writable, not locked by another
    run, ``config.json``), then the data; only then does any training start.
    """
    method = validate(config)
    checkpointing.check_writable(workdir, "--workdir")
    lock = checkpointing.DirLock(
        os.path.join(workdir, LOCK_FILE),
        what=f"workdir {workdir}",
        enabled=jax.process_count() == 1,
    )
    with lock:
        return _run(config, workdir, method)


def _run(config: ml_collections.ConfigDict, workdir: str, method: Method) -> dict:
    # Refuse early; write config.json only once the data fits and any checkpoint to
    # resume has restored under this config's hash (a workdir whose config.json was
    # deleted must not end up with another run's config beside its checkpoints).
    check_workdir(config, workdir, write=False)
    missing = prepare.summary(prepare.check(config, workdir=workdir))
    if missing:  # the same check as `python -m trm_jax.prepare`, without fetching
        raise DataError(missing)
    stream = data.load_stream(config.data)
    data_tasks.check_coverage(stream, config.data)
    validation.check_data(config, stream, method)
    model = setup.build_model(config)
    theta0 = pretrain(config, model) if config.pretrain.enabled else model.backbone.params
    place = Placement(config.mesh)
    theta0 = place.params(theta0)
    rows, head = place.replicate(setup.initial_head(config, model, stream, theta0))
    # Evaluation data of every task (kept in memory; the stream is small or sub-sampled).
    eval_sets = [stream.split(config.eval.split, t) for t in range(stream.num_tasks)]
    step = method.step(config, model)
    writer = tensorboard.open_writer(config, workdir)
    job = Run(config, method, stream, model, theta0, place, eval_sets, step, writer)

    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=2, fingerprint=config_hash(config)
    )
    try:
        meta = {k: [] for k in META_KEYS}
        carry, start = Carry(theta0, theta0, None), 0
        latest = ckpt.latest_step()
        if latest is not None:
            tree, meta = ckpt.restore(latest, _restore_like(job, latest, rows, head))
            state = tree.get("merge_state")
            carry = Carry(
                place.params(tree["merged"]),
                place.params(tree.get("chain", tree["merged"])),
                None if state is None else place.params(state),
            )
            rows, head = place.replicate((tree["rows"], tree["head"]))
            start = latest
            _log(f"resuming {workdir} after task {latest}/{stream.num_tasks}")
        check_workdir(config, workdir)
        if start < stream.num_tasks:
            for warning in validation.warnings(config, stream, method):
                _log(f"warning: {warning}")

        for t in range(start, stream.num_tasks):
            carry, rows, head, tree, line = run_task(job, t, carry, rows, head, meta)
            with _holding_ctrl_c():  # from the summary line on, the task is saved whole
                _log(line)
                ckpt.save(t + 1, tree, meta)
                ckpt.wait()
            stop = config.debug.stop_after_task
            if stop and t + 1 >= stop and t + 1 < stream.num_tasks:
                ckpt.close()
                return {"stopped_after_task": t + 1}
        ckpt.close()
    except BaseException:  # an error or Ctrl-C: let a save under way finish, then re-raise
        _close_quietly(ckpt)
        raise
    finally:
        writer.close()
    sizes = np.asarray([len(e[1]) for e in eval_sets])
    return finish(config, workdir, stream, meta, sizes)


@contextlib.contextmanager
def _holding_ctrl_c():
    """Hold a Ctrl-C (SIGINT) that arrives while a checkpoint is written and raise it
    once the checkpoint is on disk: orbax interrupted inside ``save`` leaves a half-run
    event loop behind, inside ``wait`` an error log, and the finished task unsaved. A
    second Ctrl-C is not held. (Main thread only: signals are delivered there.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum, frame):
        if held:  # the second one: give up on the save
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if held:
        raise KeyboardInterrupt


def _close_quietly(ckpt: checkpointing.Checkpointer) -> None:
    """Close ``ckpt`` (waiting for a pending save) while another exception propagates:
    a failure here must not replace it."""
    try:
        ckpt.close()
    except Exception:
        pass


def _merge_summary(info: dict) -> dict:
    """The scalar part of a merge's info dict (TRM: g_ref/g_init/g_final, first and
    last value of each loss term), small enough for metrics.json."""
    out = {}
    for k, v in info.items():
        if k == "history" and isinstance(v, dict):
            for term, values in v.items():
                a = np.asarray(values, np.float64).ravel()
                if a.size:
                    out[f"{term}_first"], out[f"{term}_last"] = float(a[0]), float(a[-1])
        elif isinstance(v, int | float | np.generic) or (
            isinstance(v, jax.Array | np.ndarray) and np.ndim(v) == 0
        ):
            out[k] = float(np.asarray(v))
    return out


def finish(config, workdir, stream, meta, task_sizes) -> dict:
    """Assemble ``metrics.json`` from the per-task records and write the report."""
    T = stream.num_tasks
    acc = np.full((T, T), np.nan)
    aware = np.full((T, T), np.nan)
    for t in range(T):
        acc[t, : t + 1] = meta["acc"][t]
        aware[t, : t + 1] = meta["aware"][t]
    out = {
        "method": config.merge.method,
        "chain": config.merge.chain,
        "seed": int(config.seed),
        "class_order": [int(c) for c in np.asarray(stream.class_order)],
        "task_sizes": task_sizes.tolist(),
        "acc_matrix": acc.tolist(),
        "task_aware_matrix": aware.tolist(),
    }
    out.update(metrics.summarize(acc, task_sizes, aware))
    out.update(
        onset_grad_norm=list(meta["onset_grad_norm"]),
        finetune_seconds=list(meta["finetune_seconds"]),
        merge_seconds=list(meta["merge_seconds"]),
        stored_bytes=list(meta["stored_bytes"]),
        merge_info=meta["merge_info"],
    )
    report.write(workdir, out)
    return out
