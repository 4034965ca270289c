"""Fixed class orders published with other codebases, shipped as data.

Each ``class_orders/<benchmark>.json`` holds ``order`` (original label ids of this
library, in stream order), ``source`` (``<repo>/<path>`` it was read from), ``commit``
and a ``note`` on how the source's label ids map to ours. The files are MagMax's orders
(Marczak et al. 2024, danielm1405/magmax), so ``data.class_order = "magmax"`` reproduces
its task splits: CIFAR-100 and CUB-200 copied as is, ImageNet-R translated from MagMax's
name-sorted label ids to our WordNet-id-sorted ones (the verbatim list is kept as
``source_order``), Cars in natural order (MagMax defines none).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from trm_jax.errors import UnknownNameError

_PACKAGE = "trm_jax.data"
_FOLDER = "class_orders"


def names() -> tuple[str, ...]:
    """Benchmarks with a shipped class order, sorted."""
    folder = resources.files(_PACKAGE) / _FOLDER
    return tuple(
        sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
    )


@functools.cache
def record(name: str) -> dict[str, Any]:
    """The whole JSON record of ``name`` (``UnknownNameError`` lists the shipped ones)."""
    path = resources.files(_PACKAGE) / _FOLDER / f"{name}.json"
    if not path.is_file():
        raise UnknownNameError(
            f"no shipped class order for benchmark {name!r}; available: {', '.join(names())}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def get(name: str) -> list[int]:
    """The shipped class order of benchmark ``name``: original label ids in stream order."""
    return list(record(name)["order"])
