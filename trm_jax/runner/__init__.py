"""The continual-learning runner: the task loop, its config, and the method plug-ins.

    from trm_jax import runner
    metrics = runner.run(config, "runs/demo")   # config: runner.get_config() + overrides

- ``loop``: ``run`` (resume, the task loop, the report) and ``run_task`` (one task);
- ``methods``: the method protocol and the ``METHODS`` registry;
- ``config``: the complete config tree (``get_config``);
- ``setup``: the model, its jitted functions and heads; ``pretrain``: theta_0;
- ``train``: the optimiser, the jitted train step, the trajectory and evaluation;
- ``regularizers``: LwF and EWC loss terms.
"""

from trm_jax.runner import methods
from trm_jax.runner.config import get_config
from trm_jax.runner.loop import run, run_task

__all__ = ["get_config", "methods", "run", "run_task"]
