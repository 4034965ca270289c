r"""The paper benchmarks: CLIP ViT-B/16 with MagMax's hyper-parameters, one parameterised
config (``--config configs/paper.py:<benchmark>,<tasks>``).

    python -m trm_jax.main --config configs/paper.py:cifar100,10 --workdir runs/cifar100_10
    python -m trm_jax.main --config configs/paper.py:cifar100,10 --workdir runs/c10_magmax \
        --config.merge.method=magmax --config.merge.chain=finetuned

Benchmarks (MagMax's epochs per task): ``cifar100`` (10), ``imagenet_r`` (10),
``cub200`` (30), ``cars196`` (30); any task count the class count allows. A third field
overrides the epochs: ``configs/paper.py:cifar100,20,5``.

Weights: OpenAI CLIP ViT-B/16 as a Hugging Face ``model.safetensors`` plus the CLIP BPE
vocabulary, found under ``$TRM_JAX_WEIGHTS`` (default ``~/.cache/trm_jax/weights``):
``clip_vit_b16/model.safetensors`` and ``bpe_simple_vocab_16e6.txt.gz``. Data: TFDS
(``data.data_dir``; ``--config.data.download=True`` lets TFDS fetch what it can). Where
they are absent the run stops with one line saying what is missing and how to get it.
"""

import os

from trm_jax.errors import ConfigError
from trm_jax.runner import config as base

WEIGHTS = os.environ.get("TRM_JAX_WEIGHTS", "~/.cache/trm_jax/weights")
EPOCHS = {"cifar100": 10, "imagenet_r": 10, "cub200": 30, "cars196": 30}


def get_config(arg: str = "cifar100,10"):
    parts = [p.strip() for p in (arg or "cifar100,10").split(",")]
    if len(parts) not in (2, 3) or parts[0] not in EPOCHS:
        raise ConfigError(
            f"configs/paper.py takes '<benchmark>,<tasks>[,<epochs>]' with a benchmark in "
            f"{sorted(EPOCHS)}; got {arg!r}"
        )
    name, num_tasks = parts[0], int(parts[1])
    epochs = int(parts[2]) if len(parts) == 3 else EPOCHS[name]
    c = base.get_config()
    c.data.source = "tfds"
    c.data.name = name
    c.data.num_tasks = num_tasks
    c.data.class_order = "shuffled"
    c.data.order_seed = 1993  # the usual class-incremental order seed
    c.data.val_fraction = 0.1
    c.model.name = "clip_vit_b16"
    c.model.checkpoint = os.path.join(WEIGHTS, "clip_vit_b16", "model.safetensors")
    c.model.tokenizer_vocab = os.path.join(WEIGHTS, "bpe_simple_vocab_16e6.txt.gz")
    c.model.head = "zeroshot"
    c.model.head_scale = 100.0  # CLIP's logit scale
    # MagMax (Marczak et al. 2024): AdamW 1e-5, wd 0.1, batch 128, cosine, 500 warm-up.
    c.train.optimizer = "adamw"
    c.train.lr = 1e-5
    c.train.weight_decay = 0.1
    c.train.batch_size = 128
    c.train.epochs = epochs
    c.train.warmup_steps = 500
    c.train.grad_clip = 1.0
    c.train.augment = True
    c.train.snapshots = 5
    c.train.onset_steps = 10
    c.merge.method = "trm"
    c.merge.chain = "merged"
    c.merge.lam = 0.5
    c.pretrain.enabled = False  # CLIP weights are theta_0
    c.eval.batch_size = 256
    return c
