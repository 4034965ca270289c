r"""Tune TRM's objective weights on the VALIDATION split (never the test split).

    python experiments/sweep_trm.py --config configs/default.py --workdir runs/sweep_trm \
        --seeds 0 --consistency 0.3,1,3 --responsiveness 0.01,0.1,1

Every combination of the weight lists runs TRM with ``eval.split = 'val'`` in
``<workdir>/<tag>``; ``<workdir>/sweep.md`` lists validation last accuracy, average
incremental accuracy, forgetting and onset gradient norm per combination (mean over
seeds), best first. Non-zero weights share one compiled merge step (the weights are
inputs of the jitted step), so a grid costs little more than one run per point.
``--results_name=NAME`` also writes the table to ``docs/results/NAME.md`` with the
command, commit, machine and date (``experiments/results.py``). ``--config.x=y``
overrides apply to every run (for instance ``--config.merge.trm.align=distill``).
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_SEEDS = flags.DEFINE_string("seeds", "0", "Comma-separated seeds.")
_ALIGN = flags.DEFINE_string("align", "1", "Weights of the task-alignment term.")
_CONSISTENCY = flags.DEFINE_string("consistency", "0.3,1,3", "Weights of prediction consistency.")
_RESPONSIVENESS = flags.DEFINE_string(
    "responsiveness", "0.01,0.1,1", "Weights of gradient responsiveness."
)
_REG = flags.DEFINE_string("reg", "0.01", "Weights of the ||alpha - alpha_init||^2 term.")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache", "~/.cache/trm_jax/jax_cache", "Persistent compilation cache ('' = off)."
)
_RESULTS_NAME = flags.DEFINE_string(
    "results_name", "", "Also write docs/results/<name>.md ('' = workdir only)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv):
    del argv
    from trm_jax import runner, runtime

    runtime.enable_compilation_cache(_JAX_CACHE.value)
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in _SEEDS.value.split(",") if s]
    grid = list(
        itertools.product(
            _floats(_ALIGN.value),
            _floats(_CONSISTENCY.value),
            _floats(_RESPONSIVENESS.value),
            _floats(_REG.value),
        )
    )
    os.makedirs(_WORKDIR.value, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for align, cons, resp, reg in grid:
        recs = []
        for seed in seeds:
            cfg = _CONFIG.value.copy_and_resolve_references()
            cfg.unlock()
            cfg.merge.method = "trm"
            cfg.seed = seed
            cfg.eval.split = "val"
            cfg.debug.progress = False
            w = cfg.merge.trm.weights
            w.align, w.consistency, w.responsiveness, w.reg = align, cons, resp, reg
            tag = f"a{align:g}_c{cons:g}_r{resp:g}_g{reg:g}_s{seed}"
            t0 = time.perf_counter()
            recs.append(runner.run(cfg, os.path.join(_WORKDIR.value, tag)))
            print(
                f"{tag}: val last acc {recs[-1]['last_accuracy']:.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )

        def mean(key, recs=recs):
            vals = [np.nanmean(np.asarray(r[key], float)) for r in recs]
            return float(np.mean(vals))

        rows.append(
            (
                align,
                cons,
                resp,
                reg,
                mean("last_accuracy"),
                mean("avg_incremental_accuracy"),
                mean("forgetting"),
                mean("onset_grad_norm"),
            )
        )
    rows.sort(key=lambda r: -r[4])
    trm_cfg = _CONFIG.value.merge.trm
    lines = [
        f"TRM weight sweep on the validation split, seeds {seeds} (mean over seeds), "
        f"{len(grid)} points, {time.perf_counter() - t_all:.0f}s; align "
        f"`{trm_cfg.align}`, lam {trm_cfg.lam:g}, {trm_cfg.steps} steps at lr "
        f"{trm_cfg.learning_rate:g}; best first.",
        "",
        "| align | consistency | responsiveness | reg | val last acc (%) | val avg inc acc (%) "
        "| val forgetting (%) | onset grad norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, c, r, g, last, inc, fgt, onset in rows:
        lines.append(
            f"| {a:g} | {c:g} | {r:g} | {g:g} | {100 * last:.2f} | {100 * inc:.2f} "
            f"| {100 * fgt:.2f} | {onset:.4g} |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(_WORKDIR.value, "sweep.md"), "w") as f:
        f.write(text)
    if _RESULTS_NAME.value:
        import results

        results.write(_RESULTS_NAME.value, text)
    print(text)


if __name__ == "__main__":
    app.run(main)
