"""Run reports: ``metrics.json``, ``report.md`` tables and PNG plots; method comparisons.

``write(workdir, metrics)`` turns one run's metrics dict (the runner's record merged with
``metrics.summarize``) into the public workdir outputs:

- ``metrics.json``: the public keys first, in ``PUBLIC_KEYS`` order, then any others
  sorted by name; numpy / jax arrays become lists, NaN and Inf become ``null``.
- ``report.md``: a summary table, the accuracy matrix, and a per-task table (accuracy on
  the classes seen so far, onset gradient norm, fine-tune and merge seconds).
- ``acc_matrix.png`` (heatmap), ``acc_after_task.png`` (accuracy on seen classes after
  each task), ``onset_grad_norm.png``.

``compare_table(rows)`` / ``compare_plot(rows, path)`` aggregate several runs (methods x
seeds) into mean ± std, for ``experiments/``. Call these from one process only (process 0
on a multi-host run). Matplotlib is imported inside the plotting functions and figures are
drawn with the Agg canvas directly, outside ``pyplot``: importing or calling this module
never changes the global backend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trm_jax import metrics as metrics_lib
from trm_jax.io import atomic_write_text, to_jsonable

PUBLIC_KEYS = (
    "method",
    "seed",
    "class_order",
    "acc_matrix",
    *metrics_lib.SUMMARY_KEYS,
    "onset_grad_norm",
    "finetune_seconds",
    "merge_seconds",
    "stored_bytes",
)

# (key, header, scale, format) for compare_table; list-valued keys are averaged over
# tasks within a run first, then mean ± std is taken over the runs of a method.
COMPARE_COLUMNS = (
    ("last_accuracy", "last acc (%)", 100.0, ".2f"),
    ("avg_incremental_accuracy", "avg inc acc (%)", 100.0, ".2f"),
    ("forgetting", "forgetting (%)", 100.0, ".2f"),
    ("onset_grad_norm", "onset grad norm", 1.0, ".4g"),
    ("merge_seconds", "merge s / task", 1.0, ".3g"),
    ("merge_finetune_ratio", "merge / fine-tune (%)", 100.0, ".3g"),
    ("stored_bytes", "stored MiB / task", 2.0**-20, ".3g"),
)

FIGURE_DPI = 100
HEATMAP_SIZE = (5.5, 4.5)  # inches; 550 x 450 pixels at FIGURE_DPI
HEATMAP_AXES = (0.14, 0.14, 0.66, 0.76)  # left, bottom, width, height (figure fraction)
LINE_SIZE = (6.0, 4.0)  # 600 x 400 pixels


# ----------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------


def ordered(record: Mapping[str, Any]) -> dict:
    """``record`` with the public keys first (``PUBLIC_KEYS`` order), the rest sorted."""
    out = {k: record[k] for k in PUBLIC_KEYS if k in record}
    out.update({k: record[k] for k in sorted(record) if k not in out})
    return out


def metrics_json(record: Mapping[str, Any]) -> str:
    """The ``metrics.json`` text for ``record``: strict JSON, stable key order.

    One key per line; a list of lists (the accuracy matrix) puts one row per line.
    """

    def dump(value: Any) -> str:
        text = json.dumps(value, allow_nan=False)
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            rows = ",\n    ".join(json.dumps(v, allow_nan=False) for v in value)
            text = "[\n    " + rows + "\n  ]"
        return text

    data = ordered(to_jsonable(record))
    body = ",\n".join(f"  {json.dumps(k)}: {dump(v)}" for k, v in data.items())
    return "{\n" + body + "\n}\n"


# ----------------------------------------------------------------------------------------
# Helpers shared by tables and plots
# ----------------------------------------------------------------------------------------


def _float_matrix(values: Any) -> np.ndarray:
    """A JSON-style matrix (``None`` above the diagonal) as float64 with NaN."""
    rows = [[np.nan if v is None else v for v in row] for row in np.asarray(values).tolist()]
    return np.asarray(rows, dtype=np.float64)


def _float_list(values: Any) -> np.ndarray:
    if values is None:
        return np.zeros(0)
    return np.asarray(
        [np.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))],
        dtype=np.float64,
    )


def _seen_accuracy(record: Mapping[str, Any], acc: np.ndarray) -> np.ndarray:
    """``acc_after_task`` from the record, else from ``task_sizes`` (else equal sizes)."""
    if record.get("acc_after_task") is not None:
        return _float_list(record["acc_after_task"])
    sizes = record.get("task_sizes")
    sizes = np.ones(acc.shape[0]) if sizes is None else np.asarray(sizes, np.float64)
    return metrics_lib.acc_after_task(acc, sizes)


def _onset_by_task(onset: np.ndarray, num_tasks: int) -> list[float | None]:
    """Onset norms aligned to tasks 1..T: ``T - 1`` values belong to tasks 2..T."""
    if onset.size == num_tasks - 1:
        return [None] + [float(v) for v in onset]
    if onset.size == num_tasks:
        return [float(v) for v in onset]
    if onset.size == 0:
        return [None] * num_tasks
    raise ValueError(f"onset_grad_norm has {onset.size} values for {num_tasks} tasks")


def _per_task(record: Mapping[str, Any], key: str, num_tasks: int) -> list[float | None]:
    values = _float_list(record.get(key))
    return [
        float(values[i]) if i < values.size and math.isfinite(values[i]) else None
        for i in range(num_tasks)
    ]


def _total(record: Mapping[str, Any], key: str) -> float | None:
    values = _float_list(record.get(key))
    return float(np.nansum(values)) if values.size else None


def _fmt(value: Any, spec: str = ".4g", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(float(value) * scale, spec)


def _pct(value: Any) -> str:
    return _fmt(value, ".2f", 100.0)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------


def render_markdown(record: Mapping[str, Any]) -> str:
    """``report.md`` text for one run's record (accuracies shown in percent)."""
    acc = _float_matrix(record["acc_matrix"])
    num_tasks = acc.shape[0]
    seen = _seen_accuracy(record, acc)
    title = f"# {record.get('method', 'run')} (seed {record.get('seed', 'n/a')})"
    stored = _float_list(record.get("stored_bytes"))
    stored = int(np.nanmax(stored)) if stored.size and np.isfinite(stored).any() else None
    summary = [
        ("tasks", str(num_tasks)),
        ("last accuracy (%)", _pct(record.get("last_accuracy"))),
        ("average incremental accuracy (%)", _pct(record.get("avg_incremental_accuracy"))),
        ("forgetting (%)", _pct(record.get("forgetting"))),
        ("BWT (%)", _pct(record.get("bwt"))),
        ("task-aware accuracy (%)", _pct(record.get("task_aware_accuracy"))),
        ("task forgetting (%)", _pct(record.get("task_forgetting"))),
        (
            "stored bytes (max over tasks)",
            "n/a" if stored is None else f"{stored} ({stored / 2**20:.2f} MiB)",
        ),
        ("fine-tune seconds (total)", _fmt(_total(record, "finetune_seconds"), ".1f")),
        ("merge seconds (total)", _fmt(_total(record, "merge_seconds"), ".2f")),
    ]
    matrix_rows = [
        [f"after task {t + 1}"] + [_pct(acc[t, j]) if j <= t else "" for j in range(num_tasks)]
        for t in range(num_tasks)
    ]
    onset = _onset_by_task(_float_list(record.get("onset_grad_norm")), num_tasks)
    finetune = _per_task(record, "finetune_seconds", num_tasks)
    merge = _per_task(record, "merge_seconds", num_tasks)
    stored_per_task = (
        _per_task(record, "stored_bytes", num_tasks)
        if isinstance(record.get("stored_bytes"), list)
        else [None] * num_tasks
    )
    task_rows = [
        [
            str(t + 1),
            _pct(seen[t]),
            _fmt(onset[t]),
            _fmt(finetune[t], ".1f"),
            _fmt(merge[t], ".3g"),
            _fmt(stored_per_task[t], ".0f"),
        ]
        for t in range(num_tasks)
    ]
    parts = [
        title,
        "## Summary",
        _md_table(["metric", "value"], summary),
        "## Accuracy matrix (%)",
        "Row: after training task t; column: test data of task j.",
        _md_table(["", *[f"task {j + 1}" for j in range(num_tasks)]], matrix_rows),
        "## Per task",
        "Onset gradient norm of task t: mean gradient norm over the first steps of task t,"
        " starting from the model merged after task t - 1.",
        _md_table(
            [
                "task",
                "acc. on seen (%)",
                "onset grad norm",
                "fine-tune s",
                "merge s",
                "stored bytes",
            ],
            task_rows,
        ),
    ]
    return "\n\n".join(parts) + "\n"


