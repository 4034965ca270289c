"""Two processes on localhost, one ``jax.distributed`` job: one train step agrees.

The test starts this file twice as a script (``python test_multiprocess.py WORKER ...``),
each process with 2 fake CPU devices, joined through a local coordinator into one
4-device mesh (``data=2`` x ``fsdp=2``; the fsdp axis spans both processes, so
parameters are split across hosts). The CPU backend's cross-process collectives are
gloo (``mesh.cpu_collectives``). Each process feeds only its half of the global batch
(``sharding.shard_batch``), as a pod host would. Both processes must write the same
updated parameters, equal (atol 1e-5) to the same step computed on one device here.
About 5-10 s on 2 cores; a 120 s timeout guards against a hung coordinator.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16  # global; 8 per process


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense1": {
            "kernel": rng.normal(0, 0.5, (8, 16)).astype(np.float32),
            "bias": np.zeros(16, np.float32),
        },
        "dense2": {
            "kernel": rng.normal(0, 0.5, (16, 4)).astype(np.float32),
            "bias": np.zeros(4, np.float32),
        },
    }


def _batch():
    rng = np.random.default_rng(1)
    return {
        "image": rng.integers(0, 256, (BATCH, 2, 2, 2)).astype(np.uint8),
        "label": rng.integers(0, 4, BATCH).astype(np.int32),
    }


def _step_parts():
    """The runner's train step around a two-layer MLP with a linear head."""
    import jax
    import jax.numpy as jnp

    from trm_jax.runner import train

    def features(params, images):
        x = images.reshape(images.shape[0], -1)
        return jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])

    def preprocess(images, key=None, *, train=False):
        return images.astype(jnp.float32) / 255.0

    tcfg = train.default_config()
    tcfg.lr, tcfg.warmup_steps = 1e-2, 0
    optimizer = train.make_optimizer(tcfg)

    def logits_fn(params, images, ctx):
        p = params["backbone"]
        return features(p, images) @ p["dense2"]["kernel"] + p["dense2"]["bias"]

    loss_fn = train.make_loss_fn(logits_fn)
    step = train.make_train_step(loss_fn, optimizer, preprocess, lr=tcfg.lr)
    params = {"backbone": jax.tree.map(jnp.asarray, _params()), "head": {}}
    ctx = {"train_mask": jnp.ones((4,), bool)}
    return step, train.init_state(params, optimizer, 10), ctx


def _worker(process_id: int, port: int, out: str) -> None:
    import jax

    from trm_jax import sharding

    cfg = sharding.default_config()
    cfg.distributed = True
    cfg.coordinator_address = f"localhost:{port}"
    cfg.num_processes, cfg.process_id = 2, process_id
    cfg.data, cfg.fsdp, cfg.fsdp_min_size = 2, 2, 16
    sharding.initialize(cfg)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()

    mesh = sharding.make_mesh(cfg)
    step, state, ctx = _step_parts()
    state = sharding.shard_params(state, mesh, cfg)
    half = BATCH // 2
    local = {k: v[process_id * half : (process_id + 1) * half] for k, v in _batch().items()}
    state, metrics = step(
        state, sharding.shard_batch(local, mesh), jax.random.key(0), sharding.replicate(ctx, mesh)
    )
    kernel = state.params["backbone"]["dense1"]["kernel"]
    assert not kernel.is_fully_addressable  # really split across the two processes
    host = sharding.fetch({"params": state.params["backbone"], "loss": metrics["loss"]})
    np.savez(
        out,
        loss=host["loss"],
        **{
            f"{layer}/{name}": value
            for layer, leaves in host["params"].items()
            for name, value in leaves.items()
        },
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_train_step_agrees(tmp_path):
    import jax

    port = _free_port()
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "WORKER", str(i), str(port), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"

    step, state, ctx = _step_parts()
    batch = {k: jax.numpy.asarray(v) for k, v in _batch().items()}
    ref, ref_metrics = step(state, batch, jax.random.key(0), ctx)
    ref_flat = {
        f"{layer}/{name}": np.asarray(v)
        for layer, leaves in ref.params["backbone"].items()
        for name, v in leaves.items()
    }
    results = [np.load(o) for o in outs]
    for r in results:
        np.testing.assert_allclose(r["loss"], float(ref_metrics["loss"]), rtol=1e-5)
        for name, value in ref_flat.items():
            np.testing.assert_allclose(r[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
    # The step moved the parameters (so agreement is not agreement on the initial point).
    assert np.abs(ref_flat["dense1/kernel"] - _params()["dense1"]["kernel"]).max() > 1e-3


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "WORKER":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
