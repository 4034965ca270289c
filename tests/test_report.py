"""report: exact JSON round trip, markdown numbers, PNG size and pixel content, comparisons."""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.image
import numpy as np
import pytest

from trm_jax import io, metrics, report

NAN = np.nan
A = np.array([[0.80, NAN, NAN], [0.85, 0.90, NAN], [0.60, 0.70, 0.95]])
AWARE = np.array([[0.80, NAN, NAN], [0.90, 0.95, NAN], [0.85, 0.90, 0.97]])
SIZES = [100, 200, 100]


def _record():
    rec = {
        "stored_bytes": np.array([1000, 2000, 123456], np.int64),  # out of public order
        "method": "magmax",
        "seed": 3,
        "class_order": np.array([3, 1, 0, 2, 5, 4], np.int32),
        "acc_matrix": A,
        "onset_grad_norm": np.array([0.5, 0.25], np.float32),
        "finetune_seconds": [10.5, 11.5, 12.0],
        "merge_seconds": np.array([0.125, 0.25, 0.5]),
        "zz_extra": {"inf": float("inf"), "nan": np.float64("nan")},
        "aa_extra": (1, 2),
    }
    rec.update(metrics.summarize(A, SIZES, AWARE))
    return rec


def _pixels_near(image, rgb, tol=0.03):
    return int(np.sum(np.all(np.abs(image[..., :3] - np.asarray(rgb)) < tol, axis=-1)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    paths = report.write(workdir, _record())
    return workdir, paths


def test_metrics_json_round_trip_exact(written):
    workdir, paths = written
    with open(paths["metrics.json"]) as f:
        data = json.load(f)
    assert list(data)[: len(report.PUBLIC_KEYS)] == list(report.PUBLIC_KEYS)
    assert list(data)[len(report.PUBLIC_KEYS) :] == sorted(
        ["zz_extra", "aa_extra", "acc_after_task"]
    )
    assert data["method"] == "magmax" and data["seed"] == 3
    assert data["class_order"] == [3, 1, 0, 2, 5, 4]
    assert data["acc_matrix"] == [[0.8, None, None], [0.85, 0.9, None], [0.6, 0.7, 0.95]]
    assert data["last_accuracy"] == 295 / 400
    assert data["avg_incremental_accuracy"] == (0.8 + 265 / 300 + 295 / 400) / 3
    assert data["forgetting"] == ((0.85 - 0.60) + (0.90 - 0.70)) / 2
    assert data["bwt"] == ((0.60 - 0.80) + (0.70 - 0.90)) / 2
    assert data["task_aware_accuracy"] == 362 / 400
    assert data["onset_grad_norm"] == [0.5, 0.25]
    assert data["finetune_seconds"] == [10.5, 11.5, 12.0]
    assert data["merge_seconds"] == [0.125, 0.25, 0.5]
    assert data["stored_bytes"] == [1000, 2000, 123456]
    assert all(isinstance(v, int) for v in data["stored_bytes"])
    assert data["zz_extra"] == {"inf": None, "nan": None}
    assert data["aa_extra"] == [1, 2]
    text = open(paths["metrics.json"]).read()
    assert "NaN" not in text and "Infinity" not in text
    assert sorted(os.listdir(workdir)) == sorted(paths)  # no temporary files left


def test_single_task_nan_metrics_become_null(tmp_path):
    rec = {
        "method": "seq_ft",
        "seed": 0,
        "acc_matrix": [[0.5]],
        "onset_grad_norm": [],
        "stored_bytes": 2**20,
    }
    rec.update(metrics.summarize([[0.5]], [10]))
    report.write(str(tmp_path), rec)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["forgetting"] is None and data["bwt"] is None
    assert data["task_aware_accuracy"] is None and data["last_accuracy"] == 0.5
    text = (tmp_path / "report.md").read_text()
    assert "| stored bytes (max over tasks) | 1048576 (1.00 MiB) |" in text
    assert "| 1 | 50.00 | n/a | n/a | n/a | n/a |" in text
    onset = matplotlib.image.imread(str(tmp_path / "onset_grad_norm.png"))
    assert _pixels_near(onset, matplotlib.colors.to_rgb("C1")) == 0  # no bars drawn


def test_report_md_tables(written):
    _, paths = written
    text = open(paths["report.md"]).read()
    assert "| last accuracy (%) | 73.75 |" in text
    assert "| average incremental accuracy (%) | 80.69 |" in text
    assert "| forgetting (%) | 22.50 |" in text
    assert "| BWT (%) | -20.00 |" in text
    assert "| task-aware accuracy (%) | 90.50 |" in text
    assert "| task forgetting (%) | 5.00 |" in text
    assert "| stored bytes (max over tasks) | 123456 (0.12 MiB) |" in text
    assert "| merge seconds (total) | 0.88 |" in text
    assert "| after task 2 | 85.00 | 90.00 |  |" in text
    assert "| after task 3 | 60.00 | 70.00 | 95.00 |" in text
    # task | acc on seen | onset | fine-tune s | merge s; onset of task 1 does not exist.
    assert "| 1 | 80.00 | n/a | 10.5 | 0.125 | 1000 |" in text
    assert "| 2 | 88.33 | 0.5 | 11.5 | 0.25 | 2000 |" in text
    assert "| 3 | 73.75 | 0.25 | 12.0 | 0.5 | 123456 |" in text


def test_heatmap_png_dims_and_cell_colours(written):
    _, paths = written
    with open(paths["acc_matrix.png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(paths["acc_matrix.png"])
    width, height = (int(round(s * report.FIGURE_DPI)) for s in report.HEATMAP_SIZE)
    assert image.shape == (height, width, 4)
    left, bottom, ax_w, ax_h = report.HEATMAP_AXES
    cell_w, cell_h = ax_w * width / 3, ax_h * height / 3
    top = height - (bottom + ax_h) * height
    viridis = matplotlib.colormaps["viridis"]
    for t in range(3):
        for j in range(3):
            # Sample near the cell's top-left corner, clear of the centred annotation.
            x = int(left * width + (j + 0.15) * cell_w)
            y = int(top + (t + 0.15) * cell_h)
            expected = (1.0, 1.0, 1.0) if j > t else viridis(A[t, j])[:3]
            np.testing.assert_allclose(image[y, x, :3], expected, atol=0.02, err_msg=(t, j))


def test_line_plots_png(written):
    _, paths = written
    for name, colour in (("acc_after_task.png", "C0"), ("onset_grad_norm.png", "C1")):
        image = matplotlib.image.imread(paths[name])
        assert image.shape == (400, 600, 4), name
        assert _pixels_near(image, matplotlib.colors.to_rgb(colour)) > 200, name
    # The onset bars are 0.5 and 0.25 high: the first bar has about twice the pixels.
    onset = matplotlib.image.imread(paths["onset_grad_norm.png"])
    mask = np.all(np.abs(onset[..., :3] - matplotlib.colors.to_rgb("C1")) < 0.03, axis=-1)
    columns = np.flatnonzero(mask.any(axis=0))
    split = columns[np.argmax(np.diff(columns))] + 1  # the gap between the two bars
    heights = mask[:, :split].sum(axis=0).max(), mask[:, split:].sum(axis=0).max()
    assert heights[0] / heights[1] == pytest.approx(2.0, rel=0.03)


def _rows():
    rows = []
    for seed, (last, onset, merge) in enumerate(
        [(0.70, [1, 3], [0.1, 0.3]), (0.75, [2, 2], [0.2, 0.2]), (0.75, [3, 5], [0.3, 0.3])]
    ):
        rows.append(
            {
                "method": "trm",
                "seed": seed,
                "last_accuracy": last,
                "avg_incremental_accuracy": 0.8,
                "forgetting": 0.1 * seed,
                "onset_grad_norm": onset,
                "merge_seconds": merge,
                "finetune_seconds": [1.0, 2.0],
                "stored_bytes": [2**20, 3 * 2**20],
            }
        )
    rows.append(
        {
            "method": "zeroshot",
            "seed": 0,
            "last_accuracy": 0.5,
            "avg_incremental_accuracy": 0.6,
            "forgetting": None,
            "onset_grad_norm": [None, None],
            "merge_seconds": [0.0, 0.0],
        }
    )
    return rows


def test_compare_table_mean_std():
    table = report.compare_table(_rows())
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | runs | last acc (%) |")
    # trm last accuracy: mean 73.333, sample std sqrt(50/6)=2.887; forgetting 0,10,20 %.
    # onset: run means 2, 2, 4 -> 2.667 ± 1.155; merge: 0.2, 0.2, 0.3 -> 0.233 ± 0.0577.
    # merge / fine-tune over tasks >= 2: 0.3/2, 0.2/2, 0.3/2 -> 13.33 ± 2.887 %.
    assert lines[2] == (
        "| trm | 3 | 73.33 ± 2.89 | 80.00 ± 0.00 | 10.00 ± 10.00 | 2.667 ± 1.155 | 0.233 ± 0.0577 "
        "| 13.3 ± 2.89 | 2 ± 0 |"
    )  # stored: the mean over tasks of 1 and 3 MiB is 2 MiB in every run
    assert lines[3] == "| zeroshot | 1 | 50.00 | 60.00 | n/a | n/a | 0 | n/a | n/a |"
    # one task: only the first task, whose times include compiling, so NaN
    assert np.isnan(
        report.merge_finetune_ratio({"merge_seconds": [9.0], "finetune_seconds": [1.0]})
    )
    stats = report.aggregate(_rows())
    mean, std, n = stats["trm"]["last_accuracy"]
    assert (mean, std, n) == pytest.approx((73.3333333, np.std([70, 75, 75], ddof=1), 3))


def test_compare_plot_png(tmp_path):
    path = report.compare_plot(_rows(), str(tmp_path / "compare.png"))
    image = matplotlib.image.imread(path)
    assert image.shape == (400, 800, 4)
    assert _pixels_near(image, matplotlib.colors.to_rgb("C0")) > 200  # trm bars


def test_to_jsonable_rejects_unknown_types():
    with pytest.raises(TypeError, match="object"):
        io.to_jsonable({"x": object()})
    assert io.to_jsonable({"x": np.float32(0.5)}, nan_to_null=False) == {"x": 0.5}
    assert np.isnan(io.to_jsonable(float("nan"), nan_to_null=False))
    bf16 = jnp.asarray([0.5, 1.25], jnp.bfloat16)
    assert io.to_jsonable({"b": bf16, "k": np.int8(-3)}) == {"b": [0.5, 1.25], "k": -3}
    with pytest.raises(TypeError, match="key"):
        io.to_jsonable(jax.random.key(0))
