r"""Train-step throughput and hardware utilisation for the ViT backbones.

For each model: images/s of the jitted train step (``trm_jax.runner.train.make_train_step``:
AdamW, grad-clip, prototype cosine head over ``--classes`` classes, forward + backward
+ update), and the FLOP/s it achieves, next to the peak FLOP/s of one large matmul
measured in the same run on the same devices. ``utilisation = train FLOP/s / matmul
FLOP/s``.

FLOPs per step are counted two ways and both are printed:
- ``analytic``: 3 x the forward multiply-adds x 2 of a ViT (patch embedding, q/k/v/out
  projections, attention scores and values, MLP; the backward pass costs twice the
  forward). Norms, softmax, GELU and the optimizer update are left out (<2% for ViT-B).
  The utilisation column uses this count: it is the usual "model FLOPs" utilisation.
- ``xla``: ``compiled.cost_analysis()['flops']`` of the whole step, as XLA counts it
  (includes elementwise work; backends differ in what they count).

The batch is split over every device (``trm_jax.sharding``; ``--fsdp`` to shard
parameters too). Images are fed at the model resolution, so preprocessing is a rescale.

    python experiments/bench_train.py --models=vit_tiny,vit_s16,vit_b16 \
        --image_size=224 --batch_size=128 --steps=20 --dtype=bfloat16

``--results_name=NAME`` also writes the table to ``docs/results/NAME.md`` with the
command, commit, machine and date (``experiments/results.py``); the docs show
``bench_train``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from trm_jax import models, sharding
from trm_jax.models import heads
from trm_jax.runner import train

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["vit_tiny", "vit_s16", "vit_b16"], "Registry names to benchmark.")
flags.DEFINE_integer(
    "image_size",
    0,
    "Input resolution (pixels per side); 0 = each variant's own (tiny 28, ViT 224).",
)
flags.DEFINE_integer("batch_size", 64, "Global batch size per step.")
flags.DEFINE_integer("steps", 10, "Timed steps per model (after --warmup untimed ones).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the forward.")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (train.grad_accum).")
flags.DEFINE_integer("classes", 100, "Classes of the prototype head.")
flags.DEFINE_integer("matmul_size", 8192, "Side of the square matmul that measures the peak.")
flags.DEFINE_integer("fsdp", 1, "Size of the parameter-sharding mesh axis.")
flags.DEFINE_string("results_name", "", "Also write docs/results/<name>.md ('' = no).")


# ----------------------------------------------------------------------------- peak


def matmul_peak(n: int, dtype, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an ``[n,n] @ [n,n]`` matmul on the mesh's devices.

    The left operand is split over every device on its rows (no communication), so the
    figure is the aggregate peak of all devices, comparable with a data-parallel step.
    """
    mesh = sharding.make_mesh(sharding.default_config())
    a = jax.device_put(
        jax.random.normal(jax.random.key(0), (n, n), dtype), sharding.batch_sharding(mesh)
    )
    b = sharding.replicate(jax.random.normal(jax.random.key(1), (n, n), dtype), mesh)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- FLOPs


def vit_forward_flops(variant, batch: int) -> float:
    """Multiply-add FLOPs (x2) of one ViT forward pass over ``batch`` images."""
    d, m, depth, p, c = (
        variant.width,
        variant.mlp_dim,
        variant.depth,
        variant.patch_size,
        variant.channels,
    )
    n_patch = variant.grid**2
    tokens = n_patch + 1
    embed = 2 * n_patch * p * p * c * d
    per_block = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * tokens * d
    extra = 2 * d * variant.representation_size
    return batch * (embed + depth * per_block + extra)


def xla_flops(compiled) -> float:
    """``flops`` from XLA's cost analysis of a compiled executable (nan if missing)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per executable
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


# ----------------------------------------------------------------------------- step


def build(name: str, image_size: int, dtype: str):
    """A random-init backbone from the model registry at ``image_size``."""
    cfg = models.default_config()
    cfg.name = name
    cfg.image_size = image_size  # 0 keeps the variant's own
    cfg.dtype = dtype
    return models.build(cfg, key=jax.random.key(0))


def make_step(backbone, num_classes: int, grad_accum: int, dtype: str):
    """The runner's jitted train step with a frozen prototype head: (step, state, ctx)."""
    tcfg = train.default_config()
    tcfg.warmup_steps = 0
    optimizer = train.make_optimizer(tcfg)
    logits_fn = heads.make_logits_fn(backbone.features_fn, "prototype", 10.0)
    loss_fn = train.make_loss_fn(logits_fn, dtype=dtype)

    def preprocess(images, key=None, *, train=False):
        return images.astype(jnp.float32) / 127.5 - 1.0

    step = train.make_train_step(loss_fn, optimizer, preprocess, lr=tcfg.lr, grad_accum=grad_accum)
    rows = jax.random.normal(jax.random.key(1), (num_classes, backbone.feature_dim))
    ctx = {"rows": rows, "train_mask": jnp.ones((num_classes,), bool)}
    state = train.init_state({"backbone": backbone.params, "head": {}}, optimizer, 1000)
    return step, state, ctx


