"""Config helpers shared by the runner tests (importable: pytest puts this folder on
``sys.path`` for the test modules beside it)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FMNIST = "/usr/share/datasets/fashion-mnist"


def tiny_config(**overrides):
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs/tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for k, v in overrides.items():
        obj = c
        *path, last = k.split(".")
        for p in path:
            obj = obj[p]
        obj[last] = v
    return c
