"""Shared settings of the paper benchmarks (CLIP ViT-B/16, MagMax's hyper-parameters).

Not a runnable config by itself: ``cifar100_10.py`` and friends call ``get_paper_config``.
Weights: OpenAI CLIP ViT-B/16 as a Hugging Face ``model.safetensors`` plus the CLIP BPE
vocabulary, found under ``$TRM_JAX_WEIGHTS`` (default ``~/.cache/trm_jax/weights``):
``clip_vit_b16/model.safetensors`` and ``bpe_simple_vocab_16e6.txt.gz``. Data: TFDS
(``data.data_dir``; ``--config.data.download=True`` lets TFDS fetch what it can).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402

WEIGHTS = os.environ.get("TRM_JAX_WEIGHTS", "~/.cache/trm_jax/weights")


def get_paper_config(name: str, num_tasks: int, epochs: int):
    c = common.get_config()
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
