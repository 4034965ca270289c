"""Robustness of the CLI: every bad input fails in one line (exit 2) before any work, and
the failure modes of a real run (corruption, a second run, Ctrl-C, a failed run's
workdir, unwritable paths) are handled.

The bad-input sweep (``CASES``: case, overrides, exit code, regex on the message) runs the
real entry point, ``python -m trm_jax.main --config configs/tiny.py``, in subprocesses, a
few at a time; each case gets a fresh workdir, which must be left without any output
(at most the lock file). The scenarios below it run short tiny runs. The runs that
pre-train share one cache directory.
"""

import concurrent.futures
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import checkpointing
from trm_jax.errors import TrainingError, WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.py")
FMNIST = "/usr/share/datasets/fashion-mnist"

pytestmark = pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Fashion-MNIST IDX not installed")


class Result(NamedTuple):
    code: int
    stderr: str
    seconds: float


def _env() -> dict:
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=path)


def _cmd(args, workdir=None, config=TINY) -> list[str]:
    cmd = [sys.executable, "-m", "trm_jax.main"]
    if config:
        cmd += ["--config", config]
    if workdir:
        cmd += ["--workdir", str(workdir)]
    return cmd + list(args)


def _cli(args, workdir=None, *, config=TINY, timeout=300) -> Result:
    start = time.perf_counter()
    proc = subprocess.run(
        _cmd(args, workdir, config),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stderr, time.perf_counter() - start)


