r"""TRM merge cost: time relative to one fine-tuning epoch, and peak memory.

For each model, with random weights standing in for theta0, theta_prev and the K
snapshots of a task (the cost does not depend on the values):

- ``epoch_s``: seconds per jitted train step (``bench_train.time_train_step``, the same
  batch size) x ``ceil(--epoch_images / --batch_size)`` steps. The default epoch is one
  CIFAR-100 task of a 10-task split (50000 / 10 = 5000 images).
- ``merge_s``: wall time of ``trm.merge`` with ``--merge_steps`` coefficient steps,
  compiled already (a first, untimed call compiles). Every TRM field the flags below
  name (steps, ``batch_size``, ``probe.batch_size``, ``responsiveness_every``,
  ``max_batches``, ``eval_batches``) defaults to ``trm.default_config()``'s value
  (flag value -1); the data pipeline yields batches of ``--batch_size``, which TRM splits
  into chunks of its own ``batch_size``.
  With ``--timed_steps`` < ``--merge_steps`` (for slow CPUs) the merge is timed at 0 and
  at ``--timed_steps`` steps and extrapolated linearly:
  ``t(N) = t(0) + N * (t(S) - t(0)) / S`` (each step also draws a new batch and computes
  its targets, as in a real merge). The table says which.
- ``ratio = merge_s / epoch_s``, and the same against the task's whole fine-tuning
  (``--task_epochs`` epochs).
- peak memory of the merge: ``device.memory_stats()['peak_bytes_in_use']`` where the
  backend reports it (GPU, TPU; a process-lifetime peak, so the models run from small to
  large and the merge runs before the fine-tuning step is timed); on CPU, the peak
  resident set size of the process sampled every 5 ms during the timed merge (psutil),
  and that peak minus the RSS just before it. TRM holds up to ``max_batches`` distinct
  chunks (``max(steps, 1)`` when 0), so with ``max_batches = 0`` an extrapolated run
  holds fewer batches than the full merge would: add
  ``(merge_steps - timed_steps) x chunk bytes``. Extrapolation is exact only while every
  step draws a new chunk (``max_batches = 0``).

    python experiments/bench_trm.py --models=vit_tiny,vit_b16 --K=4 \
        --direction_dtype=bfloat16 --batch_size=128
    # the pre-change library default, for comparison:
    python experiments/bench_trm.py --models=vit_tiny --batch_size=128 --merge_steps=100 \
        --merge_batch_size=0 --probe_batch_size=32 --responsiveness_every=1 \
        --max_batches=0 --eval_batches=4 --merge_lr=0.01

With ``--config=configs/<name>.py`` (a runner config) it costs that config instead: its
model, its ``merge.trm`` settings, its data batch and snapshots, and one task of its
``train.steps`` steps (the "epoch" is then the whole task):

    python experiments/bench_trm.py --config configs/fashion_digits.py

It accepts every flag of ``bench_train.py`` (``--image_size``, ``--dtype``, ...), and
``--results_name=NAME`` writes the table to ``docs/results/NAME.md`` with the command,
commit, machine and date (``experiments/results.py``).
"""

from __future__ import annotations

import math
import threading
import time

import bench_train
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from trm_jax import models
from trm_jax.merging import trm
from trm_jax.models import heads

FLAGS = flags.FLAGS
flags.DEFINE_integer("K", 4, "Trajectory snapshots per task.")
flags.DEFINE_integer("merge_steps", -1, "TRM steps of the merge being costed (-1 = default).")
flags.DEFINE_integer("timed_steps", 0, "> 0: time this many steps and extrapolate.")
flags.DEFINE_enum("direction_dtype", "float32", ["float32", "bfloat16"], "Storage of D.")
flags.DEFINE_integer("epoch_images", 5000, "Images in one fine-tuning epoch of the task.")
flags.DEFINE_integer("task_epochs", 10, "Fine-tuning epochs per task (MagMax: 10 on CIFAR-100).")
flags.DEFINE_integer("old_classes", 50, "Classes of earlier tasks (consistency term).")
flags.DEFINE_integer("task_classes", 10, "Classes of the current task.")
# -1 = trm.default_config()'s value for each of these.
flags.DEFINE_float("merge_lr", -1, "trm learning_rate (no effect on cost).")
flags.DEFINE_integer("merge_batch_size", -1, "trm batch_size (0 = the --batch_size batches).")
flags.DEFINE_integer("probe_batch_size", -1, "trm probe.batch_size (0 = the whole batch).")
flags.DEFINE_integer("responsiveness_every", -1, "trm responsiveness_every.")
flags.DEFINE_integer("max_batches", -1, "trm max_batches (0 = up to merge steps).")
flags.DEFINE_integer("eval_batches", -1, "trm eval_batches (0 = every held batch).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A runner config: cost its own model, TRM settings and task size."
)
flags.FLAGS.set_default("models", ["vit_tiny", "vit_b16"])
flags.FLAGS.set_default("steps", 5)


