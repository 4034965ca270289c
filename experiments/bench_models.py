"""Forward throughput of a registered backbone (random weights), in images per second.

    python experiments/bench_models.py --name vit_b16 --batch 32 --steps 3

Times ``jax.jit(features_fn)`` on a fixed batch after one warm-up call (compilation),
blocking on the result of every step; prints one line with the device and the rate.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def throughput(
    name: str, *, batch: int = 32, steps: int = 3, image_size: int = 0, dtype: str = "float32"
) -> dict:
    """``{'images_per_s', 'step_s', 'compile_s', 'device', ...}`` for ``models.get(name)``."""
    from trm_jax import models

    overrides = {"dtype": dtype, **({"image_size": image_size} if image_size else {})}
    variant = models.get(name, **overrides)
    backbone = models.init(variant, key=jax.random.key(0))
    images = jax.random.normal(
        jax.random.key(1), (batch, variant.image_size, variant.image_size, variant.channels)
    )
    fn = jax.jit(backbone.features_fn)
    start = time.perf_counter()
    jax.block_until_ready(fn(backbone.params, images))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(backbone.params, images)
        jax.block_until_ready(out)
    step_s = (time.perf_counter() - start) / steps
    assert bool(jnp.all(jnp.isfinite(out)))
    return {
        "name": name,
        "batch": batch,
        "image_size": variant.image_size,
        "dtype": dtype,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 3),
        "images_per_s": round(batch / step_s, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="vit_b16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image_size", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    print(
        throughput(
            args.name,
            batch=args.batch,
            steps=args.steps,
            image_size=args.image_size,
            dtype=args.dtype,
        )
    )


if __name__ == "__main__":
    main()
