"""The registry of continual-learning methods: ``config.merge.method`` -> plug-in.

Each entry is a ``base.Method`` (see its module docstring for the protocol). Rule merges
are registered from ``merging.MERGERS``: those with a running form in
``merging.running`` as ``RunningRule``, the rest as ``RuleMerge``.

Adding a method (docs/runner.md, "Adding a method"): write ``methods/<name>.py`` with a
``Method`` subclass, add one line to ``METHODS`` below (or call ``register`` from your own
code), and test it.
"""

from __future__ import annotations

from trm_jax import merging
from trm_jax.errors import UnknownNameError
from trm_jax.runner.methods.base import Carry, Finetuned, Method, Task, Training
from trm_jax.runner.methods.became import Became
from trm_jax.runner.methods.cmm import CMM
from trm_jax.runner.methods.ewc import EWC
from trm_jax.runner.methods.joint import Joint
from trm_jax.runner.methods.lwf import LwF
from trm_jax.runner.methods.magmax_ind import MagMaxInd
from trm_jax.runner.methods.opcm import OPCM
from trm_jax.runner.methods.pam import PAM
from trm_jax.runner.methods.rule import RuleMerge
from trm_jax.runner.methods.running_rule import RunningRule
from trm_jax.runner.methods.seq_ft import SeqFT
from trm_jax.runner.methods.trm import TRM
from trm_jax.runner.methods.tunable_magmax import TunableMagMax
from trm_jax.runner.methods.zeroshot import ZeroShot

METHODS: dict[str, Method] = {
    "seq_ft": SeqFT(),
    "lwf": LwF(),
    "ewc": EWC(),
    "joint": Joint(),
    "zeroshot": ZeroShot(),
    "trm": TRM(),
    "cmm": CMM(),
    "opcm": OPCM(),
    "became": Became(),
    "tunable_magmax": TunableMagMax(),
    "pam": PAM(),
    "magmax_ind": MagMaxInd(),
    **{
        name: RunningRule(name) if name in merging.running.STATES else RuleMerge(name)
        for name in merging.MERGERS
    },
}


def choices() -> list[str]:
    """Every value ``config.merge.method`` accepts."""
    return sorted(METHODS)


def get(name: str) -> Method:
    """The method registered under ``name``; ``UnknownNameError`` lists the choices."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown merge.method {name!r}; choices: {', '.join(choices())}")
    return METHODS[name]


def register(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (replacing any entry of that name)."""
    METHODS[method.name] = method
    return method


__all__ = ["METHODS", "Carry", "Finetuned", "Method", "Task", "Training", "choices", "get"]
__all__ += ["register"]
