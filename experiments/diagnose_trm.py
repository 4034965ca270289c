r"""What limits TRM? Per-task measurements of one TRM stream, and an ablation table.

    python experiments/diagnose_trm.py --config configs/fashion_digits.py \
        --workdir runs/diag_fd --out runs/diag_fd --doc docs/diagnosis.md --section fd
    python experiments/diagnose_trm.py --config configs/default.py \
        --workdir runs/diag_default --out runs/diag_default --doc docs/diagnosis.md \
        --section default

Diagnosis (``--seed``, validation split, TRM with the config's settings, chain ``merged``):
the stream runs with a plug-in (``DiagnoseTRM``, a ``runner.methods.trm.TRM`` subclass
registered as ``trm_diagnose``) whose merge is TRM's own, after which it measures, for task t:

1. how far the coefficients moved from their initial value, per direction kind
   (trajectory ``d1..dK``, history ``h``, consensus ``m``), and how far theta moved
   (``||theta_TRM - theta_init|| / ||theta_init - theta_prev||``);
2. each objective's value (unweighted) at the init point and at the result
   (``info['terms_init']`` / ``['terms_final']``), and g at the reference, init and result;
3. validation accuracy (task-agnostic over the classes seen so far) on old and on new classes,
   for theta_prev, the expert theta_t, TRM's init point (MagMax of the pair history /
   current with TRM's lambda) and TRM's merge;
4. cosine similarities between the K trajectory directions ``d_k = theta_t^(k) - theta_prev``
   and between the trajectory's increments ``theta_t^(k) - theta_t^(k-1)``;
5. the next task's start: mean gradient norm over its first S steps (the onset norm) and its
   loss (cross-entropy over its classes, on its validation images) after 0, 1, 5 and 20
   fine-tuning steps, from TRM's merge and from the init point (MagMax of the pair), with the
   run's optimiser, schedule and batches.

Ablation (``--ablations``): TRM streams on the validation split for each named variant of
``merge.trm`` (and the MagMax baseline with the same chain), mean ± std of last accuracy over
``--seeds``. A variant is ``name=field:value|field:value`` with fields under ``merge.trm``
(``weights.consistency:0``, ``directions:trajectory,consensus``, ``granularity:global``, ...);
a field starting with ``@`` is a path from the config's root (``@train.snapshots:2``).

Tables go to ``<out>/diagnosis.md`` (and, with ``--doc``, into the section between
``<!-- diag:<section> -->`` markers of that file), with the exact command.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import sys
import time

import numpy as np
import results
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directories.")
_OUT = flags.DEFINE_string("out", None, "Folder for diagnosis.md / ablation.md.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the diagnosed stream.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Seeds of the ablation runs.")
_ABLATIONS = flags.DEFINE_string(
    "ablations", "", "Semicolon-separated 'name=field:value|field:value' TRM variants ('' = none)."
)
_SKIP_DIAGNOSIS = flags.DEFINE_bool("skip_diagnosis", False, "Only run the ablation table.")
_DOC = flags.DEFINE_string("doc", "", "Markdown file whose section to (re)write ('' = none).")
_SECTION = flags.DEFINE_string("section", "", "Section name inside --doc.")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache", "~/.cache/trm_jax/jax_cache", "Persistent compilation cache ('' = off)."
)
flags.mark_flags_as_required(["config", "workdir", "out"])

NEXT_STEPS = (0, 1, 5, 20)


# ------------------------------------------------------------------------------- helpers


def _flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _cosines(vectors: list[np.ndarray]) -> np.ndarray:
    m = np.stack(vectors)
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-30)
    return m @ m.T


def _accuracies(task, backbone, head) -> dict:
    """Validation accuracy (task-agnostic over the seen classes) on old / new / all seen."""
    from trm_jax import metrics
    from trm_jax.runner import train

    stream, t = task.stream, task.t
    images, labels = stream.split("val", list(range(t + 1)))
    logits = train.predict_all(
        task.model.predict,
        {"backbone": backbone, "head": head},
        {"rows": task.rows},
        images,
        task.config.eval.batch_size,
    )
    seen = task.classes.seen
    is_new = np.isin(labels, task.classes.task)
    out = {"seen": metrics.accuracy(logits, labels, seen)}
    out["new"] = metrics.accuracy(logits[is_new], labels[is_new], seen)
    out["old"] = metrics.accuracy(logits[~is_new], labels[~is_new], seen) if t else float("nan")
    return out


def _next_task(task, step, start, head, rows, steps=NEXT_STEPS) -> dict:
    """Fine-tune task t+1 from ``start`` as the run would (its optimiser, schedule, batches,
    key): the onset norm (mean grad norm over the first S steps) and its loss on its
    validation images after each of ``steps`` steps."""
    import jax.numpy as jnp

    from trm_jax import losses
    from trm_jax.data import pipeline
    from trm_jax.runner import setup, train

    cfg, stream, t = task.config, task.stream, task.t + 1
    images, labels = stream.split("train", t)
    val_x, val_y = stream.split("val", t)
    classes = setup.ClassSets.at(stream.task_classes, t, stream.num_classes)
    rows, head = setup.add_task_rows(
        cfg, task.model, task.theta0, rows, head, images, labels, classes.task
    )
    opt, _, step_fn = step
    mask = jnp.asarray(classes.task_mask)
    ctx = {"rows": rows, "train_mask": mask}
    state = train.init_state(
        {"backbone": start, "head": head}, opt, train.steps_per_task(len(labels), cfg.train)
    )
    batches = pipeline.endless_batches(
        images, labels, cfg.train.batch_size, setup.seed_of(cfg.seed, t, 1)
    )
    key = setup.key_of(cfg.seed, t, 2)

    def val_loss(params):
        logits = train.predict_all(
            task.model.predict, params, {"rows": rows}, val_x, cfg.eval.batch_size
        )
        return float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(val_y), mask))

    out, norms = {}, []
    for i in range(max(steps) + 1):
        if i in steps:
            out[f"loss@{i}"] = val_loss(state.params)
        if i == max(steps):
            break
        state, m = step_fn(state, next(batches), key, ctx)
        if i < cfg.train.onset_steps:
            norms.append(float(m["grad_norm"]))
    out["onset"] = float(np.mean(norms)) if norms else float("nan")
    return out


def make_method():
    """The ``trm_diagnose`` plug-in: TRM's merge, then the measurements (kept in ``records``)."""
    from trm_jax.merging import trm
    from trm_jax.runner.methods.trm import TRM

    class DiagnoseTRM(TRM):
        name = "trm_diagnose"
        description = "TRM plus per-task diagnostics (experiments/diagnose_trm.py)"

        def __init__(self):
            self.records = []

        def merge(self, task, carry, finetuned):
            merged, state, info = super().merge(task, carry, finetuned)
            tcfg = task.config.merge.trm
            subspace, layout = trm.build_subspace(
                task.theta0,
                carry.merged,
                finetuned.snapshots,
                directions=tuple(tcfg.directions),
                granularity=tcfg.granularity,
                init=tcfg.init,
                lam=float(tcfg.lam),
            )
            init_point = subspace.anchor
            rec = {"task": task.t + 1}
            # 1. coefficient movement per direction kind
            # TRM's groups cover the wrapped tree; only the backbone's leaves have directions.
            groups = [g for g in info["alpha_groups"] if g.startswith("backbone")]
            alpha = np.stack([np.asarray(info["alpha_groups"][g]) for g in groups])
            delta = alpha - np.asarray(subspace.alpha_init)[:1]  # same init row for every group
            kinds = {"trajectory": [], "history": [], "consensus": []}
            for j, col in enumerate(layout.direction_names):
                kind = "history" if col == "h" else "consensus" if col == "m" else "trajectory"
                kinds[kind].append(j)
            rec["alpha"] = {
                k: {
                    "mean_abs": float(np.abs(delta[:, js]).mean()),
                    "max_abs": float(np.abs(delta[:, js]).max()),
                    "mean": float(delta[:, js].mean()),
                }
                for k, js in kinds.items()
                if js
            }
            prev, init_v, trm_v = (_flat(x) for x in (carry.merged, init_point, merged))
            rec["rel_move"] = float(
                np.linalg.norm(trm_v - init_v) / max(np.linalg.norm(init_v - prev), 1e-30)
            )
            # 2. objectives before / after
            rec["terms_init"] = info["terms_init"]
            rec["terms_final"] = info["terms_final"]
            rec["g"] = {k: info[k] for k in ("g_ref", "g_init", "g_final")}
            # 3. accuracy old / new
            head = finetuned.head
            rec["acc"] = {
                "previous": _accuracies(task, carry.merged, head),
                "expert": _accuracies(task, finetuned.theta_t, head),
                "init (MagMax pair)": _accuracies(task, init_point, head),
                "TRM": _accuracies(task, merged, head),
            }
            # 4. collinearity of the trajectory
            dirs = [_flat(s) - prev for s in finetuned.snapshots]
            points = [prev] + [_flat(s) for s in finetuned.snapshots]
            incs = [b - a for a, b in zip(points[:-1], points[1:], strict=True)]
            rec["cos_d"] = _cosines(dirs).tolist()
            rec["cos_inc"] = _cosines(incs).tolist()
            rec["norm_d"] = [float(np.linalg.norm(d)) for d in dirs]
            # 5. the next task's start, from TRM and from the init point
            if task.t + 1 < task.num_tasks:
                step = self.step(task.config, task.model)  # the run's (cached) step
                rec["next"] = {
                    "TRM": _next_task(task, step, merged, head, task.rows),
                    "init (MagMax pair)": _next_task(task, step, init_point, head, task.rows),
                }
            self.records.append(rec)
            return merged, state, info

    return DiagnoseTRM()


