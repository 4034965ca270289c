"""The class-incremental task loop: fine-tune -> merge -> evaluate -> checkpoint -> report.

    from trm_jax import continual
    from configs import default
    metrics = continual.run(default.get_config(), "runs/demo")

For task t (method.md section 2): start from theta_bar_{t-1} (chain ``merged``) or from
theta_{t-1} (chain ``finetuned``); fine-tune on D_t keeping K trajectory snapshots; merge
with ``config.merge.method``; evaluate the merged model on the test data of tasks 1..t
(task-agnostic and task-aware); record the onset gradient norm (mean ||grad L|| over
the first S steps of task t+1, started from theta_bar_t); checkpoint; and at the end
write ``metrics.json``, ``report.md`` and the plots.

Resume: every task ends with a checkpoint of everything that persists between tasks
(the merged model, the chain start, the head, the method's merge state) plus the
metrics so far. All randomness derives from (seed, task, step), so re-running an
interrupted task from the last checkpoint replays it exactly. A workdir whose
``config.json`` differs from the requested config is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trm_jax import (
    baselines_cl,
    checkpointing,
    data,
    merging,
    metrics,
    models,
    report,
    sharding,
    train,
)
from trm_jax.data import pipeline
from trm_jax.errors import ConfigError, TrainingError
from trm_jax.merging import task_vectors as tvlib
from trm_jax.models import heads as heads_lib

PyTree = Any

# Merge rules with an exact O(1)-storage running form (merging.running).
RUNNING_RULES = ("average", "task_arithmetic", "magmax")
CHAINS = ("finetuned", "merged")
# Config sections that do not change the result (excluded from the workdir check).
VOLATILE_FIELDS = ("debug",)


def method_choices() -> list[str]:
    """Every value ``config.merge.method`` accepts."""
    return sorted(set(merging.MERGERS) | {"trm"} | set(baselines_cl.METHODS))


def debug_config() -> ml_collections.ConfigDict:
    """Run-control fields that do not change results (ignored by the workdir check)."""
    c = ml_collections.ConfigDict()
    c.stop_after_task = 0  # > 0: return after checkpointing this many tasks (tests)
    c.progress = True  # tqdm progress bars
    return c


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.split = "test"  # test | val (sweeps tune on val, never test)
    c.batch_size = 256
    return c


def pretrain_config() -> ml_collections.ConfigDict:
    """Pre-training of theta_0 on an offline dataset disjoint from the stream."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.data = data.default_config()
    c.train = train.default_config()
    c.seed = 0
    c.cache_dir = "~/.cache/trm_jax/pretrain"  # keyed by a hash of (pretrain, model) config
    return c


def cl_config() -> ml_collections.ConfigDict:
    """Weights of the regularisation baselines (method.md section 5)."""
    c = ml_collections.ConfigDict()
    c.lwf_lambda = 0.3
    c.lwf_temperature = 2.0
    c.ewc_lambda = 1e6
    c.ewc_batches = 10  # batches used for the diagonal Fisher
    return c


# ----------------------------------------------------------------------------- helpers


def enable_compilation_cache(path: str) -> None:
    """Turn on JAX's persistent compilation cache at ``path`` ('' = leave it off).

    Called by the entry points (never at import): repeated runs then skip most XLA
    compilation, which dominates short CPU runs (TRM's second-order steps compile once
    per task shape)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write ``config.json``, or refuse a workdir that holds a different config."""
    os.makedirs(workdir, exist_ok=True)
    checkpointing.config_guard(workdir, config_json(config), ignore=VOLATILE_FIELDS)