class PeakMemory:
    """Peak memory while the block runs: device stats when available, else sampled RSS."""

    def __init__(self):
        stats = jax.devices()[0].memory_stats()
        self.source = "device peak_bytes_in_use" if stats else "host RSS (psutil, 5 ms)"
        self.peak = self.before = 0

    def __enter__(self):
        stats = jax.devices()[0].memory_stats()
        if stats:
            self.before = stats.get("bytes_in_use", 0)
            return self
        import psutil

        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        stats = jax.devices()[0].memory_stats()
        if stats:
            self.peak = stats.get("peak_bytes_in_use", 0)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)


def merge_inputs(backbone, k: int):
    """theta0, theta_prev, K snapshots (random, plausible magnitudes) and an apply_fn."""
    base = backbone.params
    rng = np.random.default_rng(0)
    noise = lambda scale: jax.tree.map(
        lambda p: jnp.asarray(scale * rng.standard_normal(p.shape, np.float32)), base
    )
    previous = jax.tree.map(jnp.add, base, noise(1e-3))
    step = noise(1e-3)
    snapshots = [
        jax.tree.map(lambda p, d, s=s: p + (s / k) * d, previous, step) for s in range(1, k + 1)
    ]
    num_classes = FLAGS.old_classes + FLAGS.task_classes
    rows = jax.random.normal(jax.random.key(1), (num_classes, backbone.feature_dim))
    features_fn = backbone.features_fn

    def apply_fn(params, images):
        return heads.cosine_logits(features_fn(params, images), rows, 100.0)

    return base, previous, snapshots, apply_fn


def batches(backbone, batch_size: int):
    """Endless distinct batches of the current task (preprocessed float32 images)."""
    rng = np.random.default_rng(1)
    s, c = backbone.image_size, backbone.channels
    while True:
        yield {
            "image": rng.uniform(-1, 1, (batch_size, s, s, c)).astype(np.float32),
            "label": rng.integers(
                FLAGS.old_classes, FLAGS.old_classes + FLAGS.task_classes, batch_size
            ).astype(np.int32),
        }


def merge_config(steps: int | None = None):
    """``trm.default_config()`` (or, with ``--config``, that config's ``merge.trm``) with
    the flags that are not -1 applied."""
    if _CONFIG.value is None:
        config = trm.default_config()
    else:
        config = _CONFIG.value.merge.trm.copy_and_resolve_references()
    config.direction_dtype = FLAGS.direction_dtype
    fields = {
        "steps": FLAGS.merge_steps,
        "learning_rate": FLAGS.merge_lr,
        "batch_size": FLAGS.merge_batch_size,
        "responsiveness_every": FLAGS.responsiveness_every,
        "max_batches": FLAGS.max_batches,
        "eval_batches": FLAGS.eval_batches,
    }
    for name, value in fields.items():
        if value != -1:
            config[name] = type(config[name])(value)
    if FLAGS.probe_batch_size != -1:
        config.probe.batch_size = FLAGS.probe_batch_size
    if steps is not None:
        config.steps = steps
    return config


def timed_merge(inputs, backbone, steps: int) -> tuple[float, dict]:
    base, previous, snapshots, apply_fn = inputs
    config = merge_config(steps)
    t0 = time.perf_counter()
    params, info = trm.merge(
        apply_fn,
        base,
        previous,
        snapshots,
        batches(backbone, FLAGS.batch_size),
        task_classes=np.arange(FLAGS.old_classes, FLAGS.old_classes + FLAGS.task_classes),
        old_classes=np.arange(FLAGS.old_classes),
        config=config,
    )
    jax.block_until_ready(params)
    return time.perf_counter() - t0, info


