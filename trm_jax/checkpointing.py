"""Checkpoints, resume and the run-config guard: the only module that touches orbax.

``Checkpointer`` wraps ``orbax.checkpoint.CheckpointManager``: each step holds two items,
``state`` (any pytree of jax / numpy arrays, typed PRNG keys and Python scalars, saved
with ``StandardSave``) and ``meta`` (a JSON dict: task index, phase, metrics so far...).
Both are written into one step directory that orbax creates under a temporary name and
renames when complete, so a run killed at any moment (Ctrl-C, ``kill -9``, mid-save)
leaves only whole checkpoints; the temporary leftovers are removed on the next start.
Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and
``wait`` blocks until they are on disk. Only the latest ``keep`` steps are preserved
(``preservation_policy=LatestN``). Every process of a multi-host run must call ``save``
and ``restore`` (orbax coordinates the writes).

``restore`` checks the checkpoint against the caller's ``like`` tree (leaf names, shapes,
dtypes) before reading, and turns any failure (missing step, corrupt or truncated files,
mismatched tree) into one ``CheckpointError`` line naming the directory and the cause.

Integrity: orbax compresses array chunks without a content checksum, so a flipped byte in
a data file can restore as different numbers without any error. Every save therefore
records the sha256 of each leaf's host bytes (``tree_checksums``) in the step's meta JSON,
and every restore recomputes and compares them. A ``Checkpointer`` built with a
``fingerprint`` (the runner passes a hash of the result-relevant config) stores it with
every step and refuses to restore a step written under another fingerprint, so a
checkpoint cannot silently resume a run with a different config even when the workdir's
``config.json`` is gone.

``check_writable`` and ``DirLock`` guard a directory before a run writes into it: the
first fails in one line when it is not a writable directory, the second keeps a second
process out (naming the pid that holds it) or makes it wait its turn.

``config_guard`` refuses to reuse a workdir that holds a run with a different config;
``save_params`` / ``load_params`` cache one parameter tree (the pre-trained backbone),
written atomically (a temporary directory renamed into place) with its checksums beside
the arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from trm_jax.errors import CheckpointError, ConfigError, WorkdirError
from trm_jax.io import atomic_write_text, to_jsonable
from trm_jax.tree_util import PyTree, fetch, path_to_name

STATE, META = "state", "meta"
# Key of the meta JSON that holds the integrity record (stripped from what restore returns).
INTEGRITY = "_integrity"
# File inside a save_params directory that holds the tree's checksums.
CHECKSUMS_FILE = "trm_checksums.json"
_MISSING = object()


# ----------------------------------------------------------------------------------------
# Tree checks
# ----------------------------------------------------------------------------------------


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _abstract_leaf(leaf):
    """What orbax should restore into: a ShapeDtypeStruct (keeping any sharding)."""
    if isinstance(leaf, (bool, int, float)) and not isinstance(leaf, np.generic):
        return leaf  # Python scalars restore as Python scalars
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    arr = np.asarray(leaf)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


def _stored_form(leaf) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) as orbax stores the leaf (typed keys as their uint32 key data)."""
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(data.shape), np.dtype(data.dtype)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    arr = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
    return tuple(arr.shape), np.dtype(arr.dtype)


