r"""Stanford Cars, 10 tasks (196 classes), CLIP ViT-B/16, MagMax's hparams (30 epochs/task).

    python -m trm_jax.main --config configs/cars196_10.py --workdir runs/cars196_10
    python -m trm_jax.main --config configs/cars196_10.py --workdir runs/cars196_10_magmax \
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
    return paper.get_paper_config("cars196", num_tasks=10, epochs=30)
