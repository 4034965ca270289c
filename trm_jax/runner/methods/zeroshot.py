"""Zero-shot: theta_0 with the frozen head, never trained (every table's floor)."""

from trm_jax.runner.methods.base import Method


class ZeroShot(Method):
    """theta_bar_t = theta_0; on small benchmarks it can beat fine-tuning plus merging."""

    name = "zeroshot"
    description = "theta_0 with the frozen head, no fine-tuning"
    finetunes = False
    needs_theta0 = True
