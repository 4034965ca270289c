r"""The paper benchmarks: CLIP ViT-B/16 with MagMax's hyper-parameters, one parameterised
config (``--config configs/paper.py:<benchmark>,<tasks>``).

    python -m trm_jax.main --config configs/paper.py:cifar100,10 --workdir runs/cifar100_10
    python -m trm_jax.main --config configs/paper.py:cifar100,10 --workdir runs/c10_magmax \
        --config.merge.method=magmax --config.merge.chain=finetuned

Benchmarks (MagMax's epochs per task): ``cifar100`` (10), ``imagenet_r`` (10),
``cub200`` (30), ``cars196`` (30); any task count the class count allows. A third field
overrides the epochs: ``configs/paper.py:cifar100,20,5``.

Weights: OpenAI CLIP ViT-B/16 from the Hugging Face hub (``hf:openai/clip-vit-base-patch16``,
its safetensors and tokenizer files, in the hub's usual cache; ``HF_HUB_OFFLINE=1`` runs
from the cache alone). Class orders: the fixed lists of MagMax's published code
(``data.class_order='magmax'``; Cars in natural order). Data: TFDS, downloaded where TFDS can
(CIFAR-100, CUB-200); Cars needs its archives in ``data.manual_dir``; ImageNet-R is read from
an image folder (``$TRM_JAX_DATA/imagenet-r``, default ``~/data/imagenet-r``) with the fixed,
seed-independent ``path_hash`` test split (docs/data-paper.md). Where something is absent
the run stops with one line saying what is missing and how to get it.
"""

import os

from trm_jax.errors import ConfigError
from trm_jax.runner import config as base

DATA = os.path.expanduser(os.environ.get("TRM_JAX_DATA", "~/data"))
EPOCHS = {"cifar100": 10, "imagenet_r": 10, "cub200": 30, "cars196": 30}
CLIP = "hf:openai/clip-vit-base-patch16"


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
    c.data.class_order = "magmax"  # MagMax's fixed lists (Cars: natural order)
    c.data.download = name in ("cifar100", "cub200")  # what TFDS can fetch by itself
    c.data.val_fraction = 0.1
    if name == "imagenet_r":
        c.data.source = "folder"
        c.data.path = os.path.join(DATA, "imagenet-r")
        c.data.folder_test_split = "path_hash"  # fixed 80/20 split, seed-independent
        c.data.test_fraction = 0.2
    c.model.name = "clip_vit_b16"
    c.model.checkpoint = CLIP
    c.model.tokenizer_vocab = ""  # the tokenizer files of the checkpoint's hub repository
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
    c.log.tensorboard = True  # curves under <workdir>/tensorboard
    return c
