"""Scalar hyper-parameters are checked where they enter the library: a string, a bool or
an array of several values is a ``TypeError`` naming the rule and the argument, while
Python numbers, 0-d arrays and traced scalars (the rules stay jit-able) are accepted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import merging

BASE = {"w": jnp.zeros((3,), jnp.float32)}
TAUS = [{"w": jnp.asarray([1.0, -2.0, 3.0])}, {"w": jnp.asarray([-4.0, 1.0, 0.5])}]
KEY = jax.random.key(0)

BAD = [
    ("magmax", {"lam": "0.5"}, r"magmax: lam must be a real number, got str"),
    ("magmax", {"lam": np.array([0.5, 0.5])}, r"magmax: lam must be one real number.*\(2,\)"),
    ("magmax", {"lam": True}, r"magmax: lam must be a real number, got bool"),
    ("task_arithmetic", {"lam": [1.0]}, r"task_arithmetic: lam must be a real number, got list"),
    ("ties", {"k": "0.2"}, r"ties: k must be a real number"),
    ("ties", {"lam": jnp.ones(2)}, r"ties: lam must be one real number"),
    ("dare", {"p": "0.9", "key": KEY}, r"dare: p must be a real number"),
    ("dare", {"p": 0.5, "key": KEY, "lam": None}, r"dare: lam must be a real number, got NoneType"),
    ("randmix", {"key": KEY, "lam": "1"}, r"randmix: lam must be a real number"),
]


@pytest.mark.parametrize("rule,kwargs,message", BAD)
def test_bad_scalar_is_a_type_error_naming_the_argument(rule, kwargs, message):
    with pytest.raises(TypeError, match=message):
        merging.get(rule)(BASE, TAUS, **kwargs)


def test_numbers_and_0d_arrays_give_the_same_merge():
    ref = np.asarray(merging.magmax(BASE, TAUS, lam=0.5)["w"])
    np.testing.assert_array_equal(ref, [-2.0, -1.0, 1.5])  # maxmag = [-4, -2, 3], times 0.5
    for lam in (np.float32(0.5), np.asarray(0.5), jnp.asarray(0.5)):
        np.testing.assert_array_equal(np.asarray(merging.magmax(BASE, TAUS, lam=lam)["w"]), ref)
    traced = jax.jit(lambda lam: merging.magmax(BASE, TAUS, lam=lam)["w"])(0.5)
    np.testing.assert_array_equal(np.asarray(traced), ref)


def test_running_result_checks_its_hparams():
    state = merging.running.init("magmax", BASE)
    for tau in TAUS:
        state = merging.running.update(state, tau)
    np.testing.assert_array_equal(
        np.asarray(merging.running.result(BASE, state, lam=0.5)["w"]), [-2.0, -1.0, 1.5]
    )
    with pytest.raises(TypeError, match=r"running.result \(magmax\): lam must be a real"):
        merging.running.result(BASE, state, lam="0.5")


def test_ties_takes_a_traced_lam_but_needs_a_concrete_k():
    # k picks a rank on the host, so it cannot be traced; lam only scales the result.
    # Reference by hand (k=0.5 of d=3: keep |x| >= the 2nd largest): tau1 keeps [-2, 3],
    # tau2 keeps [-4, 1]; sums [-4, -1, 3] elect [-, -, +]; disjoint means [-4, -2, 3].
    want = np.asarray([-4.0, -2.0, 3.0]) * 0.5
    np.testing.assert_array_equal(np.asarray(merging.ties(BASE, TAUS, k=0.5, lam=0.5)["w"]), want)
    traced = jax.jit(lambda lam: merging.ties(BASE, TAUS, k=0.5, lam=lam)["w"])(0.5)
    np.testing.assert_array_equal(np.asarray(traced), want)
    with pytest.raises(merging.ConfigError, match=r"ties: k must be a concrete number"):
        jax.jit(lambda k: merging.ties(BASE, TAUS, k=k, lam=1.0))(0.5)
