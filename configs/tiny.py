r"""A seconds-long 2-task run for tests and smoke checks (tiny ViT, capped Fashion-MNIST).

    python -m trm_jax.main --config configs/tiny.py --workdir runs/tiny \
        --config.merge.method=magmax

Same fields as every config (``trm_jax.runner.config.get_config``); only sizes are shrunk.
"""

from trm_jax.runner import config as base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.data.source = "idx"
    c.data.name = "fashion_mnist"
    c.data.path = "/usr/share/datasets/fashion-mnist"
    c.data.num_tasks = 2
    c.data.max_train_per_class = 24
    c.data.max_test_per_class = 8
    c.data.val_fraction = 0.25
    c.model.name = "vit_tiny"
    c.model.width = 16
    c.model.depth = 1
    c.model.heads = 2
    c.model.mlp_dim = 32
    c.model.patch_size = 7
    c.model.head = "prototype"
    c.model.head_scale = 10.0
    c.train.lr = 1e-3
    c.train.weight_decay = 0.0
    c.train.batch_size = 16
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.snapshots = 2
    c.train.onset_steps = 2
    c.merge.trm.steps = 3
    c.merge.trm.max_batches = 2
    c.pretrain.enabled = False
    c.pretrain.data.source = "mnist5k"
    c.pretrain.data.name = "mnist5k"
    c.pretrain.data.num_tasks = 1
    c.pretrain.train.steps = 3
    c.pretrain.train.batch_size = 16
    c.pretrain.train.lr = 1e-3
    c.pretrain.train.warmup_steps = 1
    c.eval.batch_size = 64
    c.mesh.data = 1
    c.debug.progress = False
    return c
