"""Merge-rule throughput on ViT-B/16-sized task vectors, against NumPy and a copy roofline.

    python experiments/bench_merge.py                      # T=10, ViT-B/16 (85.8M params)
    python experiments/bench_merge.py --scale 0.05 --T 4   # a quick, smaller run

For T random task vectors with the real ViT-B/16 leaf shapes (the published
vision_transformer layout, backbone without the class head: 85,798,656 float32
parameters, 343 MB per tree) it times, on the current JAX backend:

* every rule in ``trm_jax.merging.MERGERS`` through its public function (validation and
  the non-finite check included), after a first call that compiles it;
* a NumPy implementation of the same rule (in-place, leaf by leaf, single-threaded);
* a plain device copy of the T+1 input trees (``jax.device_put(..., may_alias=False)``):
  the memory-bandwidth roofline.

A merge must read T task vectors plus the base and write one tree: (T+2) x 343 MB.
``GB/s`` is those bytes over the merge time; ``x copy`` is the merge time over the time
the copy bandwidth needs to move the same bytes (1.0 = as fast as a copy; below 1 is
possible because a merge mostly reads, and reads are cheaper than the copy's writes).
Times are the best of ``--reps`` calls (the machine may be shared); the hparams are
``merging.default_config()``'s (TIES k=0.2, DARE p=0.9, seed 0).
"""

from __future__ import annotations

import argparse
import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import merging


def vit_b16_shapes(
    depth: int = 12,
    width: int = 768,
    mlp: int = 3072,
    heads: int = 12,
    patch: int = 16,
    tokens: int = 197,
) -> dict:
    """Leaf shapes of the ViT-B/16 backbone (vision_transformer naming, no class head)."""
    head_dim = width // heads
    norm = {"scale": (width,), "bias": (width,)}
    block = {
        "LayerNorm_0": dict(norm),
        "MultiHeadDotProductAttention_1": {
            **{
                n: {"kernel": (width, heads, head_dim), "bias": (heads, head_dim)}
                for n in ("query", "key", "value")
            },
            "out": {"kernel": (heads, head_dim, width), "bias": (width,)},
        },
        "LayerNorm_2": dict(norm),
        "MlpBlock_3": {
            "Dense_0": {"kernel": (width, mlp), "bias": (mlp,)},
            "Dense_1": {"kernel": (mlp, width), "bias": (width,)},
        },
    }
    transformer = {f"encoderblock_{i}": block for i in range(depth)}
    transformer["encoder_norm"] = dict(norm)
    transformer["posembed_input"] = {"pos_embedding": (1, tokens, width)}
    return {
        "embedding": {"kernel": (patch, patch, 3, width), "bias": (width,)},
        "cls": (1, 1, width),
        "Transformer": transformer,
    }


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def scaled(shapes: dict, scale: float) -> dict:
    """Shrink each leaf's largest axis by ``scale`` (total size scales about linearly)."""

    def shrink(shape):
        axis = int(np.argmax(shape))
        return tuple(max(1, round(d * scale)) if i == axis else d for i, d in enumerate(shape))

    return jax.tree.map(shrink, shapes, is_leaf=_is_shape) if scale != 1.0 else shapes


@functools.partial(jax.jit, static_argnums=0)
def _random_tree(treedef_and_shapes, key, std):
    treedef, shapes = treedef_and_shapes
    keys = jax.random.split(key, len(shapes))
    return jax.tree.unflatten(
        treedef,
        [std * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)],
    )


# --------------------------------------------------------------------- NumPy versions


def np_average(base, tvs):
    return np_task_arithmetic(base, tvs, lam=1.0 / len(tvs))


def np_task_arithmetic(base, tvs, *, lam):
    out = []
    for j, b in enumerate(base):
        acc = tvs[0][j].copy()
        for t in tvs[1:]:
            np.add(acc, t[j], out=acc)
        np.multiply(acc, np.float32(lam), out=acc)
        out.append(np.add(acc, b, out=acc))
    return out


def np_magmax(base, tvs, *, lam):
    out = []
    for j, b in enumerate(base):
        best = tvs[0][j].copy()
        best_abs = np.abs(best)
        for t in tvs[1:]:
            a = np.abs(t[j])
            take = a >= best_abs  # an exact tie goes to the later task, as in MagMax
            np.copyto(best, t[j], where=take)
            np.copyto(best_abs, a, where=take)
        np.multiply(best, np.float32(lam), out=best)
        out.append(np.add(best, b, out=best))
    return out


def np_ties(base, tvs, *, k, lam):
    """MagMax's TIES: keep |x| >= the (d - int(d k))-th smallest |x| of each whole task
    vector (introselect), elect by mass with the majority sign for zeros, disjoint mean."""
    thresholds = []
    for t in tvs:
        flat = np.abs(np.concatenate([x.ravel() for x in t]))
        kth = flat.size - int(flat.size * k)
        thresholds.append(np.partition(flat, kth - 1)[kth - 1])
        del flat

    def trimmed(j):
        return [
            np.where(np.abs(t[j]) >= thr, t[j], np.float32(0))
            for t, thr in zip(tvs, thresholds, strict=True)
        ]

    votes = sum(int(np.sign(np.sum(trimmed(j), axis=0)).sum()) for j in range(len(base)))
    majority = np.float32(np.sign(votes))
    out = []
    for j, b in enumerate(base):
        kept = trimmed(j)
        elected = np.sign(np.sum(kept, axis=0))
        positive = np.where(elected == 0, majority, elected) > 0
        total = np.zeros_like(b)
        count = np.zeros_like(b)
        for x in kept:
            chosen = np.where(positive, x > 0, x < 0)
            total += np.where(chosen, x, np.float32(0))
            count += chosen
        out.append(b + np.float32(lam) * total / np.maximum(count, 1))
    return out