def apply_config() -> str:
    """With ``--config``: the flags that describe the task from that runner config (data
    batch, snapshots, classes of the last task and before it, one task = its
    ``train.steps`` steps or ``train.epochs`` epochs of its images) and the model to cost
    (its ``model`` section); returns the model's name. Without: ''."""
    config = _CONFIG.value
    if config is None:
        return ""
    from trm_jax.data import tasks

    bench = tasks.get_benchmark(config.data.name)
    per_task = bench.num_classes // config.data.num_tasks
    FLAGS.batch_size, FLAGS.K = config.train.batch_size, config.train.snapshots
    FLAGS.task_classes, FLAGS.old_classes = per_task, bench.num_classes - per_task
    if config.train.steps > 0:
        FLAGS.epoch_images, FLAGS.task_epochs = config.train.steps * FLAGS.batch_size, 1
    else:
        FLAGS.task_epochs = config.train.epochs
    FLAGS.models = [config.model.name]
    return config.model.name


def build_backbone(name: str):
    """The model to cost: ``--config``'s ``model`` section, else the registry variant."""
    if _CONFIG.value is None:
        return bench_train.build(name, FLAGS.image_size, FLAGS.dtype)
    cfg = _CONFIG.value.model.copy_and_resolve_references()
    cfg.dtype = FLAGS.dtype
    return models.build(cfg, key=jax.random.key(0))


def bench_model(name: str) -> dict:
    backbone = build_backbone(name)
    inputs = merge_inputs(backbone, FLAGS.K)
    total = merge_config().steps
    timed = FLAGS.timed_steps if 0 < FLAGS.timed_steps < total else total
    compile_s, _ = timed_merge(inputs, backbone, 1)  # compiles every jitted piece
    with PeakMemory() as mem:
        merge_s, _ = timed_merge(inputs, backbone, timed)
    how = "measured"
    if timed < total:
        fixed_s, _ = timed_merge(inputs, backbone, 0)
        merge_s = fixed_s + total * (merge_s - fixed_s) / timed
        how = f"extrapolated from {timed}"
    del inputs
    step_s, _, _ = bench_train.time_train_step(
        backbone,
        batch_size=FLAGS.batch_size,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        classes=FLAGS.old_classes + FLAGS.task_classes,
        grad_accum=FLAGS.grad_accum,
        dtype=FLAGS.dtype,
        fsdp=FLAGS.fsdp,
    )
    epoch_s = step_s * math.ceil(FLAGS.epoch_images / FLAGS.batch_size)
    return {
        "model": name,
        "image": backbone.image_size,
        "merge_s": merge_s,
        "how": how,
        "first_call_s": compile_s,
        "step_s": step_s,
        "epoch_s": epoch_s,
        "ratio": merge_s / epoch_s,
        "task_ratio": merge_s / (epoch_s * FLAGS.task_epochs),
        "mem_source": mem.source,
        "peak_gb": mem.peak / 2**30,
        "delta_gb": (mem.peak - mem.before) / 2**30,
    }


def main(argv):
    del argv
    apply_config()
    c = merge_config()
    setup = (
        f"devices: {bench_train.describe_devices()}; K={FLAGS.K}; directions "
        f"{FLAGS.direction_dtype}; compute {FLAGS.dtype}; data batch {FLAGS.batch_size}; "
        f"epoch {FLAGS.epoch_images} images; trm steps {c.steps}, lr {c.learning_rate}, "
        f"batch_size {c.batch_size or 'as given'}, probe {c.probe.batch_size or 'all'}, "
        f"responsiveness_every {c.responsiveness_every}, max_batches "
        f"{c.max_batches or 'steps'}, eval_batches {c.eval_batches or 'all'}"
    )
    print(setup)
    header = (
        "| model | image | TRM merge (s) | how | first call incl. compile (s) | train step (s) "
        f"| epoch (s) | merge / epoch | merge / {FLAGS.task_epochs} epochs "
        "| merge peak memory (GiB) | over pre-merge (GiB) "
        "| memory source |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    print("\n".join(lines))
    for name in FLAGS.models:
        r = bench_model(name)
        lines.append(
            f"| {r['model']} | {r['image']} | {r['merge_s']:.3g} | {r['how']} | "
            f"{r['first_call_s']:.1f} | {r['step_s']:.3f} | {r['epoch_s']:.1f} | "
            f"{r['ratio']:.1%} | {r['task_ratio']:.1%} | {r['peak_gb']:.2f} | "
            f"{r['delta_gb']:.2f} | {r['mem_source']} |"
        )
        print(lines[-1], flush=True)
    if FLAGS.results_name:
        import results

        path = config_flags.get_config_filename(flags.FLAGS["config"])
        source = f"the TRM settings, model and task size of `{path}`"
        what = source if _CONFIG.value else "the library's TRM defaults"
        body = f"One TRM merge (random weights) against one fine-tuning epoch, {what}; {setup}."
        results.write(FLAGS.results_name, body + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    app.run(main)