def _figure(size: tuple[float, float]):
    """A figure rendered by Agg, outside pyplot: no global backend or figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    return fig


def plot_acc_matrix(acc_matrix: Any, path: str, title: str = "") -> str:
    """Heatmap of ``A[t, j]`` (viridis on [0, 1], white above the diagonal), annotated."""
    import matplotlib

    acc = _float_matrix(acc_matrix)
    num_tasks = acc.shape[0]
    fig = _figure(HEATMAP_SIZE)
    ax = fig.add_axes(HEATMAP_AXES)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(acc),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    for t in range(num_tasks):
        for j in range(t + 1):
            ax.text(
                j,
                t,
                f"{100 * acc[t, j]:.1f}",
                ha="center",
                va="center",
                color="white" if acc[t, j] < 0.6 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(num_tasks), [str(j + 1) for j in range(num_tasks)])
    ax.set_yticks(range(num_tasks), [str(t + 1) for t in range(num_tasks)])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task t")
    ax.set_title(title or "accuracy matrix")
    fig.colorbar(image, cax=fig.add_axes((0.84, 0.14, 0.03, 0.76)))
    fig.savefig(path, dpi=FIGURE_DPI)
    return path


def plot_acc_after_task(record: Mapping[str, Any], path: str) -> str:
    """Accuracy on all classes seen so far after each task, plus each task's own curve."""
    acc = _float_matrix(record["acc_matrix"])
    num_tasks = acc.shape[0]
    seen = _seen_accuracy(record, acc)
    tasks = np.arange(1, num_tasks + 1)
    fig = _figure(LINE_SIZE)
    ax = fig.add_subplot()
    for j in range(num_tasks):
        ax.plot(tasks[j:], acc[j:, j], color="0.7", lw=0.8, marker=".")
    ax.plot(tasks, seen, color="C0", lw=2, marker="o", label="all seen classes")
    ax.set_xticks(tasks)
    ax.set_ylim(0, 1)
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{record.get('method', '')}: accuracy on seen classes (grey: per task)")
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=FIGURE_DPI)
    return path


