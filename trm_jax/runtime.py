"""Process-wide JAX set-up that entry points call (never at import time)."""

from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str) -> None:
    """Turn on JAX's persistent compilation cache at ``path`` ('' = leave it off).

    Repeated runs then skip most XLA compilation, which dominates short CPU runs (TRM's
    second-order steps compile once per stream)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
