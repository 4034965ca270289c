"""Input-pipeline throughput: numpy batches + jitted on-device preprocessing, images/s.

    python experiments/bench_data.py                 # both cases below
    python experiments/bench_data.py --batches 50    # longer runs

Cases: Fashion-MNIST (IDX files, e.g. Debian's copy) preprocessed to 32 px, and
CIFAR-size random uint8 32x32x3 arrays preprocessed to 224 px (a ViT-B/16 input). For
each: the pipeline alone (batches gathered and prefetched by grain threads), and the
pipeline feeding the jitted train-mode preprocess (random resized crop + flip), timed
to ``block_until_ready``. Compilation happens before timing.

``--results_name=NAME`` also writes the table to ``docs/results/NAME.md`` with the
command, commit, machine and date (``experiments/results.py``); the docs show
``bench_data``:

    python experiments/bench_data.py --batches 30 --results_name=bench_data
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
    parser.add_argument(
        "--results_name", default="", help="also write docs/results/<name>.md ('' = no)"
    )
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} cpus={os.cpu_count()} "
        f"load={load_start:.1f}"
    )
    rows: list[tuple[str, str]] = []

    def report(label: str, images_per_s: float) -> None:
        print(f"{label:36s}{images_per_s:10.0f} img/s")
        rows.append((label, f"{images_per_s:,.0f} img/s"))

    try:
        start = time.perf_counter()
        stream = data.load_stream(data.default_config())
        load_s = time.perf_counter() - start
        print(f"fashion_mnist load_stream: {load_s:.2f} s")
        rows.append(("fashion_mnist load_stream (gzip IDX, val carve)", f"{load_s:.2f} s"))
        x, y = stream.split("train", range(stream.num_tasks))
        pre = pipeline.make_preprocess(32, 3, "clip")
        n = max(args.batches, len(y) // args.batch_size - 1)
        report("fashion_mnist batches only", _time_pipeline(x, y, args.batch_size, n))
        report("fashion_mnist + preprocess 32 px", _time_pipeline(x, y, args.batch_size, n, pre))
    except DataError as error:
        print(f"fashion_mnist skipped: {error}")
        rows.append(("fashion_mnist", f"skipped: {error}"))

    rng = np.random.default_rng(0)
    n_img = args.batch_size * (args.batches + 2)
    x = rng.integers(0, 256, (n_img, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n_img)
    pre = pipeline.make_preprocess(224, 3, "clip")
    report("cifar-size batches only", _time_pipeline(x, y, args.batch_size, args.batches))
    report(
        "cifar-size + preprocess 224 px", _time_pipeline(x, y, args.batch_size, args.batches, pre)
    )
    if args.results_name:
        import results

        table = "\n".join(["| case | result |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])
        results.write(
            args.results_name,
            f"Input pipeline, batch {args.batch_size}, {args.batches} timed batches per case "
            f"(Fashion-MNIST: at least one epoch), train-mode preprocess jitted, timed to "
            f"`block_until_ready`; JAX {jax.default_backend()}, load average "
            f"{load_start:.1f} at the start.\n\n{table}",
        )


if __name__ == "__main__":
    main()