def _one_error_line(result: Result, pattern: str, *, only_line: bool = True) -> str:
    """The run exited 2 with one ``error:`` line matching ``pattern`` (and nothing else on
    stderr when ``only_line``)."""
    assert result.code == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    if only_line:
        assert lines == errors, result.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def _flip_byte(path: str, count: int = 1) -> None:
    """Flip one bit of ``count`` bytes spread over the middle of ``path`` (one byte can
    land on a compressed chunk's unverified trailer, which changes no array: several
    make sure one array's bytes change)."""
    data = bytearray(open(path, "rb").read())
    for k in range(count):
        data[len(data) * (k + 1) // (count + 1)] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


def _largest_data_file(directory: str) -> str:
    files = [f for f in glob.glob(f"{directory}/**/d/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _snapshot(directory: str) -> dict:
    """Every file under ``directory`` but the lock: (size, mtime, sha of the content)."""
    out = {}
    for path in glob.glob(f"{directory}/**", recursive=True):
        name = os.path.relpath(path, directory)
        if os.path.isfile(path) and not os.path.basename(name).startswith(".lock"):
            st = os.stat(path)
            out[name] = (st.st_size, st.st_mtime_ns, hash(open(path, "rb").read()))
    return out


# ----------------------------------------------------------------------------- inputs


def _npz(path, **over):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    y = np.arange(12) % 2
    arrays = {"x_train": x, "y_train": y, "x_test": x[:4], "y_test": y[:4], **over}
    np.savez(path, **arrays)
    return path


def _make_inputs(d: str) -> None:
    """Every bad file the sweep reads, under ``d``."""
    os.makedirs(d, exist_ok=True)
    for name, text in {
        "syntax.py": "def get_config(:\n",
        "noget.py": "x = 1\n",
        "none.py": "def get_config():\n    pass\n",
    }.items():
        with open(f"{d}/{name}", "w") as f:
            f.write(text)
    open(f"{d}/empty.npz", "wb").close()
    good = open(_npz(f"{d}/good.npz"), "rb").read()
    with open(f"{d}/truncated.npz", "wb") as f:
        f.write(good[: len(good) // 2])
    crc = bytearray(good)
    crc[good.index(b"x_train.npy") + 300] ^= 0xFF
    with open(f"{d}/crc.npz", "wb") as f:
        f.write(bytes(crc))
    x = np.zeros((12, 8, 8, 3), np.uint8)
    _npz(f"{d}/object.npz", x_train=np.array([x[0], None], dtype=object))
    _npz(f"{d}/rgba.npz", x_train=np.zeros((12, 8, 8, 4), np.uint8))
    _npz(f"{d}/zero.npz", x_train=x[:0], y_train=np.zeros(0, np.int64))
    _npz(f"{d}/mismatch.npz", y_train=np.zeros(5, np.int64))
    # Class 1 has test images but no training image.
    _npz(f"{d}/hole.npz", y_train=(np.arange(12) % 2) * 2, y_test=np.arange(4) % 3)
    from PIL import Image

    for split, classes in (("empty_class", {"a": 3, "b": 0}), ("bad_image", {"a": 3, "b": 3})):
        for c, n in classes.items():
            os.makedirs(f"{d}/{split}/{c}")
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    f"{d}/{split}/{c}/{i}.png"
                )
    with open(f"{d}/bad_image/b/broken.png", "wb") as f:
        f.write(b"not a png")
    from trm_jax.data import local

    for case in ("idx_gz", "idx_header"):
        os.makedirs(f"{d}/{case}")
        for key, stem in local.IDX_FILES.items():
            shape = (20, 4, 4) if "images" in key else (20,)
            arr = (np.arange(np.prod(shape)) % 2).reshape(shape).astype(np.uint8)
            local.write_idx(f"{d}/{case}/{stem}.gz", arr)
    gz = f"{d}/idx_gz/train-images-idx3-ubyte.gz"
    data = open(gz, "rb").read()
    with open(gz, "wb") as f:
        f.write(data[:-12])
    import gzip

    with open(f"{d}/idx_header/train-images-idx3-ubyte.gz", "wb") as f:
        f.write(gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0])))
    with open(f"{d}/a_file", "w") as f:
        f.write("in the way\n")
    os.makedirs(f"{d}/ckpt_is_file")
    with open(f"{d}/ckpt_is_file/checkpoints", "w") as f:
        f.write("in the way\n")


def _data(source, path, name="custom"):
    return [
        f"--config.data.source={source}",
        f"--config.data.name={name}",
        f"--config.data.path={{in}}/{path}",
        "--config.data.num_tasks=1",
    ]


# (case, overrides, exit code, regex on the error line). ``{in}`` is the inputs folder,
# ``{cache}`` the shared pre-training cache. A ``--config``/``--workdir`` in the
# overrides replaces the default one.
CASES = [
    # Flags and config files.
    (
        "field_typo",
        ["--config.train.lrr=1"],
        2,
        r'unknown config field --config\.train\.lrr \(did you mean "lr"\?\)',
    ),
    (
        "section_typo",
        ["--config.trian.lr=1"],
        2,
        r'unknown config field --config\.trian\.lr \(did you mean "train"\?\)',
    ),
    ("missing_config", ["--config", "{in}/nope.py"], 2, r"config file .*nope\.py not found"),
    ("syntax_error", ["--config", "{in}/syntax.py"], 2, r"syntax\.py has a syntax error at line 1"),
    ("no_get_config", ["--config", "{in}/noget.py"], 2, r"noget\.py defines no get_config\(\)"),
    (
        "get_config_none",
        ["--config", "{in}/none.py"],
        2,
        r"get_config\(\) of .*none\.py returned None",
    ),
    ("wrong_type", ["--config.train.lr=abc"], 2, r"--config\.train\.lr=abc: could not convert"),
    ("wrong_int", ["--config.train.steps=1.5"], 2, r"--config\.train\.steps=1\.5: invalid literal"),
    ("missing_workdir", ["--workdir="], 2, r"--workdir is required"),
    ("extra_argument", ["extra"], 2, r"unexpected arguments: extra"),
    ("paper_bad_arg", ["--config", "configs/paper.py:nope"], 2, r"configs/paper\.py takes"),
    # Numbers, choices and the checks that used to fire only after task 1.
    ("lr_negative", ["--config.train.lr=-1"], 2, r"train\.lr must be a finite number > 0, got -1"),
    ("lr_zero", ["--config.train.lr=0"], 2, r"train\.lr must be a finite number > 0, got 0"),
    (
        "epochs_zero",
        ["--config.train.steps=0", "--config.train.epochs=0"],
        2,
        r"train\.epochs must be an integer >= 1",
    ),
    ("epochs_negative", ["--config.train.epochs=-1"], 2, r"train\.epochs must be an integer >= 1"),
    (
        "batch_negative",
        ["--config.train.batch_size=-4"],
        2,
        r"train\.batch_size must be an integer >= 1, got -4",
    ),
    (
        "batch_zero",
        ["--config.train.batch_size=0"],
        2,
        r"train\.batch_size must be an integer >= 1, got 0",
    ),
    (
        "eval_batch_zero",
        ["--config.eval.batch_size=0"],
        2,
        r"eval\.batch_size must be an integer >= 1",
    ),
    (
        "eval_split",
        ["--config.eval.split=foo"],
        2,
        r"unknown eval\.split 'foo'; choices: test, train, val",
    ),
    (
        "eval_val_empty",
        ["--config.eval.split=val", "--config.data.val_fraction=0"],
        2,
        r"val split is empty",
    ),
    (
        "lam_negative",
        ["--config.merge.method=magmax", "--config.merge.lam=-1"],
        2,
        r"merge\.lam must be a finite number in \(0, 100\]",
    ),
    (
        "lam_huge",
        ["--config.merge.method=task_arithmetic", "--config.merge.lam=1e38"],
        2,
        r"merge\.lam must be .*got 1e\+38",
    ),
    (
        "weight_decay",
        ["--config.train.weight_decay=-0.1"],
        2,
        r"train\.weight_decay must be a finite number >= 0",
    ),
    (
        "ties_k",
        ["--config.merge.method=ties", "--config.merge.k=2"],
        2,
        r"merge\.k must be in \[0, 1\]",
    ),
    (
        "dare_p",
        ["--config.merge.method=dare", "--config.merge.p=1"],
        2,
        r"merge\.p must be in \[0, 1\)",
    ),
    (
        "snapshots_zero",
        ["--config.train.snapshots=0"],
        2,
        r"train\.snapshots must be an integer >= 1",
    ),
    (
        "optimizer",
        ["--config.train.optimizer=adam"],
        2,
        r"unknown train\.optimizer 'adam'; choices: adamw, sgd",
    ),
    (
        "trm_lr",
        ["--config.merge.trm.learning_rate=-1"],
        2,
        r"merge\.trm\.learning_rate must be > 0",
    ),
    ("trm_align", ["--config.merge.trm.align=kd"], 2, r"merge\.trm\.align is 'kd'; choose one of"),
    (
        "ewc_batches",
        ["--config.merge.method=ewc", "--config.cl.ewc_batches=0"],
        2,
        r"cl\.ewc_batches must be an integer >= 1",
    ),
    (
        "grad_accum",
        ["--config.train.grad_accum=3"],
        2,
        r"train\.batch_size=16 must be a multiple of train\.grad_accum=3",
    ),
    (
        "include_regex",
        ["--config.merge.include=(unclosed"],
        2,
        r"merge\.include '\(unclosed' is not a valid regex",
    ),
    (
        "pretrain_lr",
        ["--config.pretrain.enabled=True", "--config.pretrain.train.lr=0"],
        2,
        r"pretrain\.train\.lr must be",
    ),
    # Batches larger than the data (an epoch without a batch used to loop forever).
    (
        "train_batch_too_big",
        ["--config.train.batch_size=100000", "--config.train.steps=3"],
        2,
        r"train\.batch_size=100000 exceeds the 90 training examples of task 1",
    ),
    (
        "merge_batch_too_big",
        ["--config.merge.batch_size=5000"],
        2,
        r"merge\.batch_size=5000 exceeds the 90 training examples .*TRM",
    ),
    (
        "ewc_batch_too_big",
        ["--config.merge.method=ewc", "--config.train.batch_size=100000", "--config.train.steps=3"],
        2,
        r"train\.batch_size=100000 exceeds",
    ),
    (
        "onset_probe_batch_too_big",
        ["--config.merge.method=zeroshot", "--config.train.batch_size=100000"],
        2,
        r"exceeds .*\(the onset probe draws full batches\)",
    ),
    (
        "pretrain_batch_too_big",
        [
            "--config.pretrain.enabled=True",
            "--config.pretrain.cache_dir={cache}",
            "--config.pretrain.data.max_train_per_class=20",
            "--config.pretrain.train.batch_size=100000",
        ],
        2,
        r"pretrain\.train\.batch_size=100000 exceeds the \d+ pre-training examples",
    ),
    # Malformed data files.
    (
        "npz_empty",
        _data("npz", "empty.npz"),
        2,
        r"empty\.npz is not a readable npz archive \(EOFError",
    ),
    (
        "npz_truncated",
        _data("npz", "truncated.npz"),
        2,
        r"truncated\.npz is not a readable npz archive \(BadZipFile",
    ),
    ("npz_crc", _data("npz", "crc.npz"), 2, r"crc\.npz is not a readable npz archive .*CRC"),
    ("npz_object", _data("npz", "object.npz"), 2, r"x_train holds Python objects \(dtype=object\)"),
    (
        "npz_rgba",
        _data("npz", "rgba.npz"),
        2,
        r"x_train has 4 channels per image; use 1 \(gray\) or 3",
    ),
    ("npz_zero_length", _data("npz", "zero.npz"), 2, r"x_train is empty"),
    (
        "npz_length_mismatch",
        _data("npz", "mismatch.npz"),
        2,
        r"has 12 x_train images but 5 y_train labels",
    ),
    (
        "class_without_train",
        _data("npz", "hole.npz"),
        2,
        r"1 class\(es\) have no training examples: '1'",
    ),
    (
        "folder_empty_class",
        _data("folder", "empty_class"),
        2,
        r"class folder .*empty_class/b holds no images",
    ),
    ("folder_bad_image", _data("folder", "bad_image"), 2, r"cannot decode image .*broken\.png"),
    (
        "idx_truncated_gz",
        _data("idx", "idx_gz"),
        2,
        r"train-images-idx3-ubyte\.gz is a truncated or corrupt gzip file",
    ),
    (
        "idx_short_header",
        _data("idx", "idx_header"),
        2,
        r"IDX header cut short \(3 dimensions need a 16-byte header",
    ),
    # Workdirs that cannot be written.
    ("workdir_is_file", ["--workdir", "{in}/a_file"], 2, r"--workdir .*a_file is not a directory"),
    (
        "workdir_below_file",
        ["--workdir", "{in}/a_file/run"],
        2,
        r"cannot create --workdir .*a_file/run",
    ),
    (
        "checkpoints_is_file",
        ["--workdir", "{in}/ckpt_is_file"],
        2,
        r"checkpoint directory .*checkpoints is not a directory",
    ),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The pre-training cache every run that pre-trains shares."""
    return str(tmp_path_factory.mktemp("pretrain_cache"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """Every case of ``CASES`` run once (three at a time): case -> (Result, workdir)."""
    root = tmp_path_factory.mktemp("sweep")
    inputs = str(root / "inputs")
    _make_inputs(inputs)

    def one(case, args):
        args = [a.replace("{in}", inputs).replace("{cache}", cache_dir) for a in args]
        workdir = str(root / case)
        config = TINY
        if "--config" in args:
            i = args.index("--config")
            config, args = args[i + 1], args[:i] + args[i + 2 :]
        if "--workdir" in args:
            i = args.index("--workdir")
            workdir, args = args[i + 1], args[:i] + args[i + 2 :]
        if "--workdir=" in args:  # no --workdir at all
            workdir, args = None, [a for a in args if a != "--workdir="]
        return _cli(args, workdir, config=config), workdir

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {case: pool.submit(one, case, args) for case, args, _, _ in CASES}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case, args, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_before_any_work(sweep, case, args, code, pattern):
    result, workdir = sweep[case]
    assert result.code == code
    _one_error_line(result, pattern)
    assert result.seconds < 120, f"{case} took {result.seconds:.0f}s"
    # Nothing was written: no config.json, no checkpoints (at most the lock file).
    if workdir and os.path.isdir(workdir) and "--workdir" not in args:
        assert set(os.listdir(workdir)) <= {".lock"}, os.listdir(workdir)


# ----------------------------------------------------------------------------- scenarios


# A 5-task run whose tasks take long enough (100 steps) that a SIGINT sent when task 1 is
# logged arrives before the run ends, however loaded the machine.
RUN_ARGS = ["--config.merge.method=magmax", "--config.data.num_tasks=5", "--config.train.steps=100"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 5-task run sent SIGINT as task 1's checkpoint is written (so while it is held:
    the checkpoint completes first), then resumed with the command its message gives:
    (workdir, interrupted stderr, return code, resume Result)."""
    workdir = str(tmp_path_factory.mktemp("interrupt") / "run")
    proc = subprocess.Popen(
        _cmd(RUN_ARGS, workdir),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("task 1/5"):  # logged just before the checkpoint is saved
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stderr.readlines()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines)
    resume = re.search(r"resume with: (.*)$", stderr, re.M)
    assert resume, stderr[-3000:]
    command = shlex.split(resume.group(1))
    assert command[:3] == ["python", "-m", "trm_jax.main"]
    start = time.perf_counter()
    proc2 = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    resumed = Result(proc2.returncode, proc2.stderr, time.perf_counter() - start)
    return workdir, stderr, code, resumed


def test_ctrl_c_prints_what_is_saved_and_how_to_resume(interrupted):
    workdir, stderr, code, resumed = interrupted
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "cannot schedule" not in stderr, stderr[-3000:]
    other = [line for line in stderr.splitlines() if not line.startswith(("task ", "warning: "))]
    assert len(other) == 1, stderr[-3000:]
    saved = re.match(
        rf"interrupted: the first (\d) of 5 tasks are saved in {re.escape(workdir)} "
        r"\(last finished: task (\d)\); resume with: python -m trm_jax\.main .*--workdir",
        other[0],
    )
    assert saved and saved.group(1) == saved.group(2), other[0]
    done = int(saved.group(1))
    assert 1 <= done < 5  # the signal came while task 1 was being saved, or soon after
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert f"resuming {workdir} after task {done}/5" in resumed.stderr
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert len(json.load(f)["acc_matrix"]) == 5


def test_flipped_byte_in_a_checkpoint_is_a_one_line_error(interrupted, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(interrupted[0], workdir)
    _flip_byte(_largest_data_file(os.path.join(workdir, "checkpoints", "5")), count=5)
    before = _snapshot(workdir)
    result = _cli(RUN_ARGS, workdir)
    _one_error_line(result, rf"checkpoint {re.escape(workdir)}/checkpoints/5 (is corrupt|.*DATA)")
    assert _snapshot(workdir) == before


def test_checkpoints_know_their_config(interrupted, tmp_path):
    """Without config.json, a run with another seed does not resume seed 0's checkpoints
    (nor write its config.json beside them); the original config still resumes."""
    workdir = str(tmp_path / "run")
    shutil.copytree(interrupted[0], workdir)
    os.remove(os.path.join(workdir, "config.json"))
    before = _snapshot(workdir)
    args = RUN_ARGS
    result = _cli([*args, "--config.seed=5"], workdir)
    _one_error_line(
        result, r"checkpoint .*/checkpoints/5 was written by a run with a different config"
    )
    assert _snapshot(workdir) == before
    assert _cli(args, workdir).code == 0
    assert os.path.exists(os.path.join(workdir, "config.json"))


def test_failed_run_frees_its_workdir_and_the_workdir_lock(tmp_path):
    """A NaN loss leaves no checkpoint: the workdir is reused with a lower lr. A second
    run on a locked workdir fails naming the holder's pid; once that holder is killed
    (kill -9: its lock and owner record stay behind) the lock is taken over."""
    workdir = str(tmp_path / "run")
    nan = _cli(["--config.merge.method=seq_ft", "--config.train.lr=1e30"], workdir)
    _one_error_line(nan, r"non-finite loss .* in task 1 .*lower train\.lr", only_line=False)
    assert checkpointing.saved_steps(os.path.join(workdir, "checkpoints")) == []

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom trm_jax import checkpointing\n"
            "lock = checkpointing.DirLock(sys.argv[1], what='test').__enter__()\n"
            "print('locked', flush=True)\ntime.sleep(300)\n",
            os.path.join(workdir, ".lock"),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = _cli(["--config.merge.method=seq_ft", "--config.train.lr=1e-3"], workdir)
        _one_error_line(busy, rf"workdir .* is in use by pid {holder.pid} on ")
    finally:
        holder.kill()  # SIGKILL: no clean-up, the owner record names a dead pid
        holder.wait()
    with open(os.path.join(workdir, ".lock.owner")) as f:
        assert json.load(f)["pid"] == holder.pid

    rerun = _cli(
        [
            "--config.merge.method=seq_ft",
            "--config.train.lr=1e-3",
            "--config.debug.stop_after_task=1",
        ],
        workdir,
    )
    assert rerun.code == 0, rerun.stderr[-3000:]
    assert re.search(
        r"note: .* saved no checkpoint; replaced it \[train\.lr: 1e\+30 -> 0\.001", rerun.stderr
    )
    assert checkpointing.saved_steps(os.path.join(workdir, "checkpoints")) == [1]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["lr"] == 1e-3


def _pretrain_args(cache):
    return [
        "--config.merge.method=zeroshot",
        "--config.pretrain.enabled=True",
        f"--config.pretrain.cache_dir={cache}",
        "--config.pretrain.data.max_train_per_class=20",
        "--config.debug.stop_after_task=1",
    ]


def test_pretrain_cache_is_built_once_and_checked(cache_dir, tmp_path):
    """Two runs started together: one pre-trains, the other waits and reuses the cache
    (written atomically: no temporary or lock left). A flipped byte, or lost metadata,
    in the cache is one line that says how to rebuild it."""
    args = _pretrain_args(cache_dir)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda i: _cli(args, tmp_path / f"run{i}"), range(2)))
    for run in runs:
        assert run.code == 0, run.stderr[-3000:]
    trained = [r for r in runs if re.search(r"pre-train: \d+ steps", r.stderr)]
    assert len(trained) == 1, [r.stderr for r in runs]
    assert all("reusing cached theta_0" in r.stderr for r in runs if r is not trained[0])
    key = os.path.basename(
        re.search(r"reusing cached theta_0 (\S+)", "".join(r.stderr for r in runs)).group(1)
    )
    assert os.path.isdir(os.path.join(cache_dir, key))
    assert not [e for e in os.listdir(cache_dir) if "partial" in e]
    assert not glob.glob(os.path.join(cache_dir, key + ".lock*"))  # removed once written
    entry = key

    for damage in ("flip", "metadata"):
        cache = str(tmp_path / f"cache_{damage}")
        shutil.copytree(cache_dir, cache)
        path = os.path.join(cache, entry)
        if damage == "flip":
            _flip_byte(_largest_data_file(path), count=5)
        else:
            os.remove(os.path.join(path, "_METADATA"))
        result = _cli(_pretrain_args(cache), tmp_path / f"bad_{damage}")
        _one_error_line(
            result,
            rf"pre-training cache is unusable: .*; delete {re.escape(path)} to rebuild it",
        )


# ----------------------------------------------------------------------------- in-process


def _tiny():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_cfg", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("where", ["workdir", "checkpoints"])
def test_unwritable_workdir_fails_up_front(tmp_path, monkeypatch, where):
    """Root ignores permission bits, so a read-only directory is simulated by
    ``os.access``; the run fails before reading any data."""
    from trm_jax import runner

    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    real, read_only = os.access, {"workdir": "run", "checkpoints": "checkpoints"}[where]
    monkeypatch.setattr(
        checkpointing.os,
        "access",
        lambda p, mode: os.path.basename(os.fspath(p)) != read_only and real(p, mode),
    )
    with pytest.raises(WorkdirError, match=r"(--workdir|checkpoint directory) .* is not writable"):
        runner.run(_tiny(), str(workdir))
    assert not (workdir / "config.json").exists()


def test_checkpoint_checksum_catches_a_flipped_byte(tmp_path):
    """Random (incompressible) arrays: orbax stores the bytes as they are, decodes the
    flipped file without complaint, and only the checksum sees the change."""
    state = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.ones(3)}
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"task": 0})
    _flip_byte(_largest_data_file(str(tmp_path / "1")))
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(Exception) as info:
            ckpt.restore(1, like=state)
    assert re.search(
        rf"checkpoint {re.escape(str(tmp_path))}/1 is corrupt: "
        r"the checksum of 1 array\(s\) \['w'\]",
        str(info.value),
    )


def test_trm_blames_non_finite_inputs_not_the_learning_rate():
    from trm_jax.merging import trm

    def apply_fn(params, images):
        return images @ params["w"]

    base = {"w": jnp.zeros((4, 3))}
    expert = {"w": jnp.ones((4, 3)).at[0, 0].set(jnp.nan)}
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 4)).astype(np.float32), "label": np.zeros(8, np.int32)}
    config = trm.default_config()
    config.update(steps=2, batch_size=0)
    config.probe.num_classes = 0
    with pytest.raises(
        TrainingError,
        match=r"input snapshots\[0\] has non-finite values in leaves \['w'\].*not the learning "
        "rate",
    ):
        trm.merge(
            apply_fn, base, base, [expert], [batch], task_classes=[0], old_classes=[], config=config
        )
