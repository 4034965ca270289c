"""File helpers shared by reports and checkpoints: JSON-ready values, atomic writes.

Part of the neutral bottom layer: it imports nothing from the rest of ``trm_jax``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_jsonable(obj: Any, *, nan_to_null: bool = True) -> Any:
    """A JSON-ready copy of ``obj``: arrays -> (nested) lists, numpy scalars -> Python.

    Dicts keep their key order (keys become strings). With ``nan_to_null`` NaN and
    +-Inf become ``None`` (strict JSON); without it they stay floats (Python's ``json``
    writes them as ``NaN`` / ``Infinity``). Raises ``TypeError`` on anything else.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, nan_to_null=nan_to_null) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nan_to_null=nan_to_null) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.dtype.kind == "V" and "float" in arr.dtype.name:  # bfloat16 and friends
            arr = arr.astype(np.float64)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"cannot write an array of dtype {arr.dtype} as JSON")
        return to_jsonable(arr.tolist(), nan_to_null=nan_to_null)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if nan_to_null and not math.isfinite(obj):
            return None
        return float(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
