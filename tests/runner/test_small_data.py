"""Small data still trains: 100 images per class (one short epoch per task) must move the
backbone for every method that fine-tunes, and sequential fine-tuning must forget.

Before MagMax's schedule (lr * (step + 1) / warmup) a task of one step trained at rate 0,
and seq_ft, MagMax and TRM gave identical accuracy matrices with zero forgetting.
"""

import os

import jax
import numpy as np
import pytest
from configs_util import FMNIST, tiny_config

from trm_jax import runner
from trm_jax.runner import loop, methods

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST IDX not installed")

SMALL = {
    "data.max_train_per_class": 100,
    "data.max_test_per_class": 50,
    "train.steps": 0,
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.lr": 3e-3,
    "train.warmup_steps": 2,
}


def _max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


FINETUNING = sorted(name for name, m in methods.METHODS.items() if m.finetunes)


@pytest.mark.parametrize("method", FINETUNING)
def test_every_finetuning_method_moves_the_backbone(tmp_path, monkeypatch, method):
    moved = []
    original = loop.run_task

    def spy(job, t, carry, rows, head, meta):
        out = original(job, t, carry, rows, head, meta)
        moved.append(_max_abs_diff(out[0].chain, job.theta0))  # theta_t against theta_0
        return out

    monkeypatch.setattr(loop, "run_task", spy)
    cfg = tiny_config(**{**SMALL, "merge.method": method, "data.max_test_per_class": 8})
    runner.run(cfg, str(tmp_path / method))
    assert len(moved) == 2 and min(moved) > 1e-4, moved


def test_seq_ft_forgets_on_small_data(tmp_path):
    m = runner.run(tiny_config(**{**SMALL, "merge.method": "seq_ft"}), str(tmp_path / "s"))
    zero = runner.run(tiny_config(**{**SMALL, "merge.method": "zeroshot"}), str(tmp_path / "z"))
    assert m["task_forgetting"] > 0.0
    assert m["acc_matrix"] != zero["acc_matrix"]
