r"""Command-line entry point: one call into ``runner.run``.

    python -m trm_jax.main --config configs/default.py --workdir runs/demo
    python -m trm_jax.main --config configs/default.py --workdir runs/mm \
        --config.merge.method=magmax --config.seed=1

Any config field can be overridden with ``--config.a.b=value``; the config is locked
(a misspelt field is an error). User errors (unknown method / model / benchmark, missing
data, a checkpoint that does not match the model, a NaN loss, a workdir holding another
config) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file (configs/*.py), optionally with :arg (configs/paper.py:cifar100,10).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache",
    "~/.cache/trm_jax/jax_cache",
    "Persistent XLA compilation cache directory ('' = off): repeated runs skip most "
    "compilation (TRM's second-order steps compile once per task shape).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from trm_jax import runner, runtime, sharding
    from trm_jax.errors import TRMError

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    runtime.enable_compilation_cache(_JAX_CACHE.value)
    try:
        sharding.initialize(config.mesh)
        runner.run(config, _WORKDIR.value)
    except TRMError as e:  # registry misses are UnknownNameError, a TRMError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
