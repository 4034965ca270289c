"""Continual-learning metrics: the accuracy matrix and everything derived from it.

Notation (docs/metrics.md): ``A[t, j]`` is the accuracy after training task ``t``
(row) on the test data of task ``j`` (column), for ``j <= t``; entries above the diagonal
(tasks not seen yet) are NaN. ``n_j`` is the number of test examples of task ``j``.
Rows and columns are 0-based here; formulas in docs/metrics.md use 1-based ``t = 1..T``.

- ``acc_after_task[t] = sum_{j<=t} n_j A[t, j] / sum_{j<=t} n_j``: accuracy on all the
  test data seen so far, i.e. the fraction of those examples classified correctly.
- ``last_accuracy = acc_after_task[T-1]``.
- ``avg_incremental_accuracy = mean_t acc_after_task[t]``.
- ``forgetting = mean_{j<T-1} (max_{t in [j, T-2]} A[t, j] - A[T-1, j])``.
- ``bwt = mean_{j<T-1} (A[T-1, j] - A[j, j])``.
- ``task_aware_accuracy`` and ``task_forgetting``: ``last_accuracy`` and ``forgetting`` of
  the task-aware matrix (each task's head restricted to its own classes).

With a single task there is nothing earlier to forget: ``forgetting``, ``bwt`` and
``task_forgetting`` are NaN (undefined), which ``report`` writes as JSON ``null``.

The summary functions and ``accuracy`` are pure numpy. ``predict`` and ``num_correct``
are written in ``jax.numpy`` so the runner can call them inside a jitted evaluation step;
they accept numpy arrays too.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

SUMMARY_KEYS = (
    "last_accuracy",
    "avg_incremental_accuracy",
    "forgetting",
    "bwt",
    "task_aware_accuracy",
    "task_forgetting",
)


# ----------------------------------------------------------------------------------------
# Per-batch accuracy (jax.numpy, jit-able)
# ----------------------------------------------------------------------------------------


def predict(logits: ArrayLike, classes: ArrayLike) -> jnp.ndarray:
    """Predicted class ids, argmax restricted to ``classes``.

    ``logits`` is ``[B, C]`` over every class of the stream; ``classes`` is a 1-D int
    array of the class ids allowed to win (all classes seen so far for task-agnostic
    evaluation, the task's own classes for task-aware evaluation). Logits of other
    classes are ignored. Ties go to the first id in ``classes`` (``jnp.argmax``).
    jax.numpy, jit-able (``classes`` has a static length).
    """
    classes = jnp.asarray(classes, jnp.int32)
    restricted = jnp.take(jnp.asarray(logits), classes, axis=-1)
    return classes[jnp.argmax(restricted, axis=-1)]


def num_correct(logits: ArrayLike, labels: ArrayLike, classes: ArrayLike) -> jnp.ndarray:
    """Number of examples whose restricted argmax (``predict``) equals the label (int32).

    Task-agnostic accuracy: ``classes`` = every class seen so far. Task-aware accuracy on
    task ``j``'s test data: ``classes`` = task ``j``'s classes. A label outside
    ``classes`` always counts as wrong. jax.numpy, jit-able; sum the counts over batches
    and divide by the number of examples (``accuracy`` does this for one array).
    """
    hits = predict(logits, classes) == jnp.asarray(labels, jnp.int32)
    return jnp.sum(hits, dtype=jnp.int32)


def accuracy(logits: ArrayLike, labels: ArrayLike, classes: ArrayLike) -> float:
    """Fraction of examples whose argmax over ``classes`` is the label (pure numpy).

    The numpy twin of ``num_correct`` (same rule, same tie-break), for whole arrays
    already on the host; returns a Python float.
    """
    labels = np.asarray(labels)
    if labels.shape[0] == 0:
        raise ValueError("accuracy of an empty set of examples is undefined")
    classes = np.asarray(classes, np.int64)
    restricted = np.asarray(logits)[:, classes]
    return float(np.mean(classes[np.argmax(restricted, axis=-1)] == labels))


def task_accuracies(
    logits: np.ndarray,
    labels: np.ndarray,
    task_ids: np.ndarray,
    task_classes: Sequence[ArrayLike],
) -> tuple[np.ndarray, np.ndarray]:
    """Row ``t`` of the accuracy matrices, where ``t = max(task_ids)``: per evaluated task
    ``j``, the task-agnostic accuracy (argmax over every class of tasks ``0..t``) and the
    task-aware accuracy (argmax over task ``j``'s own classes), both by ``accuracy``.

    ``task_ids[i]`` is the task of example ``i``; returns two arrays indexed by task in
    ``sorted(set(task_ids))`` order (pure numpy).
    """
    task_ids = np.asarray(task_ids)
    seen = seen_classes(task_classes, int(task_ids.max()))
    agn, aware = [], []
    for j in sorted(set(task_ids.tolist())):
        sel = task_ids == j
        agn.append(accuracy(logits[sel], labels[sel], seen))
        aware.append(accuracy(logits[sel], labels[sel], task_classes[j]))
    return np.asarray(agn), np.asarray(aware)


def seen_classes(task_classes: Sequence[ArrayLike], t: int) -> np.ndarray:
    """Class ids of tasks ``0..t`` concatenated (the task-agnostic candidate set)."""
    return np.concatenate([np.asarray(c, np.int32) for c in task_classes[: t + 1]])


# ----------------------------------------------------------------------------------------
# Accuracy-matrix summaries (pure numpy)
# ----------------------------------------------------------------------------------------


def _check_matrix(acc_matrix: ArrayLike, label: str) -> np.ndarray:
    a = np.asarray(acc_matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{label} must be a non-empty square T x T matrix, got {a.shape}")
    lower = a[np.tril_indices(a.shape[0])]
    if not np.all(np.isfinite(lower)):
        raise ValueError(f"{label} has non-finite entries on or below the diagonal")
    if np.any(lower < 0) or np.any(lower > 1):
        raise ValueError(f"{label} entries must be accuracies in [0, 1]")
    return a


def _check_sizes(task_sizes: ArrayLike, num_tasks: int) -> np.ndarray:
    n = np.asarray(task_sizes, dtype=np.float64)
    if n.shape != (num_tasks,):
        raise ValueError(f"task_sizes must have {num_tasks} entries, got shape {n.shape}")
    if np.any(n <= 0):
        raise ValueError(f"task_sizes must be positive counts, got {n.tolist()}")
    return n


def acc_after_task(acc_matrix: ArrayLike, task_sizes: ArrayLike) -> np.ndarray:
    """Accuracy on all test data seen so far, after each task: ``[T]`` float64.

    ``sum_{j<=t} n_j A[t, j] / sum_{j<=t} n_j``: the size weighting makes it the
    accuracy over the pooled test examples, as if they were evaluated together.
    """
    a = _check_matrix(acc_matrix, "acc_matrix")
    n = _check_sizes(task_sizes, a.shape[0])
    out = np.empty(a.shape[0])
    for t in range(a.shape[0]):
        out[t] = np.dot(a[t, : t + 1], n[: t + 1]) / n[: t + 1].sum()
    return out


def last_accuracy(acc_matrix: ArrayLike, task_sizes: ArrayLike) -> float:
    """Accuracy on all test data after the last task (size-weighted last row)."""
    return float(acc_after_task(acc_matrix, task_sizes)[-1])


def avg_incremental_accuracy(acc_matrix: ArrayLike, task_sizes: ArrayLike) -> float:
    """Mean over tasks ``t`` of the accuracy on everything seen by ``t``."""
    return float(np.mean(acc_after_task(acc_matrix, task_sizes)))


def forgetting(acc_matrix: ArrayLike) -> float:
    """``mean_{j<T-1} max_{t in [j, T-2]} A[t, j] - A[T-1, j]``; NaN when ``T == 1``.

    The drop of each earlier task from its best accuracy before the last task to its
    accuracy at the end (positive = forgotten).
    """
    a = _check_matrix(acc_matrix, "acc_matrix")
    last = a.shape[0] - 1
    if last == 0:
        return float("nan")
    drops = [a[j:last, j].max() - a[last, j] for j in range(last)]
    return float(np.mean(drops))


def bwt(acc_matrix: ArrayLike) -> float:
    """Backward transfer ``mean_{j<T-1} A[T-1, j] - A[j, j]``; NaN when ``T == 1``.

    Negative = the final model is worse on old tasks than right after learning them.
    """
    a = _check_matrix(acc_matrix, "acc_matrix")
    last = a.shape[0] - 1
    if last == 0:
        return float("nan")
    return float(np.mean([a[last, j] - a[j, j] for j in range(last)]))


def summarize(
    acc_matrix: ArrayLike,
    task_sizes: ArrayLike,
    task_aware_matrix: ArrayLike | None = None,
) -> dict:
    """Every derived metric of one run as a dict of Python floats (plus ``acc_after_task``).

    Keys: ``SUMMARY_KEYS`` and ``acc_after_task`` (list of ``T`` floats). Without a
    ``task_aware_matrix`` the task-aware keys are NaN. The task-aware accuracy uses the
    same ``task_sizes`` weighting as ``last_accuracy``.
    """
    after = acc_after_task(acc_matrix, task_sizes)
    out = {
        "last_accuracy": float(after[-1]),
        "avg_incremental_accuracy": float(np.mean(after)),
        "forgetting": forgetting(acc_matrix),
        "bwt": bwt(acc_matrix),
        "task_aware_accuracy": float("nan"),
        "task_forgetting": float("nan"),
        "acc_after_task": [float(x) for x in after],
    }
    if task_aware_matrix is not None:
        aware = np.asarray(task_aware_matrix, dtype=np.float64)
        if aware.shape != np.shape(acc_matrix):
            raise ValueError(
                f"task_aware_matrix has shape {aware.shape}, acc_matrix {np.shape(acc_matrix)}"
            )
        out["task_aware_accuracy"] = last_accuracy(aware, task_sizes)
        out["task_forgetting"] = forgetting(aware)
    return out
