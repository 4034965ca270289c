"""The paper pipeline end to end, shrunk: ``configs/paper.py:cifar100,2`` as a user runs it.

A tiny random CLIP (both towers, 224 px input with 32 px patches) is written in the
published Hugging Face layout into a temporary hub cache, read offline through
``hf:org/tiny-clip``; CIFAR-100 comes from ``tfds.testing.mock_data``. The paper config
is used as it is (zero-shot head through the text tower and the repository's tokenizer
files, MagMax's class order, TFDS source) with only sizes shrunk: 2 tasks, a few steps.
``prepare`` must find everything, and trm, magmax and seq_ft must honour the metrics
contract.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_hub import clip_config_json, put_in_cache

from trm_jax import models, prepare, report, runner
from trm_jax.data import class_orders
from trm_jax.models import loaders, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = "hf:org/tiny-clip"


def _paper_config(arg: str):
    spec = importlib.util.spec_from_file_location("paper", os.path.join(ROOT, "configs/paper.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.fixture()
def tiny_hub_clip(tmp_path, monkeypatch, tiny_clip, corpus):
    """A 224 px tiny CLIP in an offline hub cache, registered as model ``clip_e2e``."""
    variant = dataclasses.replace(tiny_clip, name="clip_e2e", image_size=224, patch_size=32)
    monkeypatch.setitem(models.MODELS, "clip_e2e", variant)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "repo"
    folder.mkdir()
    loaders.create_checkpoint(variant, str(folder / "model.safetensors"), seed=1)
    texts, num_merges = corpus
    vocab_json, merges_txt = tokenizer.write_hf_vocab(
        str(folder), tokenizer.learn_merges(texts, num_merges)
    )
    with open(folder / "config.json", "w") as f:
        json.dump(clip_config_json(variant), f)
    files = {
        "model.safetensors": str(folder / "model.safetensors"),
        "config.json": str(folder / "config.json"),
        "vocab.json": vocab_json,
        "merges.txt": merges_txt,
    }
    put_in_cache(str(tmp_path / "hf_home" / "hub"), "org/tiny-clip", files)
    return variant


def _shrunk(tmp_path, method: str):
    c = _paper_config("cifar100,2")
    c.model.name = "clip_e2e"
    c.model.checkpoint = SPEC
    c.model.templates = ("a photo of a {}.",)
    c.data.download = False
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.max_train_per_class = 3  # every class of both tasks has examples, few of them
    c.data.max_test_per_class = 2
    c.train.steps = 3
    c.train.batch_size = 16
    c.train.warmup_steps = 2
    c.train.snapshots = 2
    c.train.onset_steps = 2
    c.train.augment = False
    c.merge.method = method
    c.merge.batch_size = 8
    c.merge.trm.steps = 2
    c.merge.trm.max_batches = 1
    c.merge.trm.probe.batch_size = 8
    c.eval.batch_size = 32
    c.debug.progress = False
    return c


def test_prepare_without_data_or_weights_fails(tmp_path, monkeypatch):
    """Nothing cached, offline, no TFDS data: the table names both, and the run cannot start."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = _paper_config("cifar100,10")
    c.data.download = False
    c.data.data_dir = str(tmp_path / "no_tfds")
    items = prepare.check(c, fetch=True, workdir=str(tmp_path))
    missing = {i.item for i in items if not i.ok}
    assert missing == {"weights hf:openai/clip-vit-base-patch16", "data cifar100"}
    line = prepare.summary(items)
    assert "\n" not in line and "hf download openai/clip-vit-base-patch16" in line
    assert "| weights hf:openai/clip-vit-base-patch16 | **missing**" in prepare.table(items)


def test_paper_pipeline_shrunk(tmp_path, tiny_hub_clip):
    with tfds.testing.mock_data(num_examples=1500):
        items = prepare.check(_shrunk(tmp_path, "trm"), fetch=False, workdir=str(tmp_path))
        assert prepare.summary(items) == "", prepare.table(items)
        assert [i.item for i in items][:2] == [f"weights {SPEC}", "data cifar100"]
        results = {}
        for method in ("trm", "magmax", "seq_ft"):
            cfg = _shrunk(tmp_path, method)
            wd = str(tmp_path / method)
            results[method] = runner.run(cfg, wd)
            with open(os.path.join(wd, "metrics.json")) as f:
                saved = json.load(f)
            for key in report.PUBLIC_KEYS:
                assert key in saved, key
            assert saved["method"] == method
            # MagMax's published CIFAR-100 order, not a seeded shuffle.
            assert saved["class_order"] == class_orders.get("cifar100")
            acc = np.asarray(saved["acc_matrix"], float)
            assert acc.shape == (2, 2) and np.isnan(acc[0, 1])
            assert np.all((acc[np.tril_indices(2)] >= 0) & (acc[np.tril_indices(2)] <= 1))
            sizes = np.asarray(saved["task_sizes"], float)
            np.testing.assert_allclose(
                saved["last_accuracy"], (acc[1] * sizes).sum() / sizes.sum(), rtol=1e-12
            )
            assert len(saved["onset_grad_norm"]) == 1 and saved["onset_grad_norm"][0] > 0
    # What TRM keeps: theta_0 and theta_bar_t (image tower) plus the 100 frozen text rows.
    theta0 = models.build(_shrunk(tmp_path, "trm").model, key=jax.random.key(0)).params
    tower = sum(np.asarray(x).nbytes for x in jax.tree.leaves(theta0))
    rows = 100 * tiny_hub_clip.projection_dim * 4
    assert results["trm"]["stored_bytes"] == [2 * tower + rows] * 2
    # MagMax's merge is not the last fine-tuned model: the two rows differ after task 1.
    assert results["magmax"]["acc_matrix"] != results["seq_ft"]["acc_matrix"]


def test_prepare_cli_exit_codes(tmp_path):
    """`python -m trm_jax.prepare`: a table and exit 1 when the run cannot start, exit 0
    on the embedded default (its data ship with the machine's packages)."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "trm_jax.prepare", "--nofetch"]
    paper = [
        "--config",
        os.path.join(ROOT, "configs/paper.py:cifar100,10"),
        "--config.data.download=False",
        f"--config.data.data_dir={tmp_path / 'no_tfds'}",
    ]
    bad = subprocess.run(cmd + paper, cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "| weights hf:openai/clip-vit-base-patch16 | **missing**" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("cannot start: ")
    good = subprocess.run(
        [*cmd, "--config", os.path.join(ROOT, "configs/tiny.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stdout + good.stderr[-2000:]
    assert "ready: every item the run needs is in place" in good.stdout
