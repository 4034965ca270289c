"""Every merge rule against an independent NumPy reference, the rules' invariants, the
running forms, the registry and every error path."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from trm_jax import merging
from trm_jax.errors import ConfigError
from trm_jax.merging import rules, running

RTOL = ATOL = 2e-6  # float32 sums of <= 5 terms of O(1) values
# Five leaves but three distinct shapes: leaf rules compile once per shape, keeping tests fast.
SHAPES = {
    "blocks": [{"kernel": (6, 5), "bias": (5,)}, {"kernel": (6, 5)}],
    "head": {"w": (5,)},
    "temp": (),
}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _random_tree(rng, shapes=SHAPES, scale=1.0, quantize=False):
    def leaf(shape):
        x = scale * rng.normal(size=shape)
        if quantize:  # many equal magnitudes: exercises ties at the TIES threshold
            x = np.round(x * 4) / 4
        return jnp.asarray(x, jnp.float32)

    return jax.tree.map(leaf, shapes, is_leaf=_is_shape)


def _setup(seed=0, num_tasks=3, **kw):  # one T everywhere: jit caches are reused
    rng = np.random.default_rng(seed)
    base = _random_tree(rng)
    return base, [_random_tree(rng, **kw) for _ in range(num_tasks)]


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _unflatten(like, leaves):
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _assert_close(got, want, rtol=RTOL, atol=ATOL):
    for name, g, w in zip(
        merging.leaf_names(got), _leaves(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


# ------------------------------------------------------------ NumPy references (float64)


def np_stack(tvs, j):
    return np.stack([_leaves(t)[j] for t in tvs])


def np_average(base, tvs):
    return [b + np_stack(tvs, j).mean(0) for j, b in enumerate(_leaves(base))]


def np_task_arithmetic(base, tvs, lam):
    return [b + lam * np_stack(tvs, j).sum(0) for j, b in enumerate(_leaves(base))]


def np_magmax(base, tvs, lam):
    out = []
    for j, b in enumerate(_leaves(base)):
        s = np_stack(tvs, j)
        # Last maximum: an exact tie goes to the later task (MagMax's >=).
        pick = len(tvs) - 1 - np.argmax(np.abs(s[::-1]), axis=0)
        out.append(b + lam * np.take_along_axis(s, pick[None], 0)[0])
    return out


def np_ties(base, tvs, k, lam):
    """MagMax's TIES in float64 (tests/merging/test_rules_reference.py has the bit-exact,
    tie-heavy version): keep |x| >= the (d - int(d k))-th smallest |x| of the flattened
    task vector, elect by mass with the majority sign for zeros, disjoint mean."""
    sizes = [x.size for x in _leaves(base)]
    flat = np.stack([np.concatenate([x.ravel() for x in _leaves(t)]) for t in tvs])
    d = flat.shape[1]
    kth = np.sort(np.abs(flat), axis=1)[:, d - int(d * k) - 1]
    kept = np.where(np.abs(flat) >= kth[:, None], flat, 0.0)
    sign = np.sign(kept.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    chosen = np.where(sign > 0, kept > 0, kept < 0)
    mean = np.where(chosen, kept, 0.0).sum(0) / np.maximum(chosen.sum(0), 1)
    pieces = np.split(mean, np.cumsum(sizes)[:-1])
    return [b + lam * m.reshape(b.shape) for b, m in zip(_leaves(base), pieces, strict=True)]


def np_triple32(x):
    x = x.astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(17)
    x = (x * np.uint64(0xED5AD4BB)) & m
    x ^= x >> np.uint64(11)
    x = (x * np.uint64(0xAC4C1B51)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x31848BAB)) & m
    return x ^ (x >> np.uint64(14))


def np_bits(seed, shape):
    index = np.arange(int(np.prod(shape)), dtype=np.uint64)
    return np_triple32(np_triple32(index) ^ np.uint64(seed)).reshape(shape)


def np_dare(base, tvs, p, lam, key):
    leaves_b = _leaves(base)
    cut = round(p * 2**24)
    out = [b.copy() for b in leaves_b]
    for i, t in enumerate(tvs):
        seeds = np.asarray(
            jax.random.bits(jax.random.fold_in(key, i), (len(leaves_b),), jnp.uint32)
        )
        for j, x in enumerate(_leaves(t)):
            keep = (np_bits(seeds[j], x.shape) >> np.uint64(8)) >= cut
            out[j] += lam * np.where(keep, x, 0.0) * (2**24 / (2**24 - cut))
    return out


def np_randmix(base, tvs, lam, key):
    leaves_b = _leaves(base)
    seeds = np.asarray(jax.random.bits(key, (len(leaves_b),), jnp.uint32))
    out = []
    for j, b in enumerate(leaves_b):
        pick = (np_bits(seeds[j], b.shape) * np.uint64(len(tvs))) >> np.uint64(32)  # 64-bit mulhi
        out.append(
            b + lam * np.take_along_axis(np_stack(tvs, j), pick[None].astype(np.int64), 0)[0]
        )
    return out


KEY = jax.random.key(7)
CASES = {  # rule -> (hparams, reference)
    "average": ({}, np_average),
    "task_arithmetic": ({"lam": 0.7}, functools.partial(np_task_arithmetic, lam=0.7)),
    "ties": ({"k": 0.3, "lam": 0.55}, functools.partial(np_ties, k=0.3, lam=0.55)),
    "dare": (
        {"p": 0.4, "lam": 0.8, "key": KEY},
        functools.partial(np_dare, p=0.4, lam=0.8, key=KEY),
    ),
    "magmax": ({"lam": 0.5}, functools.partial(np_magmax, lam=0.5)),
    "randmix": ({"lam": 1.0, "key": KEY}, functools.partial(np_randmix, lam=1.0, key=KEY)),
}


# ----------------------------------------------------------------- rules vs references


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_matches_numpy(rule):
    hparams, reference = CASES[rule]
    base, tvs = _setup(seed=1)
    _assert_close(merging.get(rule)(base, tvs, **hparams), reference(base, tvs))


@pytest.mark.parametrize("k", [0.0, 0.05, 0.3, 0.5, 0.99])
def test_ties_threshold_exact_with_tied_magnitudes(k):
    base, tvs = _setup(seed=2, quantize=True)  # magnitudes in multiples of 0.25: many ties
    got = merging.ties(base, tvs, k=k, lam=1.0)
    _assert_close(got, np_ties(base, tvs, k, 1.0))


def test_ties_thresholds_are_exact():
    rng = np.random.default_rng(3)
    leaves = [  # zeros, subnormals, duplicates, many exponents
        jnp.asarray(rng.normal(size=300) * 10.0 ** rng.integers(-30, 30, 300), jnp.float32),
        jnp.asarray([0.0, -0.0, 1e-45, -1e-45, 3.0, -3.0, 3.0], jnp.float32),
        jnp.asarray(np.round(rng.normal(size=(20, 10)), 1), jnp.float32),
    ]
    flat = np.sort(np.abs(np.concatenate([np.asarray(x).ravel() for x in leaves])))[::-1]
    tvs = [{"a": leaves[0], "b": leaves[1], "c": leaves[2]}]
    for rank in [1, 2, 5, 100, 250, 306, 506, flat.size]:
        bits = np.asarray(rules.ties_thresholds(tvs, np.array([rank])), np.int32)
        np.testing.assert_array_equal(bits.view(np.float32), [flat[rank - 1]], err_msg=str(rank))
    assert int(rules.ties_thresholds(tvs, np.array([0]))[0]) == 0x7FFFFFFF  # keep nothing


# Leaves covering every layout of the candidate pass: a size divisible by 128 with more
# than 512 columns (two-level overflow compaction), a large size not divisible by 128
# (flattened, with a ragged tail), and small leaves, which skip the pass (the select
# reads them directly), a scalar among them.
SAMPLED_SHAPES = {"w": (128, 1030), "odd": (1001, 67), "v": (3, 128, 5), "b": (77,), "s": ()}
SAMPLED_SIZE = 128 * 1030 + 1001 * 67 + 3 * 128 * 5 + 77 + 1


def _sampled_setup(seed, num_tasks=3, dtype=jnp.float32, values=None):
    rng = np.random.default_rng(seed)

    def leaf(shape):
        x = rng.normal(size=shape) if values is None else rng.choice(values, size=shape)
        return jnp.asarray(x, dtype)

    return [jax.tree.map(leaf, SAMPLED_SHAPES, is_leaf=_is_shape) for _ in range(num_tasks)]


def _two_pass(tvs, rank):
    return np.asarray(rules.ties_thresholds(tvs, np.full((len(tvs),), rank, np.int32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [0.0, 0.01, 0.2, 0.5, 0.9, 1 - 0.5 / SAMPLED_SIZE])
def test_sampled_thresholds_equal_the_two_pass_select(k, dtype):
    tvs = _sampled_setup(40, dtype=dtype)
    rank = rules.ties_rank(SAMPLED_SIZE, k)
    want = _two_pass(tvs, rank)
    np.testing.assert_array_equal(rules.ties_thresholds_sampled(tvs, rank), want)
    # Sampling every 3rd entry, a tree this small gets a bracket narrow enough for the
    # fast path, which then holds the rank for continuous values away from the extremes.
    got, path = rules._sampled_thresholds(tvs, rank, stride=3)
    np.testing.assert_array_equal(got, want)
    if dtype == jnp.float32 and 0 < k <= 0.5:  # (at 0.9 the bracket is cut: 2^18 patterns)
        np.testing.assert_array_equal(path, 0)


@pytest.mark.parametrize("values", [(-2.0, -1.0, 0.0, 1.0, 2.0), (0.0, 0.0, 0.0, 0.5)])
def test_sampled_thresholds_with_heavy_ties(values):
    """Few distinct magnitudes: the bracket is one tied value with thousands of copies,
    columns overflow the cap, and the wider bracket or the two-pass select takes over."""
    tvs = _sampled_setup(41, values=values)
    for k in (0.1, 0.2, 0.6):
        rank = rules.ties_rank(SAMPLED_SIZE, k)
        got, _ = rules._sampled_thresholds(tvs, rank)
        np.testing.assert_array_equal(got, _two_pass(tvs, rank), err_msg=str(k))


def test_sampled_thresholds_retry_paths(monkeypatch):
    tvs = _sampled_setup(42)
    rank = rules.ties_rank(SAMPLED_SIZE, 0.2)
    want = _two_pass(tvs, rank)
    # An empty narrow bracket (negative width) fails every task: the wide one succeeds.
    monkeypatch.setattr(rules, "_SIGMAS", (-50.0, rules._SIGMAS[1]))
    got, path = rules._sampled_thresholds(tvs, rank, stride=3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(path, 1)
    # A sample that misrepresents the data (every sampled entry of the big leaf is 0, the
    # others are not): both brackets miss and the two-pass select is exact anyway.
    monkeypatch.undo()
    flat = np.asarray(tvs[1]["w"]).reshape(-1).copy()
    runs = flat[: flat.size // 12 * 12].reshape(-1, 12)  # stride 3: entries 4-7 of 12
    runs[:, 4:8] = 0.0
    flat[: runs.size] = runs.reshape(-1)
    tvs[1]["w"] = jnp.asarray(flat.reshape(SAMPLED_SHAPES["w"]))
    got, path = rules._sampled_thresholds(tvs, rank, stride=3)
    np.testing.assert_array_equal(got, _two_pass(tvs, rank))
    assert path[1] == 2 and path[0] == path[2] == 0


def test_sampled_thresholds_without_samples():
    """Leaves of fewer than 244 entries give an empty sample: the bracket is then the
    lowest 2^18 bit patterns (zeros and the smallest subnormals), anything else falls
    back."""
    rng = np.random.default_rng(44)
    shapes = {"a": (5, 6), "b": (30,), "c": ()}
    for values in (
        lambda s: rng.normal(size=s),
        lambda s: np.zeros(s),
        lambda s: rng.integers(0, 3, s) * 1e-45,
    ):
        tvs = [
            jax.tree.map(
                lambda s, v=values: jnp.asarray(v(s), jnp.float32), shapes, is_leaf=_is_shape
            )
            for _ in range(2)
        ]
        for k in (0.0, 0.5, 0.9):
            rank = rules.ties_rank(61, k)
            np.testing.assert_array_equal(
                rules.ties_thresholds_sampled(tvs, rank), _two_pass(tvs, rank)
            )


def test_compact_equals_nonzero():
    rng = np.random.default_rng(43)
    flags = jnp.asarray(rng.random((3, 700)) < 0.05)
    got = np.asarray(rules._compact(flags, 50))
    for row, g in zip(np.asarray(flags), got, strict=True):
        want = np.flatnonzero(row)[:50]
        np.testing.assert_array_equal(g[: want.size], want)
        np.testing.assert_array_equal(g[want.size :], 700)


def test_bfloat16_leaves_keep_dtype():
    base, tvs = _setup(seed=4)
    to_bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
    base16, tvs16 = to_bf16(base), [to_bf16(t) for t in tvs]
    for rule, (hparams, reference) in CASES.items():
        got = merging.get(rule)(base16, tvs16, **hparams)
        assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}, rule
        # The reference sees the same bf16 inputs; the result is rounded once to bf16.
        _assert_close(got, reference(base16, tvs16), rtol=2**-7, atol=2**-7)


# ------------------------------------------------------------------------- invariants


def test_one_task_arithmetic_endpoints():
    base, (tau,) = _setup(seed=5, num_tasks=1)
    theta1 = jax.tree.map(jnp.add, base, tau)
    _assert_close(merging.task_arithmetic(base, [tau], lam=1.0), jax.tree.leaves(theta1))
    jax.tree.map(np.testing.assert_array_equal, merging.task_arithmetic(base, [tau], lam=0.0), base)
    # With one task every rule at its identity setting returns theta1.
    for rule, hp in [
        ("average", {}),
        ("magmax", {"lam": 1.0}),
        ("ties", {"k": 0.99, "lam": 1.0}),  # int(71 * 0.99) = 70: every entry kept
        ("dare", {"p": 0.0, "lam": 1.0, "key": KEY}),
        ("randmix", {"key": KEY}),
    ]:
        _assert_close(merging.get(rule)(base, [tau], **hp), jax.tree.leaves(theta1))


@pytest.mark.parametrize("rule", ["average", "task_arithmetic", "ties", "magmax"])
def test_symmetric_rules_ignore_task_order(rule):
    hparams, _ = CASES[rule]
    base, tvs = _setup(seed=6)
    forward = merging.get(rule)(base, tvs, **hparams)
    backward = merging.get(rule)(base, tvs[::-1], **hparams)
    _assert_close(forward, jax.tree.leaves(backward))


@pytest.mark.parametrize("rule", sorted(running.STATES))
def test_running_equals_batch(rule):
    hparams, _ = CASES[rule]
    base, tvs = _setup(seed=7)
    state = running.init(rule, base)
    for t in tvs:
        state = running.update(state, t)
    assert int(state.count) == 3
    got = running.result(base, state, **hparams)
    want = merging.get(rule)(base, tvs, **hparams)
    # Same float operations in the same order: equal to the last bit.
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_running_state_is_one_tree():
    base, tvs = _setup(seed=8)
    state = running.init("magmax", base)
    for t in tvs:
        state = running.update(state, t)
    assert merging.leaf_names(state.best) == merging.leaf_names(base)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(base)) + 1


@pytest.mark.parametrize("rule", sorted(CASES))
def test_jitted_merge_traces_once_per_shape(rule):
    hparams, _ = CASES[rule]
    # Scalar hparams are Python numbers (static under jit); keys are arrays (traced).
    static = {k: v for k, v in hparams.items() if k != "key"}
    dynamic = {k: v for k, v in hparams.items() if k == "key"}
    chex.clear_trace_counter()
    fn = jax.jit(
        chex.assert_max_traces(
            lambda base, tvs, hp: merging.get(rule)(base, tvs, **static, **hp), n=1
        )
    )
    base, tvs = _setup(seed=9)
    first = fn(base, tvs, dynamic)
    _assert_close(first, jax.tree.leaves(merging.get(rule)(base, tvs, **hparams)))
    base2, tvs2 = _setup(seed=10)
    dynamic2 = {k: jax.random.fold_in(v, 1) for k, v in dynamic.items()}
    fn(base2, tvs2, dynamic2)  # new values, same shapes: no retrace


# ------------------------------------------------------------------ randomness quality


def test_dare_drop_rate_and_independence():
    n, p = 40_000, 0.3
    base = {"w": jnp.zeros((n,))}
    ones = [{"w": jnp.ones((n,))} for _ in range(2)]
    kept = [
        np.asarray(merging.dare(base, [o], p=p, key=jax.random.fold_in(KEY, i), lam=1.0)["w"]) > 0
        for i, o in enumerate(ones)
    ]
    sigma = np.sqrt(p * (1 - p) / n)
    for k in kept:
        assert abs(1 - k.mean() - p) < 5 * sigma
        # Adjacent elements are independent too (a weak hash would correlate neighbours).
        assert abs((k[1:] & k[:-1]).mean() - (1 - p) ** 2) < 5 * sigma
    assert abs((kept[0] & kept[1]).mean() - (1 - p) ** 2) < 5 * sigma
    # Unbiased: kept entries are rescaled by 1/(1-p), so the mean stays 1.
    merged = np.asarray(merging.dare(base, ones[:1], p=p, key=KEY)["w"])
    assert abs(merged.mean() - 1.0) < 5 * np.sqrt(p / (1 - p) / n)


def test_randmix_picks_uniformly():
    n, num_tasks = 30_000, 5
    base = {"w": jnp.zeros((n,))}
    tvs = [{"w": jnp.full((n,), float(i))} for i in range(num_tasks)]
    pick = np.asarray(merging.randmix(base, tvs, key=KEY)["w"]).astype(int)
    counts = np.bincount(pick, minlength=num_tasks)
    chi2 = ((counts - n / num_tasks) ** 2 / (n / num_tasks)).sum()
    assert chi2 < 25.0, counts  # 4 dof: P(chi2 > 25) < 1e-4


def test_randmix_index_equals_64bit_mulhi():
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 5000, dtype=np.uint64)
    bits[:3] = [0, 2**32 - 1, 2**31]
    for t in [1, 2, 3, 10, 255, 1000, 65535]:
        got = np.asarray(rules.randmix_index(jnp.asarray(bits, jnp.uint32), t))
        np.testing.assert_array_equal(got, (bits * np.uint64(t)) >> np.uint64(32))


# ----------------------------------------------------------------- registry and hparams


def test_get_unknown_name_lists_choices():
    with pytest.raises(
        KeyError, match="choose one of: average, dare, magmax, randmix, task_arithmetic, ties"
    ):
        merging.get("mean")
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        merging.hparams_for("nope", merging.default_config())


def test_hparams_for_picks_each_rules_fields():
    cfg = merging.default_config()
    cfg.lam, cfg.k, cfg.p, cfg.seed = 0.25, 0.1, 0.6, 3
    assert merging.hparams_for("average", cfg) == {}
    assert merging.hparams_for("task_arithmetic", cfg) == {"lam": 0.25}
    assert merging.hparams_for("ties", cfg) == {"k": 0.1, "lam": 0.25}
    assert merging.hparams_for("magmax", cfg) == {"lam": 0.25}
    hp = merging.hparams_for("dare", cfg)
    assert set(hp) == {"p", "lam", "key"} and hp["p"] == 0.6
    np.testing.assert_array_equal(
        jax.random.key_data(hp["key"]), jax.random.key_data(jax.random.key(3))
    )
    given = jax.random.key(99)
    assert merging.hparams_for("randmix", cfg, key=given)["key"] is given
    # The picked hparams are accepted by every rule.
    base, tvs = _setup(seed=12)
    for name in merging.MERGERS:
        merging.get(name)(base, tvs, **merging.hparams_for(name, cfg))


def test_hparams_for_missing_field():
    cfg = ml_collections.ConfigDict({"method": "ties", "lam": 0.5})
    with pytest.raises(ConfigError, match="no field 'k', needed by method 'ties'"):
        merging.hparams_for("ties", cfg)


def test_lazy_trm_and_reexports():
    assert merging.trm.__name__ == "trm_jax.merging.trm"
    for name in [
        "task_vector",
        "apply",
        "maxmag",
        "name_mask",
        "masked",
        "MERGERS",
        "get",
        "hparams_for",
        "running",
    ]:
        assert hasattr(merging, name), name


# ------------------------------------------------------------------------- error paths


@pytest.mark.parametrize("rule", sorted(CASES))
def test_structure_and_shape_mismatch_name_the_leaf(rule):
    hparams, _ = CASES[rule]
    base, tvs = _setup(seed=13)
    bad = jax.tree.map(lambda x: x, tvs[1])
    del bad["head"]
    with pytest.raises(ValueError, match=r"task_vectors\[1\] .*missing \['head/w'\]"):
        merging.get(rule)(base, [tvs[0], bad], **hparams)
    bad = jax.tree.map(lambda x: x, tvs[1])
    bad["blocks"][0]["bias"] = jnp.zeros((6,))
    with pytest.raises(
        ValueError, match=r"task_vectors\[1\] leaf 'blocks/0/bias' has shape \(6,\)"
    ):
        merging.get(rule)(base, [tvs[0], bad], **hparams)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rule", sorted(CASES))
def test_non_finite_input_names_the_leaf(rule, value):
    hparams, _ = CASES[rule]
    base, tvs = _setup(seed=14)
    # MagMax skips a NaN (|NaN| > x is False), DARE may drop it, RandMix may not pick it:
    # the poison term must surface it anyway.
    tvs[2]["head"]["w"] = tvs[2]["head"]["w"].at[0].set(value)
    with pytest.raises(merging.NonFiniteError, match=rf"{rule}: task_vectors\[2\] .*\['head/w'\]"):
        merging.get(rule)(base, tvs, **hparams)
    tvs[2]["head"]["w"] = tvs[1]["head"]["w"]
    base["temp"] = jnp.asarray(value, jnp.float32)
    with pytest.raises(
        ValueError, match=rf"{rule}: base has non-finite values in leaves \['temp'\]"
    ):
        merging.get(rule)(base, tvs, **hparams)


def test_overflowing_output_is_reported():
    base, tvs = _setup(seed=15)
    with pytest.raises(merging.NonFiniteError, match="although every input is finite"):
        merging.task_arithmetic(base, tvs, lam=3e38)


def test_bad_arguments():
    base, tvs = _setup(seed=16)
    with pytest.raises(TypeError, match="list or tuple"):
        merging.average(base, tvs[0])
    with pytest.raises(ValueError, match="at least one task vector"):
        merging.magmax(base, [])
    with pytest.raises(ConfigError, match=r"k=1.5 is outside \[0.0, 1.0\)"):
        merging.ties(base, tvs, k=1.5)
    with pytest.raises(ConfigError, match=r"k=1.0 is outside \[0.0, 1.0\)"):
        merging.ties(base, tvs, k=1.0)
    with pytest.raises(ConfigError, match=r"p=1.0 is outside \[0.0, 1.0\)"):
        merging.dare(base, tvs, p=1.0, key=KEY)
    with pytest.raises(ConfigError, match="rounds to 1"):
        merging.dare(base, tvs, p=1 - 2**-26, key=KEY)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lam'"):
        merging.average(base, tvs, lam=0.5)


def test_running_error_paths():
    base, tvs = _setup(seed=17, num_tasks=2)
    with pytest.raises(
        KeyError, match=r"no running form for merge rule 'ties'; choose one of \['average'"
    ):
        running.init("ties", base)
    state = running.init("task_arithmetic", base)
    with pytest.raises(ValueError, match="no task vectors yet"):
        running.result(base, state, lam=1.0)
    bad = jax.tree.map(lambda x: x, tvs[0])
    bad["head"]["w"] = jnp.zeros((3, 4))
    with pytest.raises(
        ValueError, match=r"task vector leaf 'head/w' has shape \(3, 4\), base has \(5,\)"
    ):
        running.update(state, bad)
    for rule in running.STATES:
        state = running.update(running.init(rule, base), tvs[0])
        bad = jax.tree.map(lambda x: x, tvs[1])
        bad["temp"] = jnp.asarray(np.nan, jnp.float32)
        with pytest.raises(merging.NonFiniteError, match=r"task vector #1 .*\['temp'\]"):
            running.update(state, bad)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lam'"):
        running.result(base, running.update(running.init("average", base), tvs[0]), lam=1.0)