def _check_against(stored: PyTree, like: PyTree) -> None:
    """Raise ``ValueError`` naming leaves where ``like`` differs from the stored metadata."""
    stored_leaves = {
        path_to_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    like_leaves = {
        path_to_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(like)[0]
    }
    missing = sorted(set(like_leaves) - set(stored_leaves))
    extra = sorted(set(stored_leaves) - set(like_leaves))
    if missing or extra:
        parts = []
        for label, names in (("missing from the checkpoint", missing), ("not in the model", extra)):
            if names:
                parts.append(f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}")
        raise ValueError(f"tree does not match the model ({'; '.join(parts)})")
    bad = []
    for name, leaf in like_leaves.items():
        meta = stored_leaves[name]
        shape, dtype = _stored_form(leaf)
        got = (tuple(meta.shape), np.dtype(meta.dtype))
        if got != (shape, dtype):
            bad.append(f"{name}: checkpoint {got[0]} {got[1]}, expected {shape} {dtype}")
    if bad:
        raise ValueError(
            f"{len(bad)} leaves differ in shape or dtype: {'; '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}"
        )


# TensorStore appends the JSON of the failing spec (``[tensorstore_spec='{...}']``, pages
# long), source locations, or the pybind repr of the store ("See full TensorStore details:
# <bound method pybind11_... of TensorStore({...")" to its messages, and nests
# "Error opening ... driver:" once per layer; none of it helps the user.
_TS_NOISE = (
    re.compile(r"\s*\[(tensorstore_spec|source locations)(\[\d+\])?='.*?'\]"),
    re.compile(r"\s*See full TensorStore details:.*"),
    re.compile(r'Error opening "\w+" driver: '),
    re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>"),
)


def _one(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    for pattern in _TS_NOISE:
        first = pattern.sub("", first)
    first = first.strip()
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _cause(exc: BaseException) -> str:
    """First line of an exception without TensorStore's spec dumps and reprs, trimmed to
    300 characters (tensorstore messages run for pages). A bare ``Exception`` (orbax
    wraps TensorStore's errors in one) is followed by the error it wraps."""
    text = _one(exc)
    inner = exc.__cause__ or exc.__context__
    if type(exc) is Exception and inner is not None:
        text = f"{text}: {_one(inner)}"
    limit = 300 if inner is None else 450
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------


def _host_bytes(leaf) -> bytes:
    """The bytes a leaf holds on the host (typed PRNG keys as their key data)."""
    if _is_key(leaf):
        leaf = jax.random.key_data(leaf)
    return np.ascontiguousarray(fetch(leaf)).tobytes()


def tree_checksums(tree: PyTree) -> dict[str, str]:
    """``{leaf name: sha256 hex of its host bytes}`` (multi-host safe: arrays split across
    hosts are gathered, so every process must call it on the same tree)."""
    return {
        path_to_name(p): hashlib.sha256(_host_bytes(leaf)).hexdigest()
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _checksum_mismatches(tree: PyTree, expected: Mapping[str, str]) -> list[str]:
    """Leaf names whose checksum differs from ``expected`` (leaves it lacks are skipped:
    a restore into a sub-tree checks what it read)."""
    got = tree_checksums(tree)
    return [name for name, digest in got.items() if name in expected and expected[name] != digest]


def _short(names: Sequence[str]) -> str:
    return f"{list(names[:3])}{' ...' if len(names) > 3 else ''}"


# ----------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------


class Checkpointer:
    """Numbered checkpoints of ``(state pytree, meta dict)`` in one directory.

    >>> ckpt = Checkpointer("runs/x/checkpoints", keep=2)
    >>> ckpt.save(3, {"params": params, "key": key}, {"task": 1, "phase": "merged"})
    >>> step = ckpt.latest_step()            # None when there is nothing to resume
    >>> state, meta = ckpt.restore(step, like={"params": params, "key": key})
    >>> ckpt.close()                          # waits for pending saves

    ``step`` numbers must increase from save to save; the runner picks them (for example
    one per task phase). ``keep`` (>= 1) checkpoints are preserved, older ones deleted.
    ``fingerprint`` (any string, e.g. a config hash) is stored with every step and must
    match on restore (steps saved without one are accepted).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 2,
        async_save: bool = True,
        fingerprint: str | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=checkpoint_managers.FixedIntervalPolicy(1),
            preservation_policy=checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    STATE: ocp.StandardCheckpointHandler(),
                    META: ocp.JsonCheckpointHandler(),
                },
            )
        except Exception as e:  # unreadable directory, a file in the way, ...
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {_cause(e)}"
            ) from e

    def all_steps(self) -> list[int]:
        """Steps present on disk (complete checkpoints only), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when the directory holds none."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> None:
        """Start saving ``state`` and the JSON ``meta`` as ``step`` (asynchronous).

        ``meta`` may hold numpy values (written as lists) and NaN; a typed PRNG key must
        go into ``state``. The leaves' checksums (and the fingerprint) go into the meta
        JSON under ``INTEGRITY``. Raises ``ValueError`` if ``step`` does not exceed the
        latest saved step (orbax would silently skip it).
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"checkpoint step {step} must exceed the latest step {latest} in {self.directory}"
            )
        meta = to_jsonable(dict(meta), nan_to_null=False)
        meta[INTEGRITY] = {"sha256": tree_checksums(state), "fingerprint": self.fingerprint}
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot save checkpoint {self.directory}/{step}: {_cause(e)}"
            ) from e
        if not saved:
            raise CheckpointError(f"orbax declined to save step {step} in {self.directory}")

    def restore(self, step: int | None, like: PyTree) -> tuple[PyTree, dict]:
        """Read ``step`` (``None``: the latest) into the structure of ``like``.

        ``like`` is a pytree of the arrays (or ``jax.ShapeDtypeStruct``) the state should
        match; restored arrays take its shardings. Returns ``(state, meta)``. Any failure
        raises ``CheckpointError``: among them a fingerprint other than this
        checkpointer's, and arrays whose checksum differs from the one saved with them.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        where = f"{self.directory}/{step}"
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint step {step} in {self.directory} (steps: {self.all_steps()})"
            )
        try:
            stored_meta = self._manager.restore(
                step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
            )[META]
        except Exception as e:
            raise CheckpointError(
                f"cannot restore checkpoint {where}: meta: {_cause(e)} (delete that step "
                "directory to resume from an older one, or the workdir to start over)"
            ) from e
        integrity = stored_meta.get(INTEGRITY) if isinstance(stored_meta, dict) else None
        integrity = integrity if isinstance(integrity, dict) else {}
        stored_print = integrity.get("fingerprint")
        if self.fingerprint is not None and stored_print not in (None, self.fingerprint):
            raise CheckpointError(
                f"checkpoint {where} was written by a run with a different config (config "
                f"hash {stored_print}, this run's is {self.fingerprint}); use another "
                "--workdir, or delete the workdir to start over"
            )
        try:
            with _orbax_quiet():
                stored = self._manager.item_metadata(step)[STATE]
                if stored is None:
                    raise ValueError(f"item '{STATE}' has no metadata")
                _check_against(getattr(stored, "tree", stored), like)
                abstract = jax.tree.map(_abstract_leaf, like)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
                    ),
                )
        except Exception as e:
            raise CheckpointError(
                f"cannot restore checkpoint {where}: {_cause(e)} (delete that step directory "
                "to resume from an older one, or the workdir to start over)"
            ) from e
        meta = restored[META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"cannot restore checkpoint {where}: meta is not a JSON object")
        meta.pop(INTEGRITY, None)
        bad = _checksum_mismatches(restored[STATE], integrity.get("sha256") or {})
        if bad:
            raise CheckpointError(
                f"checkpoint {where} is corrupt: the checksum of {len(bad)} array(s) "
                f"{_short(bad)} differs from the one saved with them (a data file under "
                f"{where}/{STATE} changed on disk); delete that step directory to resume from "
                "an older one, or the workdir to start over"
            )
        return restored[STATE], meta

    def wait(self) -> None:
        """Block until every pending save is on disk (re-raising a failed save)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"saving a checkpoint in {self.directory} failed: {_cause(e)}"
            ) from e

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------
# Single parameter tree (the cached pre-trained backbone)
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _orbax_quiet():
    """absl logging at ERROR while orbax reads a tree: on a damaged one it logs warnings
    before raising, and the caller's one-line error says it all."""
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_params(path: str | os.PathLike, params: PyTree) -> None:
    """Save one parameter tree at ``path`` (a directory), replacing what is there.

    Synchronous and atomic: the tree and its checksums (``CHECKSUMS_FILE``) are written
    into a hidden temporary sibling, which is renamed to ``path`` once complete, so a
    reader sees either no tree or the whole one (a killed writer leaves only the
    temporary, replaced by the next save).
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.partial")
    try:
        os.makedirs(parent, exist_ok=True)
        checksums = tree_checksums(params)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp, params, force=True)
            checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            atomic_write_text(
                os.path.join(tmp, CHECKSUMS_FILE),
                json.dumps({"sha256": checksums}, indent=1, sort_keys=True) + "\n",
            )
            old = None
            if os.path.exists(path):
                old = os.path.join(parent, f".{name}.old-{os.getpid()}")
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _sync(f"save_params {path}")
    except Exception as e:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save parameters to {path}: {_cause(e)}") from e


def _read_checksums(path: str) -> dict[str, str] | None:
    """The checksums saved beside a parameter tree (``None``: a tree saved before they
    existed, which is read unverified)."""
    file = os.path.join(path, CHECKSUMS_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            record = json.load(f)
        checksums = record["sha256"]
        if not isinstance(checksums, dict):
            raise ValueError("'sha256' is not an object")
        return checksums
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"parameters at {path} have an unreadable {file}: {_cause(e)}") from e


def load_params(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Load the tree saved by ``save_params``; checked against ``like`` when given.

    Raises ``CheckpointError`` naming ``path`` if it is missing, corrupt (unreadable, or
    an array whose checksum differs from the saved one) or does not match ``like`` (leaf
    names, shapes, dtypes).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"no parameter checkpoint at {path}")
    checksums = _read_checksums(path)
    try:
        with _orbax_quiet(), ocp.StandardCheckpointer() as checkpointer:
            if like is None:
                params = checkpointer.restore(path)
            else:
                stored = checkpointer.metadata(path)
                stored = getattr(stored, "item_metadata", stored)
                stored = getattr(stored, "tree", stored)
                if not jax.tree.leaves(stored):
                    raise ValueError("its metadata lists no arrays (incomplete or corrupt)")
                _check_against(stored, like)
                params = checkpointer.restore(path, jax.tree.map(_abstract_leaf, like))
    except Exception as e:
        raise CheckpointError(f"cannot load parameters from {path}: {_cause(e)}") from e
    bad = _checksum_mismatches(params, checksums or {})
    if bad:
        raise CheckpointError(
            f"parameters at {path} are corrupt: the checksum of {len(bad)} array(s) "
            f"{_short(bad)} differs from the one saved with them (a data file changed on disk)"
        )
    return params


# ----------------------------------------------------------------------------------------
# Directories: writability and locks
# ----------------------------------------------------------------------------------------


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Create directory ``path`` if needed and make sure this process can write into it;
    ``WorkdirError`` naming ``what`` otherwise (a file in the way, no permission, a
    read-only file system). Checked up front, so a run cannot fail on its first save
    after hours of training."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WorkdirError(f"{what} {path} is not a directory (a file is in the way)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create {what} {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"{what} {path} is not writable (check its permissions)")
    try:  # permission bits do not tell everything (root, read-only mounts)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe-"):
            pass
    except OSError as e:
        raise WorkdirError(f"{what} {path} is not writable: {e.strerror or e}") from e


class DirLock:
    """An exclusive lock between processes (``filelock.FileLock``: ``flock`` on ``path``),
    with the holder recorded in ``<path>.owner`` for the message of those who find it taken.

    >>> with DirLock("runs/x/.lock", what="workdir runs/x"):   # WorkdirError if taken
    ...     ...
    >>> with DirLock(cache + ".lock", what="the cache", wait=True) as lock:  # waits its turn
    ...     lock.waited                     # '' or the holder that was waited for

    The kernel releases an ``flock`` when its holder dies (even by ``kill -9``), so a
    lock left behind by a dead pid is simply taken over, its owner record replaced.
    ``enabled=False`` makes it a no-op (multi-host runs: every process of one job shares
    the directories, and ``jax.distributed`` coordinates them).
    """

    def __init__(
        self, path: str | os.PathLike, *, what: str, wait: bool = False, enabled: bool = True
    ):
        self.path = os.fspath(path)
        self.owner_path = self.path + ".owner"
        self.what = what
        self.wait = wait
        self.enabled = enabled
        self.waited = ""
        self._lock = None

    def holder(self) -> str:
        """Who holds the lock, from the owner record (``'pid 123 on host, since ...'``)."""
        for _ in range(20):  # the holder writes its record just after it locks
            try:
                with open(self.owner_path, encoding="utf-8") as f:
                    owner = json.load(f)
                return f"pid {owner['pid']} on {owner['host']} (since {owner['since']})"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return "another process (pid unknown)"

    def __enter__(self) -> DirLock:
        if not self.enabled:
            return self
        import filelock

        lock = filelock.FileLock(self.path)
        try:
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                holder = self.holder()
                if not self.wait:
                    raise WorkdirError(
                        f"{self.what} is in use by {holder}; wait for that run to finish or "
                        "use another --workdir"
                    ) from None
                self.waited = holder
                print(f"waiting for {holder}, which holds {self.what}", file=sys.stderr)
                lock.acquire()
        except OSError as e:
            raise WorkdirError(f"cannot lock {self.what} ({self.path}): {e.strerror or e}") from e
        self._lock = lock
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
        }
        try:
            atomic_write_text(self.owner_path, json.dumps(owner) + "\n")
        except OSError:
            pass  # the lock holds without its record; contenders then say "pid unknown"
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Drop the owner record and release the lock (idempotent). The lock file itself
        stays: deleting it could let two processes lock two different files."""
        if self._lock is not None:
            try:
                os.remove(self.owner_path)
            except OSError:
                pass
            self._lock.release()
            self._lock = None

    def remove_files(self) -> None:
        """Delete the lock file and its owner record (while still held: safe only when a
        waiter that then gets the deleted file's lock re-checks what it waited for)."""
        for path in (self.owner_path, self.path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


# ----------------------------------------------------------------------------------------
# Config guard
# ----------------------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def config_diff(old: Mapping, new: Mapping, ignore: Sequence[str] = ()) -> list[str]:
    """``'key: old -> new'`` for each dotted key whose JSON value differs (old's order)."""

    def canon(value):
        return _MISSING if value is _MISSING else json.dumps(value, sort_keys=True)

    flat_old, flat_new = _flatten(dict(old)), _flatten(dict(new))
    keys = list(flat_old) + [k for k in flat_new if k not in flat_old]
    diffs = []
    for key in keys:
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        a, b = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
        if canon(a) != canon(b):
            show = lambda v: "(absent)" if v is _MISSING else json.dumps(v)
            diffs.append(f"{key}: {show(a)} -> {show(b)}")
    return diffs


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """Complete checkpoint steps in ``directory`` (ascending), read from the directory
    names alone: orbax writes each step under a temporary name and renames it when
    complete, so only whole steps carry a plain integer name. Cheap, and opens no orbax
    manager (for the workdir checks and the Ctrl-C message)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


def config_guard(
    workdir: str | os.PathLike,
    config_json: str,
    *,
    ignore: Sequence[str] = (),
    replace: bool = False,
    write: bool = True,
) -> list[str]:
    """Write ``workdir/config.json`` on first use; refuse a workdir with another config.

    The comparison is on the parsed JSON (formatting does not matter); dotted keys in
    ``ignore`` (and everything under them) are left out. On a mismatch raises
    ``ConfigError`` naming the workdir and the first differing keys, unless ``replace``
    (the caller found nothing in the workdir to resume, e.g. a run that failed before
    its first checkpoint): then the file is rewritten and the differing keys (or
    ``['config.json unreadable']``) are returned. Returns ``[]`` when nothing was
    replaced. ``write=False`` only checks (and returns what a write would replace), so a
    caller can refuse a workdir early and write once its other checks pass. Only process
    0 writes the file.
    """
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, "config.json")
    new = json.loads(config_json)
    replaced: list[str] = []
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            if not replace:
                raise ConfigError(
                    f"workdir {workdir} has an unreadable config.json ({_cause(e)}); "
                    "use another --workdir or delete it"
                ) from e
            old, replaced = None, ["config.json unreadable"]
        if old is not None:
            diffs = config_diff(old, new, ignore)
            if not diffs:
                return []
            if not replace:
                more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
                raise ConfigError(
                    f"workdir {workdir} holds a run with a different config "
                    f"[{'; '.join(diffs[:3])}{more}]; use another --workdir or delete it"
                )
            replaced = diffs
    if write and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        atomic_write_text(path, config_json if config_json.endswith("\n") else config_json + "\n")
    return replaced
