"""Training curves: with ``log.tensorboard`` the run writes TensorBoard event files whose
values are the run's own (read back from the files with tensorboardX's protobufs)."""

import glob
import os
import struct

import numpy as np
import pytest
from configs_util import FMNIST, tiny_config
from tensorboardX.proto import event_pb2

from trm_jax import runner

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST IDX not installed")


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file (TFRecord framing: length, crc, data, crc)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_curves_hold_the_run_values(tmp_path):
    cfg = tiny_config(**{"merge.method": "trm", "log.tensorboard": True})
    m = runner.run(cfg, str(tmp_path / "run"))
    scalars = read_scalars(str(tmp_path / "run" / "tensorboard"))
    for t in (1, 2):
        steps = [s for s, _ in scalars[f"task_{t}/train/loss"]]
        assert steps == list(range(cfg.train.steps))
        lrs = [v for _, v in scalars[f"task_{t}/train/lr"]]
        assert lrs[0] > 0  # the first step trains
        assert len(scalars[f"task_{t}/trm/loss"]) == cfg.merge.trm.steps
    acc, sizes = np.asarray(m["acc_matrix"], float), np.asarray(m["task_sizes"], float)
    seen = [(acc[t, : t + 1] * sizes[: t + 1]).sum() / sizes[: t + 1].sum() for t in range(2)]
    logged = [v for _, v in sorted(scalars["stream/acc_seen"])]
    np.testing.assert_allclose(logged, seen, rtol=1e-6)
    # The log section does not change results: the same run without curves is identical.
    plain = runner.run(tiny_config(**{"merge.method": "trm"}), str(tmp_path / "plain"))
    np.testing.assert_array_equal(np.asarray(plain["acc_matrix"], float), acc)
