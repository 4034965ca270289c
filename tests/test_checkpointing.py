"""checkpointing: exact round trips, keep-last-N, corruption and mismatch errors, kill -9
mid-save, resharding on restore, the config guard and the parameter cache."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trm_jax import checkpointing
from trm_jax.errors import CheckpointError, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0):
    k = jax.random.key(seed)
    return {
        "params": {
            "dense": {"kernel": jax.random.normal(k, (4, 3)), "bias": jnp.arange(3.0)},
            "emb": jax.random.normal(jax.random.fold_in(k, 1), (5, 2)).astype(jnp.bfloat16),
        },
        "opt": (jnp.asarray(7, jnp.int32), {"mu": np.linspace(0, 1, 6, dtype=np.float32)}),
        "key": jax.random.fold_in(k, 2),
        "step": 11,
    }


def _assert_state_equal(got, want):
    assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(want["key"]))
    strip = lambda s: {k: v for k, v in s.items() if k != "key"}
    chex.assert_trees_all_equal(strip(got), strip(want), strict=False)
    for a, b in zip(jax.tree.leaves(strip(got)), jax.tree.leaves(strip(want)), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype


def test_round_trip_exact_across_instances(tmp_path):
    state = _state()
    meta = {
        "task": 2,
        "phase": "merged",
        "acc": np.array([[0.5, np.nan], [0.25, 0.75]]),
        "seen": [0, 1, 2],
    }
    with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(5, state, meta)
    # A fresh instance, as after a restart.
    with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 5
        got, got_meta = ckpt.restore(None, like=_state(seed=1))
    _assert_state_equal(got, state)
    assert got["step"] == 11 and isinstance(got["step"], int)
    assert got_meta["task"] == 2 and got_meta["phase"] == "merged" and got_meta["seen"] == [0, 1, 2]
    acc = np.asarray(got_meta["acc"], dtype=np.float64)
    np.testing.assert_array_equal(acc, meta["acc"])  # NaN survives the JSON round trip


def test_keep_last_n_and_missing_step(tmp_path):
    with checkpointing.Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 6):
            state = {"w": jnp.full((3,), float(step))}
            ckpt.save(step, state, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert sorted(os.listdir(tmp_path)) == ["4", "5"]
        got, meta = ckpt.restore(4, like={"w": jnp.zeros(3)})
        np.testing.assert_array_equal(got["w"], [4.0, 4.0, 4.0])
        assert meta == {"step": 4}
        with pytest.raises(CheckpointError, match=r"no checkpoint step 1 in .*steps: \[4, 5\]"):
            ckpt.restore(1, like={"w": jnp.zeros(3)})
        with pytest.raises(ValueError, match="must exceed the latest step 5"):
            ckpt.save(5, {"w": jnp.zeros(3)}, {})


def test_restore_empty_directory(tmp_path):
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=f"no checkpoint to restore in {tmp_path}"):
            ckpt.restore(None, like={})


def _truncate_arrays(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _garble_meta(step_dir):
    with open(f"{step_dir}/meta/metadata", "w") as fh:
        fh.write("{not json")


def _drop_state(step_dir):
    import shutil

    shutil.rmtree(f"{step_dir}/state")


# orbax's async reader can leave an "Event loop is closed" warning behind on failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate_arrays, _garble_meta, _drop_state])
def test_corrupt_checkpoint_raises_one_line(tmp_path, corrupt):
    state = {"w": jnp.arange(2000.0).reshape(20, 100), "b": jnp.ones(3)}
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"task": 0})
    corrupt(tmp_path / "1")
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(1, like=state)
    message = str(info.value)
    assert f"cannot restore checkpoint {tmp_path}/1: " in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "like, cause",
    [
        (
            {"w": jnp.zeros((2, 4)), "b": jnp.zeros(3)},
            r"w: checkpoint \(2, 3\) float32, expected \(2, 4\) float32",
        ),
        (
            {"w": jnp.zeros((2, 3), jnp.int32), "b": jnp.zeros(3)},
            r"w: checkpoint \(2, 3\) float32, expected \(2, 3\) int32",
        ),
        ({"w": jnp.zeros((2, 3))}, r"not in the model: \['b'\]"),
        (
            {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3), "c": jnp.zeros(1)},
            r"missing from the checkpoint: \['c'\]",
        ),
    ],
    ids=["shape", "dtype", "missing", "extra"],
)
def test_mismatched_like_raises(tmp_path, like, cause):
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, {})
        with pytest.raises(
            CheckpointError, match=f"cannot restore checkpoint {tmp_path}/3: .*{cause}"
        ):
            ckpt.restore(3, like=like)


def test_restore_takes_the_shardings_of_like(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    value = jnp.arange(32.0).reshape(8, 4)
    saved = jax.device_put(value, NamedSharding(mesh, P("data")))
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": saved}, {})
        small = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
        target = NamedSharding(small, P(None, "fsdp"))
        like = {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target)}
        got, _ = ckpt.restore(1, like=like)
    assert got["x"].sharding == target
    np.testing.assert_array_equal(got["x"], value)


def test_leftover_temporary_directory_is_ignored_and_removed(tmp_path):
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, {"w": jnp.ones(2)}, {"ok": True})
    tmp_dir = tmp_path / "3.orbax-checkpoint-tmp-1234567890"
    (tmp_dir / "state").mkdir(parents=True)
    (tmp_dir / "state" / "junk").write_bytes(b"half a write")
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        assert ckpt.restore(None, like={"w": jnp.zeros(2)})[1] == {"ok": True}
        # orbax removes leftovers in the background, finished by the time a save starts.
        ckpt.save(3, {"w": jnp.ones(2)}, {})
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]


_CHILD = r"""
import sys
import numpy as np
from trm_jax import checkpointing
ckpt = checkpointing.Checkpointer(sys.argv[1], keep=2)
for step in range(1, 10_000):
    ckpt.save(step, {"w": np.full((512, 1024), step, np.float32)}, {"step": step})
    print(step, flush=True)
