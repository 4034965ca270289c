"""End-to-end runs of the task loop on a 2-task tiny config (capped Fashion-MNIST)."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from configs_util import FMNIST, ROOT, tiny_config

from trm_jax import models, report, runner
from trm_jax.errors import ConfigError
from trm_jax.runner import methods, pretrain, setup

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST IDX not installed")


def _bytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs shared by several tests: method -> (workdir, metrics)."""
    out = {}
    root = tmp_path_factory.mktemp("runs")
    for method, chain in (("trm", "merged"), ("magmax", "finetuned"), ("seq_ft", "merged")):
        wd = str(root / method)
        cfg = tiny_config(**{"merge.method": method, "merge.chain": chain})
        out[method] = (wd, cfg, runner.run(cfg, wd))
    return out


@pytest.mark.parametrize("method", ["trm", "magmax", "seq_ft"])
def test_end_to_end_outputs(runs, method):
    wd, cfg, metrics = runs[method]
    with open(os.path.join(wd, "metrics.json")) as f:
        saved = json.load(f)
    for key in report.PUBLIC_KEYS:
        assert key in saved, key
    assert saved["method"] == method and saved["seed"] == 0
    acc = saved["acc_matrix"]
    assert len(acc) == 2 and acc[0][1] is None
    vals = [acc[0][0], acc[1][0], acc[1][1]]
    assert all(0.0 <= v <= 1.0 for v in vals)
    # Last accuracy is the test-size-weighted mean of the last row.
    sizes = np.asarray(saved["task_sizes"], float)
    np.testing.assert_allclose(
        saved["last_accuracy"], (np.asarray(acc[1]) * sizes).sum() / sizes.sum()
    )
    assert len(saved["onset_grad_norm"]) == 1 and saved["onset_grad_norm"][0] > 0
    assert len(saved["merge_seconds"]) == 2 and len(saved["finetune_seconds"]) == 2
    assert sorted(saved["class_order"]) == list(range(10))
    for name in ("report.md", "acc_matrix.png", "config.json"):
        assert os.path.exists(os.path.join(wd, name)), name
    # stored_bytes: theta0 + merged + frozen head rows (+ the method's merge state).
    theta0 = models.build(cfg.model, key=jax.random.key(0)).params
    rows = 10 * 16 * 4
    base = 2 * _bytes(theta0) + rows
    expected = {
        "trm": base,
        "seq_ft": base,
        # chain 'finetuned' keeps theta_t too; the running max is float32 + a counter.
        "magmax": base + _bytes(theta0) + _bytes(theta0) + 4,
    }[method]
    assert saved["stored_bytes"] == [expected, expected]


def test_resume_after_interruption_equals_uninterrupted(runs, tmp_path):
    _, cfg, full = runs["magmax"]
    wd = str(tmp_path / "resumed")
    cfg = cfg.copy_and_resolve_references()
    cfg.debug.stop_after_task = 1
    assert runner.run(cfg, wd) == {"stopped_after_task": 1}
    assert not os.path.exists(os.path.join(wd, "metrics.json"))
    changed = cfg.copy_and_resolve_references()
    changed.train.lr = 0.5
    with pytest.raises(ConfigError, match=r"different config \[train.lr"):
        runner.run(changed, wd)
    cfg.debug.stop_after_task = 0  # debug fields do not count as a config change
    resumed = runner.run(cfg, wd)
    np.testing.assert_array_equal(
        np.asarray(resumed["acc_matrix"], float), np.asarray(full["acc_matrix"], float)
    )
    np.testing.assert_array_equal(resumed["task_aware_matrix"], full["task_aware_matrix"])
    np.testing.assert_allclose(resumed["onset_grad_norm"], full["onset_grad_norm"], rtol=1e-6)
    assert resumed["stored_bytes"] == full["stored_bytes"]


def test_data_parallel_mesh_matches_single_device(runs, tmp_path):
    """The same run on the 8 fake CPU devices (batch split over a ('data', 'fsdp') mesh)
    gives the single-device accuracies up to float summation order."""
    assert jax.device_count() == 8
    _, cfg, single = runs["magmax"]
    cfg = cfg.copy_and_resolve_references()
    cfg.mesh.data = -1
    multi = runner.run(cfg, str(tmp_path / "mesh"))
    a = np.asarray(multi["acc_matrix"], float)
    b = np.asarray(single["acc_matrix"], float)
    np.testing.assert_allclose(a, b, atol=2.5 / min(multi["task_sizes"]))
    np.testing.assert_allclose(multi["onset_grad_norm"], single["onset_grad_norm"], rtol=1e-3)


