r"""Command-line entry point: one call into ``runner.run``.

    python -m trm_jax.main --config configs/default.py --workdir runs/demo
    python -m trm_jax.main --config configs/default.py --workdir runs/mm \
        --config.merge.method=magmax --config.seed=1

Any config field can be overridden with ``--config.a.b=value``; the config is locked
(a misspelt field is an error). User errors print one line ``error: ...`` on stderr and
exit with status 2: a bad flag or config file (a misspelt field, a missing or broken
file, a value of the wrong type, a missing ``--workdir``), an unknown method / model /
benchmark, a value out of range, missing or malformed data, a corrupt checkpoint, a
NaN loss, a workdir that holds another config, is not writable or is in use. Ctrl-C
prints one line (what is saved and the command that resumes) and exits with 130.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

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

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _config_arg(argv: list[str]) -> str:
    """The value given to ``--config`` (``''`` if none)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _override_for(key: str, argv: list[str]) -> str:
    """The ``--config.a.b=...`` argument whose field path names ``key``."""
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config.") :].split("=", 1)[0]
            if key in path.split("."):
                return arg.split("=", 1)[0]
    return ""


def describe_flag_error(exc: BaseException, argv: list[str]) -> str:
    """One line for an exception raised while parsing the flags or loading the config file.

    absl wraps some (``IllegalFlagValueError``), ml_collections others (it re-raises a
    ``ValueError`` from ``get_config`` with a traceback in its message, turns a field
    typo into an ``AttributeError`` around a ``KeyError``): each case is recognised on
    the innermost exception and worded for the user.
    """
    from trm_jax.errors import TRMError

    chain = _chain(exc)
    path = _config_arg(argv).split(":", 1)[0]
    for e in reversed(chain):  # the innermost user error raised by get_config itself
        if isinstance(e, TRMError) and "Error whilst parsing" not in str(e):
            return str(e)
    root = chain[-1]
    if isinstance(root, SyntaxError):
        return (
            f"config file {root.filename or path} has a syntax error at line {root.lineno}: "
            f"{root.msg}"
        )
    if isinstance(root, FileNotFoundError) or (isinstance(root, OSError) and path):
        if not os.path.exists(path):
            return f"config file {path} not found (--config)"
        return f"cannot load config file {path}: {_first_line(root)}"
    text = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
    if isinstance(root, AttributeError) and "get_config" in text:
        return f"config file {path} defines no get_config() function"
    if isinstance(root, KeyError):
        below = re.search(r"Attribute <class '(\w+)'>\.(\w+) does not exist.*lookup: (\S+)", text)
        if below:  # a field below a leaf: --config.train.lr.x
            kind, name, lookup = below.groups()
            return f"unknown config field --config.{lookup} (a {kind} has no field {name!r})"
        key = _first_line(text).strip("'\"")
        hints = (re.search(r'Did you mean "([^"]*)"', str(e)) for e in chain)
        hint = next((f'did you mean "{h.group(1)}"?' for h in hints if h), "")
        flag = _override_for(key, argv) or f"field {key!r}"
        return f"unknown config field {flag}{f' ({hint})' if hint else ''}"
    if isinstance(exc, flags.IllegalFlagValueError):
        message = _first_line(exc)
        required = re.search(r"Flag --(\w+) must have a value other than None", message)
        if required and required.group(1) == "config" and _config_arg(argv):
            return f"get_config() of {_config_arg(argv)} returned None (a missing return?)"
        if required:
            return f"--{required.group(1)} is required (see --helpshort)"
        if "Error whilst parsing config file" in message:
            return f"config file {path}: get_config() failed: {_first_line(root)}"
        return message.removeprefix("flag ")
    if isinstance(exc, flags.Error):
        return _first_line(exc)
    where = f"config file {path}: " if path else ""
    return f"{where}{type(root).__name__}: {_first_line(root)}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every failure turned into one ``error:`` line and exit 2
    (absl prints usage pages and tracebacks, and exits 1)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # ml_collections warns of a None config: one line
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        if not isinstance(config, config_dict.ConfigDict):
            _ = config.keys  # a file that failed to load raises its deferred IOError
            _fail(
                f"get_config() of {_config_arg(argv)} returned {type(config).__name__}, "
                "not a ConfigDict"
            )
    except SystemExit:
        raise
    except Exception as e:
        _fail(describe_flag_error(e, argv))
    finally:
        if not flags.FLAGS.is_parsed() or not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(verbosity)
    if len(rest) > 1:
        _fail(f"unexpected arguments: {' '.join(rest[1:])} (every option is a --flag)")
    return rest


def resume_command(argv: list[str]) -> str:
    """The command line that runs (and so resumes) this run again."""
    return shlex.join(["python", "-m", "trm_jax.main", *argv[1:]])


def interrupted_message(workdir: str, num_tasks: int, argv: list[str]) -> str:
    """The line printed on Ctrl-C: what is saved, and the command that resumes."""
    from trm_jax import checkpointing

    steps = checkpointing.saved_steps(os.path.join(workdir, "checkpoints"))
    if steps:
        saved = (
            f"the first {steps[-1]} of {num_tasks} tasks are saved in {workdir} "
            f"(last finished: task {steps[-1]})"
        )
    else:
        saved = f"no task had finished, nothing is saved in {workdir}"
    return f"interrupted: {saved}; resume with: {resume_command(argv)}"


def main(argv) -> int:
    from trm_jax import runner, runtime, sharding
    from trm_jax.errors import TRMError

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        runtime.enable_compilation_cache(_JAX_CACHE.value)
        sharding.initialize(config.mesh)
        runner.run(config, _WORKDIR.value)
    except TRMError as e:  # registry misses are UnknownNameError, a TRMError too
        print(f"error: {e}", file=sys.stderr, flush=True)
        # Reads still pending in orbax's event loop fail the same way as the one reported
        # and would print "Exception ignored in <coroutine>" tracebacks at exit: the line
        # above already says what is wrong.
        sys.unraisablehook = lambda unraisable: None
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        message = interrupted_message(_WORKDIR.value, config.data.num_tasks, sys.argv)
        print(message, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def _main_and_exit(argv) -> None:
    code = main(argv)
    if code == EXIT_INTERRUPTED:
        # Skip interpreter teardown: XLA work and input-pipeline threads still in flight
        # when Ctrl-C arrived can crash it (a segfault after the message). Everything
        # worth keeping is on disk: the loop waited for any checkpoint being written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run() -> None:
    app.run(_main_and_exit, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