def plot_onset_grad_norm(record: Mapping[str, Any], path: str) -> str:
    """Bar chart of the onset gradient norm per task (tasks 2..T)."""
    num_tasks = _float_matrix(record["acc_matrix"]).shape[0]
    onset = _onset_by_task(_float_list(record.get("onset_grad_norm")), num_tasks)
    fig = _figure(LINE_SIZE)
    ax = fig.add_subplot()
    tasks = [t + 1 for t, v in enumerate(onset) if v is not None and math.isfinite(v)]
    values = [v for v in onset if v is not None and math.isfinite(v)]
    if values:
        ax.bar(tasks, values, color="C1")
        ax.set_xticks(tasks)
    else:
        ax.text(
            0.5,
            0.5,
            "no onset gradient norms (single task)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("task")
    ax.set_ylabel("mean gradient norm, first steps")
    ax.set_title(f"{record.get('method', '')}: onset gradient norm")
    fig.savefig(path, dpi=FIGURE_DPI)
    return path


def write(workdir: str, metrics: Mapping[str, Any]) -> dict[str, str]:
    """Write ``metrics.json``, ``report.md`` and the three PNGs into ``workdir``.

    ``metrics`` needs ``acc_matrix``; every other key is optional ("n/a" in the tables).
    Files are replaced atomically, so an interrupted write leaves the previous version.
    Returns ``{name: path}``.
    """
    if "acc_matrix" not in metrics:
        raise ValueError("metrics has no 'acc_matrix'")
    os.makedirs(workdir, exist_ok=True)
    record = ordered(to_jsonable(metrics))
    paths = {
        name: os.path.join(workdir, name)
        for name in (
            "metrics.json",
            "report.md",
            "acc_matrix.png",
            "acc_after_task.png",
            "onset_grad_norm.png",
        )
    }
    atomic_write_text(paths["metrics.json"], metrics_json(metrics))
    atomic_write_text(paths["report.md"], render_markdown(record))
    for name, plot in (
        (
            "acc_matrix.png",
            lambda p: plot_acc_matrix(
                record["acc_matrix"], p, f"{record.get('method', '')}: accuracy matrix"
            ),
        ),
        ("acc_after_task.png", lambda p: plot_acc_after_task(record, p)),
        ("onset_grad_norm.png", lambda p: plot_onset_grad_norm(record, p)),
    ):
        tmp = paths[name] + ".tmp.png"
        plot(tmp)
        os.replace(tmp, paths[name])
    return paths


# ----------------------------------------------------------------------------------------
# Several runs
# ----------------------------------------------------------------------------------------


def merge_finetune_ratio(record: Mapping[str, Any]) -> float:
    """Merge seconds over fine-tuning seconds, summed over tasks 2..T of a run: the first
    task's times include compiling both, so they are left out (NaN with fewer than two
    tasks or no fine-tuning)."""
    merge = _float_list(record.get("merge_seconds") or [])[1:]
    finetune = _float_list(record.get("finetune_seconds") or [])[1:]
    if not merge.size or merge.size != finetune.size or not finetune.sum() > 0:
        return float("nan")
    return float(merge.sum() / finetune.sum())


# Columns computed from other fields of a record.
DERIVED = {"merge_finetune_ratio": merge_finetune_ratio}


def _run_value(record: Mapping[str, Any], key: str) -> float:
    """One number per run: the value, or the mean over tasks of a per-task list."""
    if key in DERIVED:
        return DERIVED[key](record)
    value = record.get(key)
    if value is None:
        return float("nan")
    values = _float_list(value)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def aggregate(rows: Sequence[Mapping[str, Any]], columns=COMPARE_COLUMNS) -> dict:
    """``{method: {key: (mean, std, n)}}`` over the runs of each method (first-seen order).

    Runs whose value is missing or NaN are left out of that column. ``std`` is the
    sample standard deviation (ddof = 1); NaN when fewer than two runs have a value.
    """
    methods: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        methods.setdefault(str(row.get("method", "?")), []).append(row)
    out = {}
    for method, runs in methods.items():
        stats = {"runs": len(runs)}
        for key, _, scale, _ in columns:
            values = np.asarray([_run_value(r, key) for r in runs]) * scale
            values = values[np.isfinite(values)]
            mean = float(values.mean()) if values.size else float("nan")
            std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
            stats[key] = (mean, std, int(values.size))
        out[method] = stats
    return out


def compare_table(rows: Sequence[Mapping[str, Any]], columns=COMPARE_COLUMNS) -> str:
    """Markdown table, one line per method: mean ± std over its runs (seeds).

    ``rows`` are metrics records (dicts as written to ``metrics.json``). List-valued
    metrics (``onset_grad_norm``, ``merge_seconds``) are first averaged over the tasks of
    a run. Accuracy columns are in percent. A single run shows the value without ± .
    """
    table = aggregate(rows, columns)
    lines = []
    for method, stats in table.items():
        cells = [method, str(stats["runs"])]
        for key, _, _, spec in columns:
            mean, std, n = stats[key]
            if n == 0:
                cells.append("n/a")
            elif n == 1:
                cells.append(format(mean, spec))
            else:
                cells.append(f"{format(mean, spec)} ± {format(std, spec)}")
        lines.append(cells)
    return _md_table(["method", "runs", *[c[1] for c in columns]], lines) + "\n"


def compare_plot(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Bar plot per method: last accuracy (%) and onset gradient norm, mean ± std."""
    columns = [c for c in COMPARE_COLUMNS if c[0] in ("last_accuracy", "onset_grad_norm")]
    table = aggregate(rows, columns)
    names = list(table)
    fig = _figure((max(8.0, 1.1 * len(names) + 4), 4.0))
    axes = fig.subplots(1, 2)
    for ax, (key, header, _, _) in zip(axes, columns, strict=True):
        means = [table[m][key][0] for m in names]
        stds = [np.nan_to_num(table[m][key][1]) for m in names]
        ax.bar(
            range(len(names)),
            np.nan_to_num(means),
            yerr=stds,
            capsize=3,
            color=[f"C{i % 10}" for i in range(len(names))],
        )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(header)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    return path
