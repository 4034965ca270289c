"""The CLI: each user error exits 2 with one line on stderr and no traceback.

The cases run as parallel subprocesses (each pays the JAX import once).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "unknown_method": (
        ["--config.merge.method=nope"],
        r"unknown merge.method 'nope'; choices: .*magmax",
    ),
    "unknown_model": (["--config.model.name=nope"], r"unknown model 'nope'; choices: .*vit_tiny"),
    "unknown_benchmark": (["--config.data.name=nope"], r"nope.*(choices|choose)"),
    "missing_data": (
        ["--config.data.path=/nonexistent/fmnist"],
        r"cannot start: data fashion_mnist \(/nonexistent/fmnist\): apt-get install "
        r"dataset-fashion-mnist.*python -m trm_jax.prepare",
    ),
    "bad_checkpoint": (["--config.model.checkpoint={ckpt}"], r"(?i)checkpoint|missing"),
    "nan_loss": (
        ["--config.train.lr=1e30", "--config.merge.method=seq_ft"],
        r"non-finite loss .* in task 1 at step \d+",
    ),
    "bad_flag": (["--config.merge.methodd=x"], None),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    ckpt = str(tmp / "bad.npz")
    np.savez(ckpt, **{"not/a/vit/key": np.zeros(3, np.float32)})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = {}
    for name, (args, _) in CASES.items():
        cmd = [
            sys.executable,
            "-m",
            "trm_jax.main",
            "--config",
            os.path.join(ROOT, "configs/tiny.py"),
            "--workdir",
            str(tmp / name),
            *(a.format(ckpt=ckpt) for a in args),
        ]
        procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c != "bad_flag"])
def test_user_errors_exit_2_with_one_line(results, case):
    import re

    code, _, stderr = results[case]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    assert re.search(CASES[case][1], errors[0]), errors[0]


def test_misspelt_config_field_is_rejected(results):
    code, _, stderr = results["bad_flag"]
    assert code != 0 and "methodd" in stderr


def test_interrupted_message_names_what_is_saved_and_the_resume_command(tmp_path):
    from trm_jax import main

    argv = ["/x/main.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path)]
    assert main.interrupted_message(str(tmp_path), 5, argv) == (
        f"interrupted: no task had finished, nothing is saved in {tmp_path}; resume with: "
        f"python -m trm_jax.main --config configs/tiny.py --workdir {tmp_path}"
    )
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    assert "the first 2 of 5 tasks are saved" in main.interrupted_message(str(tmp_path), 5, argv)
