"""Metric formulas against hand-computed accuracy matrices and a pooled-count reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import metrics

NAN = np.nan
# After task t (rows) on task j (columns). Task 0 peaks after task 1 (0.85 > 0.80), so
# forgetting (from the best earlier value) and -BWT (from the diagonal) differ.
A = np.array(
    [
        [0.80, NAN, NAN],
        [0.85, 0.90, NAN],
        [0.60, 0.70, 0.95],
    ]
)
SIZES = np.array([100, 200, 100])
AWARE = np.array(
    [
        [0.80, NAN, NAN],
        [0.90, 0.95, NAN],
        [0.85, 0.90, 0.97],
    ]
)


def test_acc_after_task_is_size_weighted():
    # t=0: 0.8; t=1: (85 + 180) / 300; t=2: (60 + 140 + 95) / 400.
    np.testing.assert_allclose(
        metrics.acc_after_task(A, SIZES), [0.8, 265 / 300, 295 / 400], rtol=0, atol=1e-12
    )


def test_summarize_hand_computed():
    s = metrics.summarize(A, SIZES, AWARE)
    expected = {
        "last_accuracy": 0.7375,  # 295 / 400, not the unweighted 0.75
        "avg_incremental_accuracy": (0.8 + 265 / 300 + 0.7375) / 3,  # 0.806944...
        "forgetting": ((0.85 - 0.60) + (0.90 - 0.70)) / 2,  # 0.225
        "bwt": ((0.60 - 0.80) + (0.70 - 0.90)) / 2,  # -0.2
        "task_aware_accuracy": (85 + 180 + 97) / 400,  # 0.905
        "task_forgetting": ((0.90 - 0.85) + (0.95 - 0.90)) / 2,  # 0.05
    }
    assert set(metrics.SUMMARY_KEYS) <= set(s)
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-12), key
    assert s["acc_after_task"] == pytest.approx([0.8, 265 / 300, 0.7375], abs=1e-12)
    assert s["avg_incremental_accuracy"] == pytest.approx(0.8069444444, abs=1e-9)


def test_summarize_without_task_aware_matrix_gives_nan():
    s = metrics.summarize(A, SIZES)
    assert np.isnan(s["task_aware_accuracy"]) and np.isnan(s["task_forgetting"])
    assert s["last_accuracy"] == pytest.approx(0.7375, abs=1e-12)


def test_single_task_forgetting_and_bwt_are_nan():
    s = metrics.summarize([[0.7]], [50], [[0.9]])
    assert s["last_accuracy"] == pytest.approx(0.7)
    assert s["avg_incremental_accuracy"] == pytest.approx(0.7)
    assert s["task_aware_accuracy"] == pytest.approx(0.9)
    assert np.isnan(s["forgetting"]) and np.isnan(s["bwt"]) and np.isnan(s["task_forgetting"])


def test_two_tasks_values_above_diagonal_ignored():
    a = np.array([[0.9, 123.0], [0.4, 0.8]])  # the 123 above the diagonal is never read
    s = metrics.summarize(a, [10, 30])
    assert s["last_accuracy"] == pytest.approx((4 + 24) / 40)
    assert s["avg_incremental_accuracy"] == pytest.approx((0.9 + 0.7) / 2)
    assert s["forgetting"] == pytest.approx(0.5)
    assert s["bwt"] == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "matrix, sizes, match",
    [
        (np.zeros((2, 3)), [1, 1], "square"),
        (np.array([[0.5, NAN], [NAN, 0.5]]), [1, 1], "non-finite"),
        (np.array([[1.5]]), [1], r"\[0, 1\]"),
        (np.array([[0.5]]), [1, 2], "1 entries"),
        (np.array([[0.5]]), [0], "positive"),
    ],
)
def test_invalid_inputs_raise(matrix, sizes, match):
    with pytest.raises(ValueError, match=match):
        metrics.summarize(matrix, sizes)


def test_predict_restricts_argmax_to_classes():
    logits = np.array(
        [
            [0.0, 5.0, 1.0, 9.0],  # global argmax 3; within [0, 1, 2] -> 1
            [2.0, 1.0, 3.0, 0.0],  # within [0, 1, 2] -> 2
            [4.0, 4.0, 0.0, 0.0],  # tie between 0 and 1 -> first listed
        ],
        np.float32,
    )
    np.testing.assert_array_equal(metrics.predict(logits, [0, 1, 2]), [1, 2, 0])
    np.testing.assert_array_equal(metrics.predict(logits, [1, 0]), [1, 0, 1])
    np.testing.assert_array_equal(metrics.predict(logits, [3]), [3, 3, 3])
    labels = np.array([1, 2, 1])
    assert int(metrics.num_correct(logits, labels, [0, 1, 2])) == 2
    assert int(metrics.num_correct(logits, labels, [1, 0])) == 2  # rows 0 and 2
    assert int(metrics.num_correct(logits, labels, [3])) == 0  # labels outside: wrong
    assert metrics.accuracy(logits, labels, [0, 1, 2]) == pytest.approx(2 / 3)


def test_num_correct_jitted_matches_numpy_accuracy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels = rng.integers(0, 6, size=64).astype(np.int32)
    count = jax.jit(metrics.num_correct)
    for classes in (np.arange(6), np.array([5, 2, 0])):
        ref = metrics.accuracy(logits, labels, classes) * 64
        assert int(count(logits, labels, jnp.asarray(classes))) == round(ref)
    direct = np.sum(np.argmax(logits[:, :6], axis=1) == labels)
    assert int(count(logits, labels, jnp.arange(6))) == int(direct) > 64 // 6


def test_matrix_from_logits_matches_pooled_accuracy():
    """last_accuracy from per-task entries == accuracy over the pooled test set."""
    rng = np.random.default_rng(0)
    task_classes = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    sizes = [7, 13, 5]
    data = []
    for t, classes in enumerate(task_classes):
        labels = rng.choice(classes, size=sizes[t])
        logits = rng.normal(size=(sizes[t], 6)).astype(np.float32)
        logits[np.arange(sizes[t]), labels] += 0.8  # better than chance
        data.append((logits, labels))
    T = len(task_classes)
    a = np.full((T, T), np.nan)
    aware = np.full((T, T), np.nan)
    for t in range(T):
        seen = metrics.seen_classes(task_classes, t)
        for j in range(t + 1):
            a[t, j] = metrics.accuracy(*data[j], seen)
            aware[t, j] = metrics.accuracy(*data[j], task_classes[j])
    pooled_logits = np.concatenate([d[0] for d in data])
    pooled_labels = np.concatenate([d[1] for d in data])
    pooled = metrics.accuracy(pooled_logits, pooled_labels, np.arange(6))
    s = metrics.summarize(a, sizes, aware)
    assert s["last_accuracy"] == pytest.approx(pooled, abs=1e-12)
    first_two = metrics.accuracy(pooled_logits[:20], pooled_labels[:20], np.arange(4))
    assert s["acc_after_task"][1] == pytest.approx(first_two, abs=1e-12)
    # Restricting to fewer candidates can only help a correct prediction stay correct.
    assert np.all(aware[np.tril_indices(T)] >= a[np.tril_indices(T)])
