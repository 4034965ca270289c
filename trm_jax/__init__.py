"""trm_jax: model-merging continual learning in JAX.

Trajectory Regularized Merging (TRM) and the common merge rules (task arithmetic,
TIES, DARE, MagMax, RandMix, averaging) as pure functions over parameter pytrees,
plus a runner for the class-incremental protocol of MagMax.
"""

__version__ = "0.1.0"
