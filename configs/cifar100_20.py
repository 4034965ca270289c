r"""CIFAR-100, 20 tasks of 5 classes, CLIP ViT-B/16, MagMax's hyper-parameters (10 epochs per task).

    python -m trm_jax.main --config configs/cifar100_20.py --workdir runs/cifar100_20
    python -m trm_jax.main --config configs/cifar100_20.py --workdir runs/cifar100_20_magmax \
        --config.merge.method=magmax --config.merge.chain=finetuned

Needs the TFDS data and the CLIP weights (see ``configs/paper.py``); where they are
absent the run stops with one line saying what is missing and how to get it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import paper  # noqa: E402


def get_config(arg=None):
    del arg
    return paper.get_paper_config("cifar100", num_tasks=20, epochs=10)
