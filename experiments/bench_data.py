"""Input-pipeline throughput: numpy batches + jitted on-device preprocessing, images/s.

    python experiments/bench_data.py                 # both cases below
    python experiments/bench_data.py --batches 50    # longer runs

Cases: Fashion-MNIST (IDX files, e.g. Debian's copy) preprocessed to 32 px, and
CIFAR-size random uint8 32x32x3 arrays preprocessed to 224 px (a ViT-B/16 input). For
each: the pipeline alone (batches gathered and prefetched by grain threads), and the
pipeline feeding the jitted train-mode preprocess (random resized crop + flip), timed
to ``block_until_ready``. Compilation happens before timing.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from trm_jax import data
from trm_jax.data import pipeline
from trm_jax.errors import DataError


def _time_pipeline(images, labels, batch_size, n_batches, preprocess=None):
    """Images/s over ``n_batches`` batches, after one warm-up batch (compilation)."""
    key = jax.random.key(0)
    step = None
    if preprocess is not None:
        step = jax.jit(lambda x, k: preprocess(x, k, train=True))
    it = pipeline.batches(images, labels, batch_size, shuffle=True, seed=0, drop_remainder=True)
    first = next(it)
    if step is not None:
        jax.block_until_ready(step(first["image"], key))
    count, start = 0, time.perf_counter()
    for i, batch in enumerate(it):
        if i >= n_batches:
            break
        if step is not None:
            jax.block_until_ready(step(batch["image"], jax.random.fold_in(key, i)))
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f}"
    )

    def report(label: str, images_per_s: float) -> None:
        print(f"{label:36s}{images_per_s:10.0f} img/s")

    try:
        start = time.perf_counter()
        stream = data.load_stream(data.default_config())
        print(f"fashion_mnist load_stream: {time.perf_counter() - start:.2f} s")
        x, y = stream.split("train", range(stream.num_tasks))
        pre = pipeline.make_preprocess(32, 3, "clip")
        n = max(args.batches, len(y) // args.batch_size - 1)
        report("fashion_mnist batches only", _time_pipeline(x, y, args.batch_size, n))
        report("fashion_mnist + preprocess 32 px", _time_pipeline(x, y, args.batch_size, n, pre))
    except DataError as error:
        print(f"fashion_mnist skipped: {error}")

    rng = np.random.default_rng(0)
    n_img = args.batch_size * (args.batches + 2)
    x = rng.integers(0, 256, (n_img, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n_img)
    pre = pipeline.make_preprocess(224, 3, "clip")
    report("cifar-size batches only", _time_pipeline(x, y, args.batch_size, args.batches))
    report(
        "cifar-size + preprocess 224 px", _time_pipeline(x, y, args.batch_size, args.batches, pre)
    )


if __name__ == "__main__":
    main()