# ------------------------------------------------------------------------------- tables


def _fmt(x, spec=".4g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def diagnosis_text(records: list[dict], final: dict) -> str:
    out = []
    out.append(
        f"TRM stream, validation last accuracy {100 * final['last_accuracy']:.2f} % "
        f"(average incremental {100 * final['avg_incremental_accuracy']:.2f} %).\n"
    )
    rows = []
    for r in records:
        for kind, v in r["alpha"].items():
            rows.append(
                [r["task"], kind, _fmt(v["mean_abs"]), _fmt(v["max_abs"]), _fmt(v["mean"], "+.4g")]
            )
        rows.append([r["task"], "theta: rel. move", _fmt(r["rel_move"]), "", ""])
    out.append(
        "**1. Coefficient movement** |alpha - alpha_init| per direction kind (over groups "
        "and that kind's directions); last row per task: ||theta_TRM - theta_init|| / "
        "||theta_init - theta_prev||.\n"
    )
    out.append(_table(["task", "kind", "mean abs", "max abs", "mean (signed)"], rows))
    rows = []
    for r in records:
        for term in ("loss", "align", "consistency", "responsiveness", "reg"):
            a, b = r["terms_init"].get(term), r["terms_final"].get(term)
            rows.append(
                [r["task"], term, _fmt(a), _fmt(b), _fmt(None if a is None else b - a, "+.3g")]
            )
        g = r["g"]
        rows.append(
            [
                r["task"],
                "g (ref / init -> final)",
                f"{_fmt(g['g_ref'])} / {_fmt(g['g_init'])}",
                _fmt(g["g_final"]),
                _fmt(g["g_final"] - g["g_init"], "+.3g"),
            ]
        )
    out.append(
        "\n**2. Objectives** (unweighted, mean over the held evaluation batches) at the "
        "init point and after the merge.\n"
    )
    out.append(_table(["task", "term", "before", "after", "change"], rows))
    rows = []
    for r in records:
        for name, a in r["acc"].items():
            rows.append(
                [
                    r["task"],
                    name,
                    _fmt(100 * a["old"], ".2f"),
                    _fmt(100 * a["new"], ".2f"),
                    _fmt(100 * a["seen"], ".2f"),
                ]
            )
    out.append(
        "\n**3. Validation accuracy (%)**, task-agnostic over the seen classes, on the old "
        "tasks' and the new task's images.\n"
    )
    out.append(_table(["task", "model", "old classes", "new classes", "all seen"], rows))
    rows = []
    for r in records:
        k = len(r["cos_d"])
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        cd = ", ".join(f"{r['cos_d'][i][j]:.3f}" for i, j in pairs)
        ci = ", ".join(f"{r['cos_inc'][i][j]:.3f}" for i, j in pairs)
        nd = ", ".join(f"{x:.3g}" for x in r["norm_d"])
        rows.append([r["task"], cd, ci, nd])
    out.append(
        "\n**4. Trajectory collinearity**: cosines of the pairs (1,2), (1,3), ... of the K "
        "directions d_k = theta_t^(k) - theta_prev, and of the K increments "
        "theta_t^(k) - theta_t^(k-1); norms of d_k.\n"
    )
    out.append(_table(["task", "cos(d_i, d_j)", "cos(increments)", "||d_k||"], rows))
    rows = []
    for r in records:
        for name, v in r.get("next", {}).items():
            rows.append(
                [f"{r['task']} -> {r['task'] + 1}", name, _fmt(v["onset"])]
                + [_fmt(v[f"loss@{s}"]) for s in NEXT_STEPS]
            )
    out.append(
        "\n**5. The next task's start** from TRM's merge and from the init point (MagMax "
        "of the pair): onset gradient norm (mean over the first S steps) and the next "
        "task's validation loss after n fine-tuning steps.\n"
    )
    out.append(
        _table(
            ["tasks", "start", "onset grad norm"] + [f"loss after {s}" for s in NEXT_STEPS], rows
        )
    )
    return "\n".join(out)


# ------------------------------------------------------------------------------- runs


def _run(config, method, seed, workdir, trm_overrides=(), chain=None):
    from trm_jax import runner

    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    cfg.merge.method, cfg.seed = method, seed
    if chain:
        cfg.merge.chain = chain
    cfg.eval.split = "val"
    cfg.debug.progress = False
    for field, value in trm_overrides:
        node = cfg.merge.trm
        if field.startswith("@"):  # a path from the config's root, e.g. @train.snapshots
            node, field = cfg, field[1:]
        *path, leaf = field.split(".")
        for p in path:
            node = node[p]
        if isinstance(node[leaf], tuple) and not isinstance(value, tuple):
            value = (value,)  # a one-element list field (directions)
        node[leaf] = value
    t0 = time.perf_counter()
    rec = runner.run(cfg, workdir)
    return rec, time.perf_counter() - t0


def parse_value(text: str):
    """A literal (``0.3``, ``True``, ``'x'``), a comma list as a tuple, else the string."""
    if "," in text:
        return tuple(parse_value(t) for t in text.split(",") if t)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_ablations(spec: str) -> list[tuple[str, list[tuple[str, object]]]]:
    out = []
    for item in (s.strip() for s in spec.split(";")):
        if not item:
            continue
        name, _, body = item.partition("=")
        pairs = []
        for kv in (p for p in body.split("|") if p):
            field, _, value = kv.partition(":")
            pairs.append((field.strip(), parse_value(value.strip())))
        out.append((name.strip(), pairs))
    return out


def ablation_text(config, seeds, workdir) -> str:
    variants = [("default", [])] + parse_ablations(_ABLATIONS.value)
    rows = []
    base = None
    entries = [("magmax (baseline)", "magmax", [])] + [(n, "trm", p) for n, p in variants]
    for name, method, pairs in entries:
        accs, walls = [], []
        for seed in seeds:
            tag = name.replace(" ", "_").replace("(", "").replace(")", "")
            rec, wall = _run(
                config, method, seed, os.path.join(workdir, f"abl_{tag}_s{seed}"), pairs
            )
            accs.append(100 * rec["last_accuracy"])
            walls.append(wall)
            print(f"ablation {name} seed {seed}: val last acc {accs[-1]:.2f}", flush=True)
        mean, std = (
            float(np.mean(accs)),
            float(np.std(accs, ddof=1)) if len(accs) > 1 else float("nan"),
        )
        if name == "default":
            base = mean
        desc = ", ".join(f"{f}={v}" for f, v in pairs) or (
            "TRM as configured" if method == "trm" else "merge.method=magmax"
        )
        rows.append(
            [
                name,
                desc,
                len(accs),
                f"{mean:.2f}" + (f" ± {std:.2f}" if np.isfinite(std) else ""),
                mean,
            ]
        )
    lines = []
    for name, desc, n, cell, mean in rows:
        diff = "" if base is None else f"{mean - base:+.2f}"
        lines.append([name, desc, n, cell, diff])
    return _table(
        ["variant", "merge.trm overrides", "seeds", "val last acc (%)", "vs default"], lines
    )


def main(argv):
    del argv
    from trm_jax.runner import methods
    from trm_jax.runtime import enable_compilation_cache

    enable_compilation_cache(_JAX_CACHE.value)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    os.makedirs(_OUT.value, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    d = config.data
    parts = [f"#### `{d.name}` ({d.num_tasks} tasks), validation split\n\nCommand: `{command}`\n"]
    if not _SKIP_DIAGNOSIS.value:
        method = methods.register(make_method())
        t0 = time.perf_counter()
        final, _ = _run(
            config,
            "trm_diagnose",
            _SEED.value,
            os.path.join(_WORKDIR.value, f"diag_s{_SEED.value}"),
            # table 2 reports g even where the shipped config skips it (same merge)
            [("report_g", True)],
        )
        records = method.records
        with open(os.path.join(_OUT.value, "diagnosis.json"), "w") as f:
            json.dump(records, f, indent=1)
        parts.append(
            f"Diagnosis: seed {_SEED.value}, {time.perf_counter() - t0:.0f}s.\n\n"
            + diagnosis_text(records, final)
        )
    if _ABLATIONS.value or _SKIP_DIAGNOSIS.value:
        seeds = [int(s) for s in _SEEDS.value.split(",") if s]
        parts.append(
            f"\n**Ablations** (validation last accuracy, seeds {seeds}):\n\n"
            + ablation_text(config, seeds, _WORKDIR.value)
        )
    text = "\n".join(parts)
    with open(os.path.join(_OUT.value, "diagnosis.md"), "w") as f:
        f.write(text)
    if _DOC.value:
        results.write_section(_DOC.value, "diag", _SECTION.value or d.name, text)
    print(text)


if __name__ == "__main__":
    app.run(main)