def test_zeroshot_equals_nearest_prototype_and_pretrain_cache(tmp_path):
    """zeroshot = theta_0 + prototype rows: its accuracy matrix must equal a numpy
    nearest-class-mean classifier on theta_0 features. Pre-training is cached."""
    cache = str(tmp_path / "cache")
    cfg = tiny_config(
        **{
            "merge.method": "zeroshot",
            "pretrain.enabled": True,
            "pretrain.cache_dir": cache,
            "pretrain.data.max_train_per_class": 20,
        }
    )
    m1 = runner.run(cfg, str(tmp_path / "a"))
    (entry,) = os.listdir(cache)
    stamp = os.path.getmtime(os.path.join(cache, entry))
    m2 = runner.run(cfg, str(tmp_path / "b"))
    assert os.listdir(cache) == [entry] and os.path.getmtime(os.path.join(cache, entry)) == stamp
    np.testing.assert_array_equal(
        np.asarray(m1["acc_matrix"], float), np.asarray(m2["acc_matrix"], float)
    )

    from trm_jax import data

    model = setup.build_model(cfg)
    theta0 = pretrain.pretrain(cfg, model)
    assert not np.allclose(
        np.asarray(jax.tree.leaves(theta0)[0]),
        np.asarray(jax.tree.leaves(model.backbone.params)[0]),
    )
    stream = data.load_stream(cfg.data)

    def feats(x):
        f = setup.features_all(model, theta0, x, 64)
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    means = {}
    for t in range(2):
        x, y = stream.split("train", t)
        f = feats(x)
        for c in np.unique(y):
            mu = f[y == c].mean(0)
            means[int(c)] = mu / np.linalg.norm(mu)
    for t in range(2):
        seen = np.concatenate(stream.task_classes[: t + 1])
        for j in range(t + 1):
            x, y = stream.split("test", j)
            sims = feats(x) @ np.stack([means[int(c)] for c in seen]).T
            ref = (seen[sims.argmax(-1)] == y).mean()
            np.testing.assert_allclose(m1["acc_matrix"][t][j], ref, atol=1e-6)


@pytest.mark.parametrize("method", ["lwf", "ewc", "joint", "magmax_linear_head"])
def test_regularisation_joint_and_linear_head_run(tmp_path, method):
    over = {"merge.method": method}
    if method == "magmax_linear_head":
        over = {"merge.method": "magmax", "model.head": "linear"}
    m = runner.run(tiny_config(**over), str(tmp_path / method))
    acc = np.asarray(m["acc_matrix"], float)
    assert np.all((acc[np.tril_indices(2)] >= 0) & (acc[np.tril_indices(2)] <= 1))
    assert len(m["onset_grad_norm"]) == 1 and np.isfinite(m["onset_grad_norm"][0])
    if method == "magmax_linear_head":  # the trained rows persist: C x D weights + C biases
        theta0 = models.build(tiny_config().model, key=jax.random.key(0)).params
        rows = 10 * 16 * 4
        assert m["stored_bytes"][0] == 2 * _bytes(theta0) + 2 * rows + 10 * 4 + _bytes(theta0) + 4


def test_unknown_method_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown merge.method 'nope'; choices: .*magmax.*trm"):
        runner.run(tiny_config(**{"merge.method": "nope"}), str(tmp_path))


def _load_config(name: str):
    path, _, arg = name.partition(":")
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, f"configs/{path}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


@pytest.mark.parametrize(
    "name",
    ["default", "tiny", "paper", "paper:cifar100,20", "paper:imagenet_r,10", "paper:cars196,10"],
)
def test_configs_load_and_declare_every_section(name):
    c = _load_config(name)
    for section in ("data", "model", "train", "merge", "pretrain", "cl", "eval", "mesh", "debug"):
        assert section in c, section
    assert c.merge.method in methods.choices()
    assert c.model.head in ("prototype", "zeroshot", "linear")


def test_paper_config_arguments():
    """One parameterised config replaces the five copies: benchmark, tasks, epochs."""
    c = _load_config("paper:cub200,10")
    assert (c.data.name, c.data.num_tasks, c.train.epochs) == ("cub200", 10, 30)
    c = _load_config("paper:cifar100,20,5")
    assert (c.data.name, c.data.num_tasks, c.train.epochs) == ("cifar100", 20, 5)
    with pytest.raises(ConfigError, match="benchmark"):
        _load_config("paper:mnist,5")


def test_paper_config_without_data_fails_with_one_line(tmp_path):
    from trm_jax.errors import TRMError

    c = _load_config("paper:cifar100,10")
    c.data.download = False  # no network here: TFDS must not try
    c.data.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(TRMError) as err:
        runner.run(c, str(tmp_path / "run"))
    assert "\n" not in str(err.value) and "cifar100" in str(err.value)
