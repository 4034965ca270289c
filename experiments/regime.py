r"""The regime table of an embedded benchmark: does it behave like the paper's setting?

    python experiments/regime.py --config configs/fashion_digits.py --seeds 0,1,2 \
        --split val --workdir runs/regime_fd --doc docs/regime.md --section fd_val

Runs every entry of ``--entries`` (``method`` or ``method@chain``; default zero-shot, Seq-FT,
MagMax with both chains, TRM, joint) for every seed on ``--split`` (``val`` to design, ``test``
once at the end), each in ``<workdir>/<method>_<chain>_s<seed>`` (a finished run is reused,
with its recorded wall time). Writes ``<workdir>/regime.md``: mean ± std over seeds of last
accuracy, average incremental accuracy, forgetting, task-aware accuracy and wall seconds per
run, then the regime checks (method notes, section 10):

- Seq-FT at least 5 points below MagMax (each chain);
- MagMax at least 5 points above zero-shot (each chain);
- joint at least 8 points above MagMax (each chain).

With ``--doc`` the same text replaces the section between ``<!-- regime:<section> -->`` and
``<!-- /regime:<section> -->`` in that markdown file (appended when absent), so measured
numbers are only ever written by this script. ``--config.x=y`` overrides apply to every run
(design screens: one section per variant).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

import results
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_ENTRIES = flags.DEFINE_string(
    "entries",
    "zeroshot,seq_ft,magmax@merged,magmax@finetuned,trm,joint",
    "Comma-separated 'method' or 'method@chain' entries.",
)
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "test"], "Evaluation split.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (runs and regime.md).")
_DOC = flags.DEFINE_string("doc", "", "Markdown file whose section to (re)write ('' = none).")
_SECTION = flags.DEFINE_string("section", "", "Section name inside --doc.")
_TITLE = flags.DEFINE_string("title", "", "Heading line of the section ('' = from the config).")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache", "~/.cache/trm_jax/jax_cache", "Persistent compilation cache ('' = off)."
)
flags.mark_flags_as_required(["config", "workdir"])

COLUMNS = (
    ("last_accuracy", "last acc (%)", 100.0, ".2f"),
    ("avg_incremental_accuracy", "avg inc acc (%)", 100.0, ".2f"),
    ("forgetting", "forgetting (%)", 100.0, ".2f"),
    ("task_aware_accuracy", "task-aware acc (%)", 100.0, ".2f"),
    ("wall_seconds", "wall s / run", 1.0, ".3g"),
)
# (label, lower entry, upper entry, margin in points): upper - lower must be >= margin.
CHECKS = (
    ("Seq-FT at least 5 below MagMax", "seq_ft", "magmax", 5.0),
    ("MagMax at least 5 above zero-shot", "zeroshot", "magmax", 5.0),
    ("joint at least 8 above MagMax", "magmax", "joint", 8.0),
)


def parse_entry(entry: str, default_chain: str) -> tuple[str, str]:
    """``'magmax@finetuned'`` -> ``('magmax', 'finetuned')``; no ``@``: the config's chain."""
    method, _, chain = entry.partition("@")
    return method, chain or default_chain


def entry_label(method: str, chain: str) -> str:
    """The table's row name: merging methods name their chain."""
    from trm_jax.runner import methods

    return f"{method} ({chain})" if methods.get(method).merges else method


def run_entry(config, method: str, chain: str, seed: int, split: str, workdir: str) -> dict:
    """One run (reused when finished); its metrics plus ``wall_seconds`` and ``method`` =
    the row label."""
    cfg = config.copy_and_resolve_references()
    cfg.unlock()
    cfg.merge.method, cfg.merge.chain, cfg.seed = method, chain, seed
    cfg.eval.split = split
    cfg.debug.progress = False
    record, wall = results.timed_run(cfg, os.path.join(workdir, f"{method}_{chain}_s{seed}"))
    return dict(record, wall_seconds=wall, method=entry_label(method, chain))


def checks_text(table: dict, labels: dict[str, list[str]]) -> tuple[str, bool]:
    """The regime checks on the means, one line per (check, MagMax chain); and whether all
    of them hold. ``labels[method]`` are the row labels of that method's entries."""
    lines, ok_all = [], True
    for name, low, high, margin in CHECKS:
        lows, highs = labels.get(low, []), labels.get(high, [])
        if not lows or not highs:
            lines.append(f"- {name}: not measured (needs {low} and {high})")
            ok_all = False
            continue
        for lo in lows:
            for hi in highs:
                a = table[lo]["last_accuracy"][0]
                b = table[hi]["last_accuracy"][0]
                ok = b - a >= margin
                ok_all &= ok
                lines.append(
                    f"- {name}: {hi} {b:.2f} - {lo} {a:.2f} = {b - a:+.2f} "
                    f"(needs >= {margin:g}): **{'yes' if ok else 'no'}**"
                )
    return "\n".join(lines), ok_all


def main(argv):
    del argv
    from trm_jax import report
    from trm_jax.runtime import enable_compilation_cache

    enable_compilation_cache(_JAX_CACHE.value)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    seeds = [int(s) for s in _SEEDS.value.split(",") if s]
    entries = [parse_entry(e, config.merge.chain) for e in _ENTRIES.value.split(",") if e]
    os.makedirs(_WORKDIR.value, exist_ok=True)
    t0 = time.perf_counter()
    rows, labels = [], {}
    for method, chain in entries:
        labels.setdefault(method, []).append(entry_label(method, chain))
        for seed in seeds:
            rec = run_entry(config, method, chain, seed, _SPLIT.value, _WORKDIR.value)
            rows.append(rec)
            print(
                f"{rec['method']} seed {seed}: {_SPLIT.value} last acc "
                f"{100 * rec['last_accuracy']:.2f} ({rec['wall_seconds']:.0f}s)",
                flush=True,
            )
    table = report.aggregate(rows, COLUMNS)
    checks, ok = checks_text(table, labels)
    d = config.data
    title = _TITLE.value or (
        f"`{d.name}` ({d.num_tasks} tasks), split `{_SPLIT.value}`, seeds {seeds}"
    )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = (
        f"#### {title}\n\n"
        f"Command: `{command}`  \n"
        f"Total wall {time.perf_counter() - t0:.0f}s (finished runs reused; wall s / run is "
        f"each run's own, measured on a shared 2-core CPU, pre-training cached).\n\n"
        f"{report.compare_table(rows, COLUMNS)}\n"
        f"Regime checks (means of last accuracy):\n\n{checks}\n\n"
        f"Qualifies: **{'yes' if ok else 'no'}**\n"
    )
    with open(os.path.join(_WORKDIR.value, "regime.md"), "w") as f:
        f.write(text)
    if _DOC.value:
        results.write_section(
            _DOC.value, "regime", _SECTION.value or os.path.basename(_WORKDIR.value), text
        )
    print(text)


if __name__ == "__main__":
    app.run(main)
