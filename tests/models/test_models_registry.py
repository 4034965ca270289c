"""Registry, config and parameter counts (shapes via jax.eval_shape: nothing allocated)."""

import jax
import numpy as np
import pytest

from trm_jax import models
from trm_jax.errors import CheckpointError, ConfigError
from trm_jax.models import clip, common, vit

# Exact image-tower sizes (no classifier head), pinned.
PINNED = {
    "vit_ti16": 5_524_416,
    "vit_ti32": 5_938_560,
    "vit_s16": 21_665_664,
    "vit_s32": 22_493_952,
    "vit_b16": 85_798_656,
    "vit_b32": 87_455_232,
    "vit_l16": 303_301_632,
    "vit_l32": 305_510_400,
    "vit_tiny": 138_368,
    "clip_vit_b16": 86_192_640,
    "clip_vit_b32": 87_849_216,
    "clip_vit_l14": 303_966_208,
}

# Published sizes in millions WITH a 1000-class head (timm's model cards for the
# vision_transformer / AugReg weights), and published CLIP totals (both towers + logit scale).
PUBLISHED_WITH_1K_HEAD_M = {
    "vit_ti16": 5.72,
    "vit_s16": 22.05,
    "vit_s32": 22.88,
    "vit_b16": 86.57,
    "vit_b32": 88.22,
    "vit_l16": 304.33,
    "vit_l32": 306.54,
}
PUBLISHED_CLIP_TOTAL = {
    "clip_vit_b16": 149_620_737,  # openai/clip-vit-base-patch16
    "clip_vit_b32": 151_277_313,  # openai/clip-vit-base-patch32
    "clip_vit_l14": 427_616_513,  # openai/clip-vit-large-patch14
}


def vit_closed_form(v: vit.ViTConfig) -> int:
    """Parameter count of a ViT from its shape, written out term by term."""
    d, m, n = v.width, v.mlp_dim, v.grid**2
    embed = v.patch_size**2 * v.channels * d + d + d + (n + 1) * d  # conv, cls, posemb
    block = 4 * (d * d + d) + 2 * (2 * d) + (d * m + m) + (m * d + d)  # qkvo, 2 LN, MLP
    pre_logits = v.representation_size * (d + 1)
    return embed + v.depth * block + 2 * d + pre_logits


def test_registry_is_complete_and_pinned():
    assert set(models.MODELS) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_param_counts(name):
    variant = models.get(name)
    count = models.count_params(models.param_shapes(variant))
    assert count == PINNED[name]
    if variant.family == "vit":
        assert count == vit_closed_form(variant)
    if name in PUBLISHED_WITH_1K_HEAD_M:
        with_head = count + variant.width * 1000 + 1000
        assert with_head / 1e6 == pytest.approx(PUBLISHED_WITH_1K_HEAD_M[name], abs=0.006)
    if name in PUBLISHED_CLIP_TOTAL:
        image, text = clip.param_shapes(variant)
        assert models.count_params(image) + models.count_params(text) == PUBLISHED_CLIP_TOTAL[name]


def test_vit_b16_is_85_8m():
    assert round(models.count_params(models.param_shapes(models.get("vit_b16"))) / 1e6, 1) == 85.8


def test_vit_names_are_the_published_npz_keys():
    names = set(common.flatten(models.param_shapes(models.get("vit_b16"))))
    for key in [
        "embedding/kernel",
        "embedding/bias",
        "cls",
        "Transformer/posembed_input/pos_embedding",
        "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/query/kernel",
        "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias",
        "Transformer/encoderblock_5/LayerNorm_2/scale",
        "Transformer/encoder_norm/bias",
    ]:
        assert key in names
    assert len(names) == 4 + 2 + 12 * 16


def test_unknown_name_lists_choices():
    with pytest.raises(KeyError, match="vit_b16.*vit_tiny|choices"):
        models.get("vit_h14")
    cfg = models.default_config()
    cfg.name = "resnet50"
    with pytest.raises(KeyError, match="clip_vit_b16"):
        models.build(cfg, key=jax.random.key(0))


def test_overrides_and_invalid_values():
    v = models.get("vit_tiny", image_size=32, channels=3)
    assert (v.image_size, v.channels, v.grid, v.width) == (32, 3, 8, 64)
    assert models.MODELS["vit_tiny"].image_size == 28  # registry untouched
    with pytest.raises(ConfigError, match="no field"):
        models.get("vit_tiny", hidden=3)
    with pytest.raises(ConfigError, match="not a multiple"):
        models.get("vit_b16", image_size=100)
    with pytest.raises(ConfigError, match="divisible"):
        models.get("vit_tiny", heads=3)


def test_default_config_builds_the_embedded_default():
    cfg = models.default_config()
    for field in [
        "name",
        "checkpoint",
        "checkpoint_format",
        "image_size",
        "patch_size",
        "head",
        "head_scale",
        "zeroshot_head",
        "tokenizer_vocab",
        "templates",
        "dtype",
        "width",
        "depth",
        "heads",
        "mlp_dim",
    ]:
        assert field in cfg
    backbone = models.build(cfg, key=jax.random.key(0))
    assert (backbone.name, backbone.image_size, backbone.channels, backbone.feature_dim) == (
        "vit_tiny",
        28,
        1,
        64,
    )
    assert backbone.normalization == "inception" and backbone.encode_text_fn is None
    images = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    feats = jax.jit(backbone.features_fn)(backbone.params, images)
    assert feats.shape == (2, 64) and feats.dtype == np.float32
    # The same variant hands out the same function object (no retracing for jitted callers).
    again = models.build(cfg, key=jax.random.key(1))
    assert again.features_fn is backbone.features_fn


def test_config_errors():
    cfg = models.default_config()
    cfg.name = "clip_vit_b16"
    cfg.width = 32
    with pytest.raises(ConfigError, match="ViT variants only"):
        models.build(cfg, key=jax.random.key(0))
    cfg = models.default_config()
    cfg.head = "knn"
    with pytest.raises(ConfigError, match="prototype"):
        models.build(cfg, key=jax.random.key(0))
    cfg = models.default_config()
    cfg.checkpoint = "/nonexistent/weights.bin"
    with pytest.raises(ConfigError, match="checkpoint_format"):
        models.build(cfg, key=jax.random.key(0))
    cfg.checkpoint = "/nonexistent/model.safetensors"
    with pytest.raises(ConfigError, match="loads npz"):
        models.build(cfg, key=jax.random.key(0))
    cfg.checkpoint = "/nonexistent/ViT-B_16.npz"
    with pytest.raises(CheckpointError, match="not found"):
        models.build(cfg, key=jax.random.key(0))
