"""The method protocol: the registry, and a toy method plugged in from a test.

The worked example of docs/runner.md ("Adding a method"): ``Interpolate`` merges
theta_bar_t = theta_bar_{t-1} + w * (theta_t - theta_bar_{t-1}) and keeps a task counter
as persisted state. Its weight pins it to two existing methods exactly: w = 1 is
sequential fine-tuning, and w = 0 never leaves theta_0 (every task re-starts from it), so
its accuracy matrix is zero-shot's.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import FMNIST, tiny_config

from trm_jax import runner
from trm_jax.errors import ConfigError, UnknownNameError
from trm_jax.runner import methods
from trm_jax.runner.methods import Method

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST IDX not installed")


class Interpolate(Method):
    """theta_bar_t = theta_bar_{t-1} + w (theta_t - theta_bar_{t-1}); counts tasks."""

    description = "toy: linear interpolation toward theta_t"

    def __init__(self, name: str, weight: float):
        self.name, self.weight = name, weight

    def state_like(self, config, theta0, tasks_done):
        return {"tasks": jnp.zeros((), jnp.int32)}

    def merge(self, task, carry, finetuned):
        w = self.weight
        merged = jax.tree.map(lambda a, b: a + w * (b - a), carry.merged, finetuned.theta_t)
        count = 0 if carry.state is None else carry.state["tasks"]
        return merged, {"tasks": jnp.asarray(count + 1, jnp.int32)}, {}


@pytest.fixture
def toy_methods():
    added = [methods.register(Interpolate(f"toy_{w}", w)) for w in (0.0, 1.0, 0.5)]
    yield added
    for m in added:
        del methods.METHODS[m.name]


def _run(tmp_path, method, **over):
    return runner.run(tiny_config(**{"merge.method": method, **over}), str(tmp_path / method))


def test_toy_method_pins_to_seq_ft_and_zeroshot(tmp_path, toy_methods):
    seq = _run(tmp_path, "seq_ft")
    zero = _run(tmp_path, "zeroshot")
    np.testing.assert_array_equal(
        np.asarray(_run(tmp_path, "toy_1.0")["acc_matrix"], float),
        np.asarray(seq["acc_matrix"], float),
    )
    np.testing.assert_array_equal(
        np.asarray(_run(tmp_path, "toy_0.0")["acc_matrix"], float),
        np.asarray(zero["acc_matrix"], float),
    )


def test_toy_method_persists_and_resumes(tmp_path, toy_methods):
    full = _run(tmp_path, "toy_0.5")
    cfg = tiny_config(**{"merge.method": "toy_0.5", "debug.stop_after_task": 1})
    wd = str(tmp_path / "resumed")
    assert runner.run(cfg, wd) == {"stopped_after_task": 1}
    cfg.debug.stop_after_task = 0
    resumed = runner.run(cfg, wd)
    np.testing.assert_array_equal(
        np.asarray(resumed["acc_matrix"], float), np.asarray(full["acc_matrix"], float)
    )
    # The counter (int32 scalar, 4 bytes) is part of what the method stores.
    seq = _run(tmp_path, "seq_ft")
    assert [a - b for a, b in zip(full["stored_bytes"], seq["stored_bytes"], strict=True)] == [4, 4]


def test_registry_lists_every_method_and_rejects_unknown():
    expected = {"seq_ft", "lwf", "ewc", "joint", "zeroshot", "trm"}
    expected |= {"average", "task_arithmetic", "ties", "dare", "magmax", "randmix"}
    assert expected <= set(methods.choices())
    with pytest.raises(UnknownNameError, match=r"unknown merge.method 'nope'; choices: average"):
        methods.get("nope")
    assert isinstance(UnknownNameError("x"), ConfigError)
    # Rule merges with a running form use it (O(1) state); the others keep every vector.
    assert type(methods.get("magmax")).__name__ == "RunningRule"
    assert type(methods.get("ties")).__name__ == "RuleMerge"
