r"""Are the runner's results bit-identical to those of another commit?

    python experiments/check_identical.py --base HEAD~1 --config configs/default.py \
        --methods zeroshot,seq_ft,average,task_arithmetic,ties,magmax,trm,joint

A refactor must not change what the runner computes. This script checks it out of
process: it checks ``--base`` out into a temporary git worktree, runs every method there
and in this tree with ``python -m trm_jax.main`` (each tree imports its own package),
and compares the accuracy matrices of the two ``metrics.json`` files bit for bit. It
writes ``<workdir>/identical.md`` (one row per method) and exits 1 when any differs.
``--set a.b=value`` pairs are passed to both runs as config overrides (for instance
``--set merge.chain=finetuned``). Both runs use the same pre-training cache directory,
so theta_0 is trained once when the two trees key it alike. ``--results_name=NAME``
also writes the table to ``docs/results/NAME.md`` with the command, commit, machine and
date (``experiments/results.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("acc_matrix", "task_aware_matrix")


def _run(tree: str, config: str, method: str, workdir: str, overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "trm_jax.main",
        f"--config={os.path.join(tree, config)}",
        f"--workdir={workdir}",
        f"--config.merge.method={method}",
        "--config.debug.progress=False",
        *[f"--config.{o}" for o in overrides],
    ]
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"error: {method} failed in {tree}:\n{tail}")
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def _same(a: dict, b: dict) -> bool:
    # json round-trips floats exactly (repr), so equality here is bit equality.
    return all(a[k] == b[k] for k in KEYS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument(
        "--methods", default="zeroshot,seq_ft,average,task_arithmetic,ties,magmax,trm,joint"
    )
    parser.add_argument("--set", action="append", default=[], help="a.b=value override")
    parser.add_argument("--base_config", default="", help="config path in --base if renamed")
    parser.add_argument("--workdir", default="runs/check_identical")
    parser.add_argument(
        "--results_name", default="", help="also write docs/results/<name>.md ('' = no)"
    )
    args = parser.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(
            ["git", "-C", ROOT, "worktree", "add", "--detach", base_tree, args.base],
            check=True,
            capture_output=True,
        )
        try:
            for method in [m for m in args.methods.split(",") if m]:
                t0 = time.perf_counter()
                base_cfg = args.base_config or args.config
                ref = _run(base_tree, base_cfg, method, os.path.join(tmp, method), args.set)
                new = _run(ROOT, args.config, method, os.path.join(args.workdir, method), args.set)
                same = _same(ref, new)
                ok &= same
                rows.append(
                    f"| {method} | {new['last_accuracy']:.6f} | {ref['last_accuracy']:.6f} | "
                    f"{'yes' if same else '**no**'} | {time.perf_counter() - t0:.0f} |"
                )
                print(rows[-1], flush=True)
        finally:
            subprocess.run(
                ["git", "-C", ROOT, "worktree", "remove", "--force", base_tree],
                capture_output=True,
            )
    head = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    text = (
        f"`python experiments/check_identical.py --base {args.base} --config {args.config}"
        f"{''.join(f' --set {s}' for s in args.set)}` at {head} (working tree):\n\n"
        "| method | last acc (this tree) | last acc (base) | acc matrices bit-identical | "
        "wall s |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    with open(os.path.join(args.workdir, "identical.md"), "w") as f:
        f.write(text)
    if args.results_name:
        import results

        results.write(args.results_name, text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
