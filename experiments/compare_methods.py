r"""Run several methods x seeds on one config and write the comparison table + plot.

    python experiments/compare_methods.py --config configs/default.py \
        --methods zeroshot,seq_ft,average,task_arithmetic,ties,magmax,trm,joint \
        --seeds 0,1,2 --workdir runs/compare

A method is a ``merge.method`` name, optionally with a chain: ``magmax@finetuned`` is MagMax
as published (each task starts from the previous fine-tuned model) next to ``magmax``
under the config's chain (TRM's ``merged``); the row is labelled with the spec.

Each (method, seed) runs in ``<workdir>/<method>_s<seed>`` (a finished run is reused, an
interrupted one resumes); the pre-trained theta_0 comes from the shared cache, so it is
trained once. Writes ``<workdir>/compare.md`` (mean ± std over seeds of last accuracy,
average incremental accuracy, forgetting, onset gradient norm, merge seconds, wall
seconds per run) and ``<workdir>/compare.png``. ``--config.x=y`` overrides apply to
every run. With ``--results_name=NAME`` the table and the plot are also written to
``docs/results/NAME.md`` / ``.png`` with the command, commit, machine and date
(``experiments/results.py``); the README's headline is ``compare_default``:

    python experiments/compare_methods.py --config configs/default.py --seeds 0,1,2 \
        --workdir runs/compare_default --results_name=compare_default
"""

from __future__ import annotations

import os
import sys
import time

import results
from absl import app, flags, logging
from ml_collections import config_flags

# Every method of the library, the published MagMax protocol beside TRM's chain.
DEFAULT_METHODS = (
    "zeroshot",
    "seq_ft",
    "lwf",
    "ewc",
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    "randmix",
    "magmax",
    "magmax@finetuned",
    "magmax_ind",
    "opcm",
    "became",
    "tunable_magmax",
    "pam",
    "cmm",
    "trm",
    "joint",
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_METHODS = flags.DEFINE_string(
    "methods",
    ",".join(DEFAULT_METHODS),
    "Comma-separated merge.method values, each optionally '@<chain>' (magmax@finetuned).",
)
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache", "~/.cache/trm_jax/jax_cache", "Persistent compilation cache ('' = off)."
)
_RESULTS_NAME = flags.DEFINE_string(
    "results_name", "", "Also write docs/results/<name>.md and .png ('' = workdir only)."
)
flags.mark_flags_as_required(["config", "workdir"])

WALL_COLUMN = ("wall_seconds", "wall s / run", 1.0, ".3g")


def run_all(config, methods, seeds, workdir):
    rows = []
    for spec in methods:
        method, _, chain = spec.partition("@")
        for seed in seeds:
            cfg = config.copy_and_resolve_references()
            cfg.unlock()
            cfg.merge.method = method
            if chain:
                cfg.merge.chain = chain
            cfg.seed = seed
            cfg.debug.progress = False
            wd = os.path.join(workdir, f"{spec.replace('@', '_')}_s{seed}")
            record, wall = results.timed_run(cfg, wd)
            record = dict(record, method=spec, wall_seconds=wall)
            rows.append(record)
            print(
                f"{spec} seed {seed}: last acc {record['last_accuracy']:.4f} "
                f"avg inc {record['avg_incremental_accuracy']:.4f} wall {wall:.1f}s",
                flush=True,
            )
    return rows


def main(argv):
    del argv
    from trm_jax import report
    from trm_jax.errors import TRMError
    from trm_jax.runtime import enable_compilation_cache

    enable_compilation_cache(_JAX_CACHE.value)
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    methods = [m for m in _METHODS.value.split(",") if m]
    seeds = [int(s) for s in _SEEDS.value.split(",") if s]
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rows = run_all(_CONFIG.value, methods, seeds, workdir)
    except (TRMError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
    columns = (*report.COMPARE_COLUMNS, WALL_COLUMN)
    table = report.compare_table(rows, columns)
    total = time.perf_counter() - t0
    run_total = sum(r["wall_seconds"] for r in rows)
    cfg = _CONFIG.value
    text = (
        f"Methods x seeds {seeds} on `{cfg.data.name}` ({cfg.data.num_tasks} tasks, "
        f"head `{cfg.model.head}`, chain `{cfg.merge.chain}`, split `{cfg.eval.split}`); "
        f"mean ± std over seeds. Wall: {total:.0f}s for this call, {run_total:.0f}s summed "
        "over the runs (a run reused from the workdir keeps the time it took when it ran; "
        "merge and wall seconds include first-call compilation).\n\n"
        f"{table}"
    )
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write(text)
    report.compare_plot(rows, os.path.join(workdir, "compare.png"))
    if _RESULTS_NAME.value:
        results.write(_RESULTS_NAME.value, text, png=lambda path: report.compare_plot(rows, path))
    print(text)


if __name__ == "__main__":
    app.run(main)
