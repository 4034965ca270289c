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

``config_guard`` refuses to reuse a workdir that holds a run with a different config;
``save_params`` / ``load_params`` cache one parameter tree (the pre-trained backbone).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from trm_jax.errors import CheckpointError, ConfigError
from trm_jax.io import atomic_write_text, to_jsonable
from trm_jax.tree_util import PyTree, path_to_name

STATE, META = "state", "meta"
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


def _cause(exc: BaseException) -> str:
    """First line of an exception, trimmed (tensorstore messages run for pages)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
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
        go into ``state``. Raises ``ValueError`` if ``step`` does not exceed the latest
        saved step (orbax would silently skip it).
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"checkpoint step {step} must exceed the latest step {latest} in {self.directory}"
            )
        meta = to_jsonable(dict(meta), nan_to_null=False)
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
        raises ``CheckpointError``.
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


def save_params(path: str | os.PathLike, params: PyTree) -> None:
    """Save one parameter tree at ``path`` (a directory), replacing what is there.

    Synchronous and atomic: orbax writes a temporary directory and renames it.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, params, force=True)
            checkpointer.wait_until_finished()
    except Exception as e:
        raise CheckpointError(f"cannot save parameters to {path}: {_cause(e)}") from e


def load_params(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Load the tree saved by ``save_params``; checked against ``like`` when given.

    Raises ``CheckpointError`` naming ``path`` if it is missing, corrupt or does not
    match ``like`` (leaf names, shapes, dtypes).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"no parameter checkpoint at {path}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            if like is None:
                return checkpointer.restore(path)
            stored = checkpointer.metadata(path)
            stored = getattr(stored, "item_metadata", stored)
            _check_against(getattr(stored, "tree", stored), like)
            return checkpointer.restore(path, jax.tree.map(_abstract_leaf, like))
    except Exception as e:
        raise CheckpointError(f"cannot load parameters from {path}: {_cause(e)}") from e


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


def config_guard(
    workdir: str | os.PathLike, config_json: str, *, ignore: Sequence[str] = ()
) -> None:
    """Write ``workdir/config.json`` on first use; refuse a workdir with another config.

    The comparison is on the parsed JSON (formatting does not matter); dotted keys in
    ``ignore`` (and everything under them) are left out. On a mismatch raises
    ``ConfigError`` naming the workdir and the first differing keys. Only process 0
    writes the file.
    """
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, "config.json")
    new = json.loads(config_json)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"workdir {workdir} has an unreadable config.json ({_cause(e)}); "
                "use another --workdir or delete it"
            ) from e
        diffs = config_diff(old, new, ignore)
        if diffs:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config "
                f"[{'; '.join(diffs[:3])}{more}]; use another --workdir or delete it"
            )
        return
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        atomic_write_text(path, config_json if config_json.endswith("\n") else config_json + "\n")