def time_train_step(backbone, *, batch_size, steps, warmup, classes, grad_accum, dtype, fsdp):
    """Seconds per step of the sharded, jitted train step (after compile and warm-up).

    Returns ``(seconds_per_step, compiled, compile_seconds)``.
    """
    step, state, ctx = make_step(backbone, classes, grad_accum, dtype)
    mcfg = sharding.default_config()
    mcfg.fsdp = fsdp
    mesh = sharding.make_mesh(mcfg)
    state = sharding.shard_params(state, mesh, mcfg)
    ctx = sharding.replicate(ctx, mesh)
    rng = np.random.default_rng(0)
    s, ch = backbone.image_size, backbone.channels
    host = {
        "image": rng.integers(0, 256, (batch_size, s, s, ch)).astype(np.uint8),
        "label": rng.integers(0, classes, batch_size).astype(np.int32),
    }
    batch = sharding.shard_batch(host, mesh)
    key = jax.random.key(0)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key, ctx).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch, key, ctx)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, key, ctx)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / steps, compiled, compile_s


def bench_model(name: str, peak: float) -> dict:
    backbone = build(name, FLAGS.image_size, FLAGS.dtype)
    step_s, compiled, compile_s = time_train_step(
        backbone,
        batch_size=FLAGS.batch_size,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        classes=FLAGS.classes,
        grad_accum=FLAGS.grad_accum,
        dtype=FLAGS.dtype,
        fsdp=FLAGS.fsdp,
    )
    analytic = 3 * vit_forward_flops(backbone.variant, FLAGS.batch_size)
    return {
        "model": name,
        "image": backbone.image_size,
        "params_M": sum(x.size for x in jax.tree.leaves(backbone.params)) / 1e6,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": FLAGS.batch_size / step_s,
        "analytic_tflop": analytic / 1e12,
        "xla_tflop": xla_flops(compiled) / 1e12,
        "achieved_tflops": analytic / step_s / 1e12,
        "utilisation": analytic / step_s / peak,
    }


def describe_devices() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()} x {device.device_kind} ({device.platform})"


def main(argv):
    del argv
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    peak = matmul_peak(FLAGS.matmul_size, dtype)
    setup = (
        f"devices: {describe_devices()}; "
        f"dtype {FLAGS.dtype}; image {FLAGS.image_size or 'native'} px; batch {FLAGS.batch_size}; "
        f"grad_accum {FLAGS.grad_accum}; fsdp {FLAGS.fsdp}"
    )
    peak_line = (
        f"matmul peak ({FLAGS.matmul_size}^2 x {FLAGS.matmul_size}): {peak / 1e12:.3f} TFLOP/s"
    )
    print(setup)
    print(peak_line)
    header = (
        "| model | image | params (M) | step (s) | images/s | TFLOP/step analytic | TFLOP/step xla "
        "| achieved TFLOP/s | utilisation |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    print("\n".join(lines))
    for name in FLAGS.models:
        r = bench_model(name, peak)
        lines.append(
            f"| {r['model']} | {r['image']} | {r['params_M']:.1f} | {r['step_s']:.3f} | "
            f"{r['images_per_s']:.1f} | {r['analytic_tflop']:.4f} | {r['xla_tflop']:.4f} | "
            f"{r['achieved_tflops']:.3f} | {r['utilisation']:.0%} |"
        )
        print(lines[-1], flush=True)
    if FLAGS.results_name:
        import results

        body = (
            f"Jitted train step (AdamW, grad-clip, prototype head over {FLAGS.classes} classes), "
            f"{FLAGS.steps} timed steps after {FLAGS.warmup} warm-up steps; {setup}; "
            f"{peak_line}; utilisation = achieved / matmul peak."
        )
        results.write(FLAGS.results_name, body + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    app.run(main)