def np_dare(base, tvs, *, p, lam, key):
    rng = np.random.default_rng(0)
    out = []
    for j, b in enumerate(base):
        acc = np.zeros_like(b)
        for t in tvs:
            acc += np.where(rng.random(b.shape, dtype=np.float32) >= p, t[j], np.float32(0))
        out.append(b + np.float32(lam / (1 - p)) * acc)
    return out


def np_randmix(base, tvs, *, lam, key):
    rng = np.random.default_rng(0)
    out = []
    for j, b in enumerate(base):
        pick = rng.integers(0, len(tvs), b.shape, dtype=np.int8)
        out.append(b + np.float32(lam) * np.choose(pick, [t[j] for t in tvs]))
    return out


NUMPY = {
    "average": np_average,
    "task_arithmetic": np_task_arithmetic,
    "ties": np_ties,
    "dare": np_dare,
    "magmax": np_magmax,
    "randmix": np_randmix,
}


# -------------------------------------------------------------------------- timing


def _time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=10, help="number of task vectors")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ViT-B/16 size")
    parser.add_argument("--reps", type=int, default=3, help="timed JAX calls per rule")
    parser.add_argument("--numpy_reps", type=int, default=1, help="timed NumPy calls per rule")
    parser.add_argument("--rules", default=",".join(merging.MERGERS), help="comma-separated")
    parser.add_argument("--no_numpy", action="store_true", help="skip the NumPy timings")
    parser.add_argument("--results_name", default="", help="also write docs/results/NAME.md")
    args = parser.parse_args()

    shapes = scaled(vit_b16_shapes(), args.scale)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    size = sum(int(np.prod(s)) for s in leaves)
    tree_bytes = 4 * size
    key = jax.random.key(0)
    make = functools.partial(_random_tree, (treedef, tuple(leaves)))
    base = make(jax.random.fold_in(key, 0), 0.02)
    tvs = [make(jax.random.fold_in(key, i + 1), 1e-3) for i in range(args.T)]
    jax.block_until_ready(tvs)
    device = jax.devices()[0]
    print(
        f"backend {jax.default_backend()} ({device.device_kind}), {len(leaves)} leaves, "
        f"{size:,} params/tree ({tree_bytes / 1e6:.0f} MB), T={args.T}"
    )

    # Roofline: a plain device copy of the T+1 input trees, one tree at a time.
    def copy_all():
        for tree in [base, *tvs]:
            jax.block_until_ready(jax.device_put(tree, device, may_alias=False))

    copy_all()
    copy_s = min(_time(copy_all, args.reps))
    copy_gbs = 2 * (args.T + 1) * tree_bytes / copy_s / 1e9
    merge_bytes = (args.T + 2) * tree_bytes
    roofline_s = merge_bytes / (copy_gbs * 1e9)
    print(
        f"copy roofline: {copy_gbs:.1f} GB/s (read+write); a merge moves "
        f"{merge_bytes / 1e9:.2f} GB -> {roofline_s * 1e3:.0f} ms at copy speed\n"
    )

    cfg = merging.default_config()
    np_base = [np.asarray(x) for x in jax.tree.leaves(base)]  # zero-copy views on CPU
    np_tvs = [[np.asarray(x) for x in jax.tree.leaves(t)] for t in tvs]

    header = (
        "| rule | JAX ms | GB/s | x copy | NumPy ms | speed-up |\n|---|---:|---:|---:|---:|---:|"
    )
    rows = []
    for name in args.rules.split(","):
        hp = merging.hparams_for(name, cfg)
        call = functools.partial(merging.get(name), base, tvs, **hp)
        start = time.perf_counter()
        jax.block_until_ready(call())  # compile (once per leaf shape) + first run
        first_s = time.perf_counter() - start
        jax_s = min(_time(call, args.reps))
        np_s = float("nan")
        if not args.no_numpy:
            np_call = functools.partial(NUMPY[name], np_base, np_tvs, **hp)
            np_s = min(_time(np_call, args.numpy_reps))
        row = (
            f"| {name} | {jax_s * 1e3:.0f} | {merge_bytes / jax_s / 1e9:.1f} | "
            f"{jax_s / roofline_s:.2f} | {np_s * 1e3:.0f} | {np_s / jax_s:.1f}x |"
        )
        rows.append(row)
        print(f"{name}: first call (compile + run) {first_s:.1f} s; {row}", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        f"\ncopy roofline {copy_gbs:.1f} GB/s = {roofline_s * 1e3:.0f} ms per merge; "
        f"peak RSS {peak_gb:.1f} GB; times are the best of {args.reps} (NumPy: "
        f"{args.numpy_reps}) calls\n"
    )
    table = header + "\n" + "\n".join(rows)
    print(table)
    if args.results_name:
        import results

        notes = (
            f"{len(leaves)} leaves, {size:,} float32 params per tree, T={args.T}; copy "
            f"roofline {copy_gbs:.1f} GB/s = {roofline_s * 1e3:.0f} ms per merge; best of "
            f"{args.reps} calls (NumPy: {args.numpy_reps}); peak RSS {peak_gb:.1f} GB."
        )
        results.write(args.results_name, notes + "\n\n" + table)


if __name__ == "__main__":
    main()