def tree_bytes(tree: PyTree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _seed(*parts: int) -> int:
    """A 31-bit integer seed from (seed, task, ...), stable across runs."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _key(seed: int, *parts: int) -> jax.Array:
    k = jax.random.key(seed)
    for p in parts:
        k = jax.random.fold_in(k, p)
    return k


def _train_batches(images, labels, batch_size, seed) -> Iterator[dict]:
    """Endless shuffled batches, epoch after epoch (deterministic for ``seed``)."""
    epoch = 0
    while True:
        yield from pipeline.batches(
            images, labels, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True
        )
        epoch += 1


@dataclasses.dataclass
class Model:
    """The backbone plus the jitted functions built once per run."""

    backbone: Any
    preprocess: Any
    logits_fn: Any
    predict: Any
    features: Any  # jitted (backbone_params, uint8 images) -> features


class Placement:
    """Where arrays live: nowhere special on one device; on a ``config.mesh`` mesh
    otherwise (parameters per ``sharding.shard_params``, batches split over the batch
    axes, heads replicated). jit then runs data-parallel (and FSDP) with no change to
    the step functions."""

    def __init__(self, mesh_config: ml_collections.ConfigDict):
        self.cfg = mesh_config
        single = mesh_config.data == 1 and mesh_config.fsdp == 1
        self.mesh = None if single or jax.device_count() == 1 else sharding.make_mesh(mesh_config)

    def params(self, tree):
        return tree if self.mesh is None else sharding.shard_params(tree, self.mesh, self.cfg)

    def replicate(self, tree):
        return tree if self.mesh is None else sharding.replicate(tree, self.mesh)

    def batch(self, batch: dict) -> dict:
        return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh)

    def batches(self, it: Iterator[dict]) -> Iterator[dict]:
        return it if self.mesh is None else map(self.batch, it)

    def images(self, images):
        return images if self.mesh is None else self.batch({"image": images})["image"]


_CACHE: dict[str, Any] = {}  # jitted functions reused across runs of one process


def _cache_key(*parts) -> str:
    return json.dumps(
        [p.to_dict() if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str
    )


def build_model(config: ml_collections.ConfigDict) -> Model:
    """The backbone (random init or checkpoint) and its jitted functions. The jitted
    functions are cached per process and model config, so several runs in one process
    (compare_methods, tests) compile them once."""
    backbone = models.build(config.model, key=_key(config.seed, 7))
    ck = _cache_key("model", config.model)
    if ck not in _CACHE:
        preprocess = pipeline.make_preprocess(
            backbone.image_size, backbone.channels, backbone.normalization
        )
        logits_fn = train.make_logits_fn(
            backbone.features_fn, config.model.head, config.model.head_scale
        )
        feats = jax.jit(lambda p, x: backbone.features_fn(p, preprocess(x, None, train=False)))
        _CACHE[ck] = (preprocess, logits_fn, train.make_predict_fn(logits_fn, preprocess), feats)
    preprocess, logits_fn, predict, feats = _CACHE[ck]
    return Model(backbone, preprocess, logits_fn, predict, feats)


def make_step(config, model: Model, tcfg, loss_kwargs: dict, head: str | None = None):
    """(optimizer, loss_fn, jitted step) for ``tcfg`` and the loss terms, cached."""
    ck = _cache_key("step", config.model, tcfg, loss_kwargs, head)
    if ck not in _CACHE:
        logits_fn = model.logits_fn
        if head is not None:
            logits_fn = train.make_logits_fn(model.backbone.features_fn, head, 1.0)
        loss_fn = train.make_loss_fn(
            logits_fn, label_smoothing=tcfg.label_smoothing, dtype=tcfg.dtype, **loss_kwargs
        )
        opt = train.make_optimizer(tcfg)
        step = train.make_train_step(
            loss_fn,
            opt,
            model.preprocess,
            lr=tcfg.lr,
            warmup_steps=tcfg.warmup_steps,
            augment=tcfg.augment,
            grad_accum=tcfg.grad_accum,
        )
        _CACHE[ck] = (opt, loss_fn, step, logits_fn)
    return _CACHE[ck]


def features_all(model: Model, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    n, out = len(images), []
    for s in range(0, n, batch_size):
        chunk = images[s : s + batch_size]
        m = len(chunk)
        if m < batch_size:
            chunk = np.concatenate(
                [chunk, np.zeros((batch_size - m, *chunk.shape[1:]), chunk.dtype)]
            )
        out.append(np.asarray(model.features(params, chunk))[:m])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- pre-training


def pretrain_cache_path(config: ml_collections.ConfigDict) -> str:
    """Cache file of theta_0, keyed by the pre-training and backbone config."""
    model = config.model.to_dict()
    for k in ("head", "head_scale", "zeroshot_head", "templates"):
        model.pop(k, None)
    blob = json.dumps(
        {
            "pretrain": {k: v for k, v in config.pretrain.to_dict().items() if k != "cache_dir"},
            "model": model,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(config.pretrain.cache_dir), f"theta0_{digest}")


def pretrain(config: ml_collections.ConfigDict, model: Model) -> PyTree:
    """theta_0: the backbone pre-trained with a linear head on ``config.pretrain.data``
    (cached; a second call with the same config loads the cache)."""
    path = pretrain_cache_path(config)
    init = models.build(config.model, key=_key(config.pretrain.seed, 7)).params
    if os.path.isdir(path):
        _log(f"pre-train: reusing cached theta_0 {path}")
        return checkpointing.load_params(path, like=init)
    pcfg = config.pretrain
    stream = data.load_stream(pcfg.data)
    tasks = list(range(stream.num_tasks))
    images, labels = stream.split("train", tasks)
    c = stream.num_classes
    d = model.backbone.feature_dim
    k = _key(pcfg.seed, 11)
    params = {
        "backbone": init,
        "head": {
            "w": 0.01 * jax.random.normal(k, (c, d), jnp.float32),
            "b": jnp.zeros((c,), jnp.float32),
        },
    }
    opt, _, step, logits_fn = make_step(config, model, pcfg.train, {}, head="linear")
    num_steps = train.steps_per_task(len(labels), pcfg.train)
    ctx = {"train_mask": jnp.ones((c,), bool)}
    res = train.finetune(
        step,
        train.init_state(params, opt, num_steps),
        _train_batches(images, labels, pcfg.train.batch_size, _seed(pcfg.seed, 99)),
        num_steps,
        key=_key(pcfg.seed, 12),
        ctx=ctx,
        task="pretrain",
        desc="pre-train",
        progress=config.debug.progress,
    )
    theta0 = res.state.params["backbone"]
    msg = (
        f"pre-train: {num_steps} steps in {res.seconds:.1f}s, "
        f"final loss {res.losses[-5:].mean():.4f}"
    )
    try:
        vi, vl = stream.split("val", tasks)
        if len(vl):
            predict = train.make_predict_fn(logits_fn, model.preprocess)
            logits = train.predict_all(predict, res.state.params, ctx, vi, config.eval.batch_size)
            msg += f", val accuracy {(logits.argmax(-1) == vl).mean():.4f}"
    except Exception:  # noqa: BLE001  (a pre-training set without a val split is fine)
        pass
    _log(msg)
    checkpointing.save_params(path, theta0)
    return theta0


# ----------------------------------------------------------------------------- heads


def initial_head(config, model: Model, stream, theta0) -> tuple[PyTree, PyTree]:
    """(frozen rows [C, D] or None, trainable head params) at the start of the stream."""
    c, d = stream.num_classes, model.backbone.feature_dim
    kind = config.model.head
    if kind == "zeroshot":
        rows = models.zeroshot_head(model.backbone, list(stream.class_names), config.model)
        rows = jnp.asarray(rows, jnp.float32)
        if rows.shape != (c, d):
            raise ConfigError(
                f"zero-shot head has shape {tuple(rows.shape)}, expected ({c}, {d}) for {c} classes"
            )
        return rows, {}
    if kind == "prototype":
        return jnp.zeros((c, d), jnp.float32), {}
    return jnp.zeros((c, d), jnp.float32), {
        "w": jnp.zeros((c, d), jnp.float32),
        "b": jnp.zeros((c,), jnp.float32),
    }


def add_task_rows(config, model: Model, theta0, rows, head, images, labels, classes):
    """Prototype rows (mean theta_0 feature of each new class) for ``classes``; for the
    linear head they also initialise the trainable rows (scaled like the cosine head)."""
    if config.model.head == "zeroshot":
        return rows, head
    feats = features_all(model, theta0, images, config.eval.batch_size)
    proto = np.asarray(heads_lib.prototype_rows(feats, labels, np.asarray(classes)), np.float32)
    rows = rows.at[np.asarray(classes)].set(proto)
    if config.model.head == "linear":
        head = {
            "w": head["w"].at[np.asarray(classes)].set(proto * config.model.head_scale),
            "b": head["b"],
        }
    return rows, head


# ----------------------------------------------------------------------------- merging


def merge_hparams(config, t: int) -> dict:
    """The rule's keyword hparams; random rules get a key folded with the task index."""
    return merging.hparams_for(
        config.merge.method, config.merge, key=_key(config.merge.seed, 1000 + t)
    )


def rule_merge(config, theta0, merge_state, theta_t, t: int):
    """Update the method's merge state with tau_t = theta_t - theta_0 and return
    (merged params, new state). Running rules keep O(1) state (``merging.running``),
    the rest keep every task vector (that storage is counted in ``stored_bytes``)."""
    name = config.merge.method
    tau = tvlib.task_vector(theta_t, theta0)
    hp = merge_hparams(config, t)
    if name in RUNNING_RULES:
        state = merging.running.init(name, theta0) if merge_state is None else merge_state
        state = merging.running.update(state, tau)
        return merging.running.result(theta0, state, **hp), state
    tvs = [tau] if merge_state is None else [*merge_state, tau]
    return merging.get(name)(theta0, tvs, **hp), tvs


def apply_include_exclude(config, merged, fallback):
    inc, exc = config.merge.include, config.merge.exclude
    if not inc and not exc:
        return merged
    mask = tvlib.name_mask(merged, inc or None, exc or None)
    return tvlib.masked(merged, fallback, mask)


def _preprocessed_batches(
    model: Model, images, labels, batch_size, seed, place: Placement | None = None
) -> Iterator[dict]:
    ck = _cache_key(
        "prep", model.backbone.image_size, model.backbone.channels, model.backbone.normalization
    )
    if ck not in _CACHE:
        preprocess = model.preprocess
        _CACHE[ck] = jax.jit(lambda x: preprocess(x, None, train=False))
    prep = _CACHE[ck]
    for b in _train_batches(images, labels, batch_size, seed):
        out = {"image": prep(b["image"]), "label": jnp.asarray(b["label"])}
        yield place.batch(out) if place is not None else out


def _trm_apply_fn(config, model: Model):
    """``apply_fn(tree, images)`` for ``trm.merge`` over ``{'backbone', 'rows', 'head'}``.

    The head (frozen rows, linear rows) travels inside the merged tree behind a
    ``stop_gradient``, instead of being closed over: the function object is then the
    same for every task and seed of a process, so TRM's jitted steps are reused, and the
    head gets no gradient (its directions are zero: it is identical in theta_0, the
    previous model and every snapshot, so the merge returns it unchanged)."""
    ck = _cache_key("trm_apply", config.model)
    if ck not in _CACHE:
        logits_fn = model.logits_fn

        def apply_fn(tree, images):
            head = jax.lax.stop_gradient(tree["head"])
            rows = jax.lax.stop_gradient(tree["rows"])
            return logits_fn({"backbone": tree["backbone"], "head": head}, images, {"rows": rows})

        _CACHE[ck] = apply_fn
    return _CACHE[ck]


def trm_merge(
    config,
    model,
    theta0,
    previous,
    snapshots,
    head,
    rows,
    images,
    labels,
    task_classes,
    old_classes,
    t,
    place: Placement | None = None,
    progress: str | None = None,
):
    """theta_bar_t by TRM over the task's snapshots (method.md section 3)."""

    def wrap(bb):
        return {"backbone": bb, "rows": rows, "head": head}

    bs = config.merge.batch_size or config.train.batch_size
    merged, info = merging.trm.merge(
        _trm_apply_fn(config, model),
        wrap(theta0),
        wrap(previous),
        [wrap(s) for s in snapshots],
        _preprocessed_batches(model, images, labels, bs, _seed(config.seed, t, 3), place),
        task_classes=np.asarray(task_classes),
        old_classes=np.asarray(old_classes),
        config=config.merge.trm,
        progress=progress,
    )
    return merged["backbone"], info


# ----------------------------------------------------------------------------- the run


def _validate(config) -> None:
    choices = method_choices()
    if config.merge.method not in choices:
        raise ConfigError(
            f"unknown merge.method '{config.merge.method}'; choices: {', '.join(choices)}"
        )
    if config.merge.chain not in CHAINS:
        raise ConfigError(
            f"unknown merge.chain '{config.merge.chain}'; choices: {', '.join(CHAINS)}"
        )
    if config.model.head not in train.HEAD_KINDS:
        raise ConfigError(
            f"unknown model.head '{config.model.head}'; choices: {', '.join(train.HEAD_KINDS)}"
        )
    if config.train.dtype not in train.DTYPES:
        raise ConfigError(
            f"unknown train.dtype '{config.train.dtype}'; choices: {', '.join(train.DTYPES)}"
        )


def _persist_like(method: str, chain_ft: bool, t_done: int, theta0, rows, head):
    """Structure of the checkpoint after ``t_done`` tasks (to restore into)."""
    tree = {"merged": theta0, "rows": rows, "head": head}
    if chain_ft:
        tree["chain"] = theta0
    if method in RUNNING_RULES:
        tree["merge_state"] = merging.running.init(method, theta0)
    elif method in merging.MERGERS:
        tree["merge_state"] = [theta0] * t_done
    elif method == "ewc":
        tree["merge_state"] = {"anchor": theta0, "fisher": theta0}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the stream of ``config`` in ``workdir`` (resuming if it holds a checkpoint);
    return the metrics dict written to ``metrics.json``."""
    _validate(config)
    check_workdir(config, workdir)
    method, mcfg, tcfg = config.merge.method, config.merge, config.train
    is_rule = method in merging.MERGERS
    is_merge = is_rule or method == "trm"
    chain_ft = is_merge and mcfg.chain == "finetuned"

    stream = data.load_stream(config.data)
    T, C = stream.num_tasks, stream.num_classes
    task_classes = [np.asarray(c) for c in stream.task_classes]
    model = build_model(config)
    theta0 = pretrain(config, model) if config.pretrain.enabled else model.backbone.params
    place = Placement(config.mesh)
    theta0 = place.params(theta0)
    rows, head = place.replicate(initial_head(config, model, stream, theta0))

    # Evaluation data of every task (kept in memory; the stream is small or sub-sampled).
    eval_sets = [stream.split(config.eval.split, t) for t in range(T)]
    task_sizes = np.asarray([len(e[1]) for e in eval_sets])

    lwf = config.cl.lwf_lambda if method == "lwf" else 0.0
    ewc = config.cl.ewc_lambda if method == "ewc" else 0.0
    loss_kwargs = {
        "lwf_lambda": lwf,
        "lwf_temperature": config.cl.lwf_temperature,
        "ewc_lambda": ewc,
    }
    opt, loss_fn, step_fn, _ = make_step(config, model, tcfg, loss_kwargs)

    # ---- resume
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
    meta = {
        "acc": [],
        "aware": [],
        "onset_grad_norm": [],
        "finetune_seconds": [],
        "merge_seconds": [],
        "stored_bytes": [],
        "merge_info": [],
        "losses": [],
    }
    merged, chain, merge_state = theta0, theta0, None
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        like = _persist_like(method, chain_ft, latest, theta0, rows, head)
        tree, meta = ckpt.restore(latest, like)
        merged, chain = (
            place.params(tree["merged"]),
            place.params(tree.get("chain", tree["merged"])),
        )
        rows, head = place.replicate((tree["rows"], tree["head"]))
        merge_state = tree.get("merge_state")
        merge_state = None if merge_state is None else place.params(merge_state)
        start = latest
        _log(f"resuming {workdir} after task {latest}/{T}")

    for t in range(start, T):
        t_wall = time.perf_counter()
        tr_images, tr_labels = stream.split("train", t)
        rows, head = add_task_rows(
            config, model, theta0, rows, head, tr_images, tr_labels, task_classes[t]
        )
        seen = np.concatenate(task_classes[: t + 1])
        old = np.concatenate(task_classes[:t]) if t else np.zeros((0,), np.int32)
        cur_mask = np.zeros(C, bool)
        cur_mask[task_classes[t]] = True
        seen_mask = np.zeros(C, bool)
        seen_mask[seen] = True
        old_mask = np.zeros(C, bool)
        old_mask[old] = True
        batch_seed = _seed(config.seed, t, 1)
        task_key = _key(config.seed, t, 2)

        # ---- start point, data and trainable params of this task
        if method == "joint":
            start_bb = theta0
            images = np.concatenate([stream.split("train", j)[0] for j in range(t + 1)])
            labels = np.concatenate([stream.split("train", j)[1] for j in range(t + 1)])
            train_mask = seen_mask
        else:
            start_bb = chain if chain_ft else merged
            images, labels = tr_images, tr_labels
            train_mask = cur_mask
        ctx = {"rows": rows, "train_mask": jnp.asarray(train_mask)}
        if method == "lwf":
            ctx["teacher"] = {"backbone": merged, "head": head}
            ctx["old_mask"] = jnp.asarray(old_mask)
        if method == "ewc":
            ms = merge_state or {"anchor": merged, "fisher": jax.tree.map(jnp.zeros_like, merged)}
            ctx["anchor"], ctx["fisher"] = ms["anchor"], ms["fisher"]
        params = {"backbone": start_bb, "head": head}
        if config.model.head == "linear":
            ctx["update_mask"] = {
                "backbone": jax.tree.map(lambda _: jnp.asarray(True), start_bb),
                "head": {"w": jnp.asarray(train_mask)[:, None], "b": jnp.asarray(train_mask)},
            }
        num_steps = train.steps_per_task(len(labels), tcfg)
        if method == "joint" and tcfg.steps > 0:
            num_steps = tcfg.steps * (t + 1)
        batches = place.batches(_train_batches(images, labels, tcfg.batch_size, batch_seed))

        # ---- onset gradient norm of this task, measured from theta_bar_{t-1}
        onset_from_run = t > 0 and method not in ("joint", "zeroshot") and not chain_ft
        if t > 0 and not onset_from_run and tcfg.onset_steps > 0:
            probe_params = {"backbone": merged, "head": head}
            probe = train.finetune(
                step_fn,
                train.init_state(probe_params, opt, num_steps),
                place.batches(_train_batches(tr_images, tr_labels, tcfg.batch_size, batch_seed)),
                tcfg.onset_steps,
                onset_steps=tcfg.onset_steps,
                key=task_key,
                ctx={**ctx, "train_mask": jnp.asarray(cur_mask)},
                task=t + 1,
                desc=f"onset probe {t + 1}",
                progress=False,
            )
            meta["onset_grad_norm"].append(probe.onset_grad_norm)

        # ---- fine-tune
        if method == "zeroshot":
            theta_t, snapshots, ft_sec = theta0, [theta0], 0.0
            losses = []
        else:
            res = train.finetune(
                step_fn,
                train.init_state(params, opt, num_steps),
                batches,
                num_steps,
                key=task_key,
                ctx=ctx,
                num_snapshots=tcfg.snapshots if method == "trm" else 1,
                onset_steps=tcfg.onset_steps,
                task=t + 1,
                desc=f"task {t + 1}/{T} {method}",
                progress=config.debug.progress,
            )
            if onset_from_run:
                meta["onset_grad_norm"].append(res.onset_grad_norm)
            theta_t, snapshots, ft_sec = res.state.params["backbone"], res.snapshots, res.seconds
            head = res.state.params["head"]
            losses = res.losses.tolist()

        # ---- merge
        t_merge = time.perf_counter()
        info = {}
        if method == "trm":
            new_merged, info = trm_merge(
                config,
                model,
                theta0,
                merged,
                snapshots,
                head,
                rows,
                tr_images,
                tr_labels,
                task_classes[t],
                old,
                t,
                place,
                progress=f"task {t + 1}/{T} TRM merge" if config.debug.progress else None,
            )
            new_merged = apply_include_exclude(config, new_merged, theta_t)
        elif is_rule:
            new_merged, merge_state = rule_merge(config, theta0, merge_state, theta_t, t)
            new_merged = apply_include_exclude(config, new_merged, theta_t)
        elif method == "ewc":
            new_merged = theta_t

            def ewc_loss(p, b, _head=head, _ctx=ctx):
                zero = jax.tree.map(jnp.zeros_like, p)
                x = model.preprocess(b["image"], None, train=False)
                return loss_fn(
                    {"backbone": p, "head": _head},
                    x,
                    b["label"],
                    {**_ctx, "anchor": p, "fisher": zero},
                )[0]

            fb = _train_batches(tr_images, tr_labels, tcfg.batch_size, _seed(config.seed, t, 4))
            fisher_t = baselines_cl.fisher_diagonal(
                ewc_loss, theta_t, (next(fb) for _ in range(config.cl.ewc_batches))
            )
            old_f = merge_state["fisher"] if merge_state else jax.tree.map(jnp.zeros_like, theta_t)
            merge_state = {"anchor": theta_t, "fisher": jax.tree.map(jnp.add, old_f, fisher_t)}
        else:  # seq_ft, lwf, joint, zeroshot
            new_merged = theta_t
        new_merged = jax.block_until_ready(new_merged)
        merge_sec = time.perf_counter() - t_merge
        try:
            tvlib.check_finite(new_merged, f"merged model of task {t + 1}")
        except ValueError as e:
            raise TrainingError(str(e) + " (checkpoints are intact)") from None
        merged = new_merged
        chain = theta_t
        del snapshots

        # ---- evaluate on every seen task
        params_eval = {"backbone": merged, "head": head}
        ev_images = np.concatenate([eval_sets[j][0] for j in range(t + 1)])
        ev_labels = np.concatenate([eval_sets[j][1] for j in range(t + 1)])
        ev_tasks = np.concatenate([np.full(len(eval_sets[j][1]), j) for j in range(t + 1)])
        logits = train.predict_all(
            model.predict,
            params_eval,
            {"rows": rows},
            ev_images,
            config.eval.batch_size,
            place=place.images,
        )
        agn, aware = train.accuracies(logits, ev_labels, ev_tasks, task_classes, seen)
        meta["acc"].append(agn.tolist())
        meta["aware"].append(aware.tolist())
        meta["finetune_seconds"].append(ft_sec)
        meta["merge_seconds"].append(merge_sec)
        meta["losses"].append(losses[-1] if losses else None)
        meta["merge_info"].append(_merge_summary(info))

        # ---- persist
        tree = {"merged": merged, "rows": rows, "head": head}
        if chain_ft:
            tree["chain"] = chain
        if merge_state is not None:
            tree["merge_state"] = merge_state
        needs_theta0 = (
            is_merge or method in ("zeroshot", "joint") or config.model.head == "prototype"
        )
        meta["stored_bytes"].append(tree_bytes(tree) + (tree_bytes(theta0) if needs_theta0 else 0))
        ckpt.save(t + 1, tree, meta)
        ckpt.wait()
        seen_acc = float((agn * task_sizes[: t + 1]).sum() / task_sizes[: t + 1].sum())
        _log(
            f"task {t + 1}/{T} {method}: acc(seen) {seen_acc:.4f} per-task "
            f"{np.round(agn, 3).tolist()} | fine-tune {ft_sec:.1f}s merge {merge_sec:.2f}s "
            f"| total {time.perf_counter() - t_wall:.1f}s"
        )
        if config.debug.stop_after_task and t + 1 >= config.debug.stop_after_task and t + 1 < T:
            ckpt.close()
            return {"stopped_after_task": t + 1}

    ckpt.close()
    return finish(config, workdir, stream, meta, task_sizes)


def _merge_summary(info: dict) -> dict:
    """The scalar part of a merge's info dict (TRM: g_ref/g_init/g_final, first and
    last value of each loss term), small enough for metrics.json."""
    out = {}
    for k, v in info.items():
        if k == "history" and isinstance(v, dict):
            for term, values in v.items():
                a = np.asarray(values, np.float64).ravel()
                if a.size:
                    out[f"{term}_first"], out[f"{term}_last"] = float(a[0]), float(a[-1])
        elif isinstance(v, int | float | np.generic) or (
            isinstance(v, jax.Array | np.ndarray) and np.ndim(v) == 0
        ):
            out[k] = float(np.asarray(v))
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        a = np.asarray(x)
        return a.item() if a.ndim == 0 else a.tolist()
    if isinstance(x, float | int | str | bool) or x is None:
        return x
    return str(x)


def finish(config, workdir, stream, meta, task_sizes) -> dict:
    """Assemble ``metrics.json`` from the per-task records and write the report."""
    T = stream.num_tasks
    acc = np.full((T, T), np.nan)
    aware = np.full((T, T), np.nan)
    for t in range(T):
        acc[t, : t + 1] = meta["acc"][t]
        aware[t, : t + 1] = meta["aware"][t]
    out = {
        "method": config.merge.method,
        "chain": config.merge.chain,
        "seed": int(config.seed),
        "class_order": [int(c) for c in np.asarray(stream.class_order)],
        "task_sizes": task_sizes.tolist(),
        "acc_matrix": acc.tolist(),
        "task_aware_matrix": aware.tolist(),
    }
    out.update(metrics.summarize(acc, task_sizes, aware))
    out.update(
        onset_grad_norm=list(meta["onset_grad_norm"]),
        finetune_seconds=list(meta["finetune_seconds"]),
        merge_seconds=list(meta["merge_seconds"]),
        stored_bytes=list(meta["stored_bytes"]),
        merge_info=meta["merge_info"],
    )
    report.write(workdir, out)
    return out