"""


def test_kill_dash_nine_mid_save_leaves_a_whole_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            line = child.stdout.readline()
            if not line or int(line) >= 4:
                break
        time.sleep(0.05)  # let the next save get under way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        step = ckpt.latest_step()
        assert step is not None and step >= 3
        got, meta = ckpt.restore(step, like={"w": np.zeros((512, 1024), np.float32)})
        assert meta == {"step": step}
        assert np.all(np.asarray(got["w"]) == step)
        ckpt.save(step + 1, {"w": np.zeros(1)}, {})  # resuming: the next save goes through
    assert sorted(os.listdir(tmp_path)) == [str(step), str(step + 1)]


def test_params_cache_round_trip_and_mismatch(tmp_path):
    params = _state()["params"]
    path = tmp_path / "cache" / "theta0"
    checkpointing.save_params(path, params)
    checkpointing.save_params(path, params)  # replacing is allowed
    chex.assert_trees_all_equal(checkpointing.load_params(path, like=params), params)
    chex.assert_trees_all_equal(checkpointing.load_params(path), params)
    wrong = dict(params, emb=jnp.zeros((5, 3), jnp.bfloat16))
    with pytest.raises(
        CheckpointError, match=r"cannot load parameters from .*theta0: .*emb: checkpoint \(5, 2\)"
    ):
        checkpointing.load_params(path, like=wrong)
    with pytest.raises(CheckpointError, match="no parameter checkpoint at"):
        checkpointing.load_params(tmp_path / "absent", like=params)


def test_config_guard(tmp_path):
    config = {"seed": 0, "merge": {"method": "trm", "lam": 0.5}, "data": {"num_tasks": 5}}
    checkpointing.config_guard(tmp_path, json.dumps(config, indent=2))
    assert json.loads((tmp_path / "config.json").read_text()) == config
    # Same config, other formatting and key order: accepted.
    checkpointing.config_guard(tmp_path, json.dumps(dict(reversed(list(config.items())))))
    other = {
        "seed": 0,
        "merge": {"method": "magmax", "lam": 0.5},
        "data": {"num_tasks": 5},
        "extra": 1,
    }
    with pytest.raises(ConfigError) as info:
        checkpointing.config_guard(tmp_path, json.dumps(other))
    message = str(info.value)
    assert message == (
        f"workdir {tmp_path} holds a run with a different config "
        '[merge.method: "trm" -> "magmax"; extra: (absent) -> 1]; '
        "use another --workdir or delete it"
    )
    assert json.loads((tmp_path / "config.json").read_text()) == config  # not overwritten
    checkpointing.config_guard(tmp_path, json.dumps(other), ignore=("merge.method", "extra"))


def test_config_diff_lists_first_keys_and_counts_the_rest():
    old = {f"k{i}": i for i in range(6)}
    new = {f"k{i}": i + 1 for i in range(6)}
    diffs = checkpointing.config_diff(old, new)
    assert diffs[:2] == ["k0: 0 -> 1", "k1: 1 -> 2"] and len(diffs) == 6
    assert checkpointing.config_diff({"a": float("nan")}, {"a": float("nan")}) == []


def test_checksums_catch_a_flipped_byte_and_fingerprints_a_config(tmp_path):
    """A byte flipped in an array's data file restores as other numbers without an orbax
    error: the checksum saved in the meta catches it. A checkpoint written under another
    fingerprint (the runner's config hash) is refused; one without a fingerprint is not."""
    state = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.ones(3)}
    with checkpointing.Checkpointer(tmp_path / "a", fingerprint="cfg0") as ckpt:
        ckpt.save(1, state, {"task": 0})
        got, meta = ckpt.restore(1, like=state)
    assert meta == {"task": 0}  # the integrity record is not handed back
    with checkpointing.Checkpointer(tmp_path / "a", fingerprint="cfg1") as ckpt:
        with pytest.raises(CheckpointError, match=r"written by a run with a different config"):
            ckpt.restore(1, like=state)
    with checkpointing.Checkpointer(tmp_path / "a") as ckpt:  # no fingerprint: not checked
        ckpt.restore(1, like=state)
    data = max(glob.glob(f"{tmp_path}/a/1/state/**/d/*", recursive=True), key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(data, "wb").write(bytes(raw))
    with checkpointing.Checkpointer(tmp_path / "a", fingerprint="cfg0") as ckpt:
        with pytest.raises(
            CheckpointError, match=r"1 is corrupt: the checksum of 1 array\(s\) \['w'\]"
        ):
            ckpt.restore(1, like=state)


def test_params_cache_is_atomic_and_checksummed(tmp_path):
    params = {"w": jax.random.normal(jax.random.key(1), (64, 64))}
    path = tmp_path / "cache" / "theta0"
    checkpointing.save_params(path, params)
    assert sorted(os.listdir(tmp_path / "cache")) == ["theta0"]  # no temporary left
    assert os.path.exists(path / checkpointing.CHECKSUMS_FILE)
    data = max(glob.glob(f"{path}/**/d/*", recursive=True), key=os.path.getsize)
    raw = bytearray(open(data, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(data, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"theta0 are corrupt: the checksum of 1 array"):
        checkpointing.load_params(path, like=params)


def test_config_guard_replaces_the_config_of_a_workdir_without_checkpoints(tmp_path):
    checkpointing.config_guard(tmp_path, json.dumps({"lr": 1.0}))
    assert checkpointing.config_guard(tmp_path, json.dumps({"lr": 1.0}), replace=True) == []
    replaced = checkpointing.config_guard(tmp_path, json.dumps({"lr": 0.1}), replace=True)
    assert replaced == ["lr: 1.0 -> 0.1"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1}
    with pytest.raises(ConfigError, match="different config"):
        checkpointing.config_guard(tmp_path, json.dumps({"lr": 2.0}))


def test_dir_lock_names_its_holder_and_check_writable(tmp_path):
    from trm_jax.errors import WorkdirError

    lock_path = str(tmp_path / ".lock")
    with checkpointing.DirLock(lock_path, what="workdir x"):
        with pytest.raises(WorkdirError, match=rf"workdir x is in use by pid {os.getpid()} on "):
            with checkpointing.DirLock(lock_path, what="workdir x"):
                pass
    with checkpointing.DirLock(lock_path, what="workdir x"):  # released: free again
        pass
    assert not os.path.exists(lock_path + ".owner")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is not a directory"):
        checkpointing.check_writable(tmp_path / "file", "--workdir")
    with pytest.raises(WorkdirError, match="cannot create --workdir"):
        checkpointing.check_writable(tmp_path / "file" / "sub", "--workdir")
    assert checkpointing.saved_steps(tmp_path) == []
