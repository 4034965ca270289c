"""Sequential fine-tuning: each task starts from the previous model, nothing is merged."""

from trm_jax.runner.methods.base import Method


class SeqFT(Method):
    """theta_bar_t = theta_t (the protocol's lower bound on forgetting control)."""
