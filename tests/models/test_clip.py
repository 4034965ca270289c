"""CLIP towers: safetensors round trip, key checks, resampling, zero-shot head."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trm_jax import models
from trm_jax.errors import CheckpointError, ConfigError
from trm_jax.models import clip, common, heads, loaders

POS = "vision_model.embeddings.position_embedding.weight"


@pytest.fixture(scope="module")
def written(tiny_clip, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "model.safetensors")
    params, text_params = loaders.create_checkpoint(tiny_clip, path, seed=1)
    return path, params, text_params


def test_safetensors_round_trip_and_hf_layout(tiny_clip, written):
    path, params, text_params = written
    tensors = load_file(path)
    assert set(tensors) == set(loaders.hf_clip_shapes(tiny_clip))
    # torch layouts: Linear [out, in], Conv2d [out, in, kh, kw]
    q = common.flatten(params)["vision_model/encoder/layers/0/self_attn/q_proj/kernel"]
    np.testing.assert_array_equal(
        tensors["vision_model.encoder.layers.0.self_attn.q_proj.weight"], np.asarray(q).T
    )
    conv = common.flatten(params)["vision_model/embeddings/patch_embedding/kernel"]
    np.testing.assert_array_equal(
        tensors["vision_model.embeddings.patch_embedding.weight"],
        np.asarray(conv).transpose(3, 2, 0, 1),
    )
    assert tensors["vision_model.pre_layrnorm.weight"].shape == (32,)
    assert tensors["logit_scale"].shape == ()
    loaded = loaders.load_clip_safetensors(path, tiny_clip)
    assert loaded.variant == tiny_clip
    chex.assert_trees_all_equal(loaded.params, params)
    chex.assert_trees_all_equal(loaded.text_params, text_params)


def test_builder_loads_safetensors(tiny_clip, written, monkeypatch):
    path, params, _ = written
    monkeypatch.setitem(models.MODELS, "clip_tiny", tiny_clip)
    cfg = models.default_config()
    cfg.update(name="clip_tiny", checkpoint=path, head="zeroshot")
    backbone = models.build(cfg, key=jax.random.key(0))
    chex.assert_trees_all_equal(backbone.params, params)
    assert (backbone.feature_dim, backbone.normalization, backbone.channels) == (16, "clip", 3)


def test_variant_inferred_from_shapes(tmp_path):
    # head counts follow OpenAI's head width of 64
    variant = clip.CLIPConfig(
        name="clip",
        image_size=32,
        patch_size=16,
        vision_width=128,
        vision_layers=1,
        vision_heads=2,
        vision_mlp_dim=64,
        text_width=64,
        text_layers=2,
        text_heads=1,
        text_mlp_dim=32,
        vocab_size=100,
        context_length=8,
        projection_dim=24,
    )
    path = str(tmp_path / "model.safetensors")
    save_file(
        {k: np.zeros(shape, np.float32) for k, shape in loaders.hf_clip_shapes(variant).items()},
        path,
    )
    assert loaders.load_clip_safetensors(path).variant == variant


def _rewrite(src, dst, edit):
    tensors = load_file(src)
    edit(tensors)
    save_file(tensors, dst)


def test_buffers_dropped_and_mismatches_listed(tiny_clip, written, tmp_path):
    path, params, _ = written
    bad = str(tmp_path / "model.safetensors")
    _rewrite(
        path,
        bad,
        lambda t: t.update(
            {
                "vision_model.embeddings.position_ids": np.arange(17)[None],
                "text_model.embeddings.position_ids": np.arange(16)[None],
            }
        ),
    )
    chex.assert_trees_all_equal(loaders.load_clip_safetensors(bad, tiny_clip).params, params)

    _rewrite(
        path,
        bad,
        lambda t: (
            t.pop("text_projection.weight"),
            t.update({"visual_projection.bias": np.zeros(16, np.float32)}),
        ),
    )
    with pytest.raises(
        CheckpointError,
        match=r"missing 1 \[text_projection.weight\]; "
        r"extra 1 \[visual_projection.bias\]",
    ):
        loaders.load_clip_safetensors(bad, tiny_clip)

    wider = clip.CLIPConfig(**{**tiny_clip.__dict__, "projection_dim": 8})
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped 2 \[.*projection.weight file "
        r"\(16, 32\) vs model \(8, 32\)",
    ):
        loaders.load_clip_safetensors(path, wider)
    with pytest.raises(CheckpointError, match="not a Hugging Face CLIPModel"):
        _rewrite(path, bad, lambda t: t.pop("visual_projection.weight"))
        loaders.load_clip_safetensors(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        loaders.load_clip_safetensors(str(tmp_path / "junk.safetensors"), tiny_clip)


def test_position_embedding_resampled(tiny_clip, written):
    path, params, _ = written
    small = clip.CLIPConfig(**{**tiny_clip.__dict__, "image_size": 16})
    loaded = loaders.load_clip_safetensors(path, small)
    name = "vision_model/embeddings/position_embedding/embedding"
    source = common.flatten(params)[name]
    got = common.flatten(loaded.params)[name]
    assert got.shape == (5, 32)
    np.testing.assert_array_equal(got, common.resample_posemb(source, 2))
    feats = jax.jit(models.make_backbone(small, loaded.params, loaded.text_params).features_fn)(
        loaded.params, jnp.zeros((2, 16, 16, 3))
    )
    assert feats.shape == (2, 16) and np.all(np.isfinite(feats))


def test_text_tower_pools_first_eot_under_causal_mask(tiny_clip, written, tok):
    _, _, text_params = written
    encode = jax.jit(clip.make_encode_text_fn(tiny_clip))
    tokens = tok(["a photo of a cat.", "a photo of a dog."])
    base = encode(text_params, tokens)
    # tokens after the first end-of-text (padding, or any later text) cannot change the
    # pooled state: the mask is causal and pooling reads the first end-of-text position
    noisy = tokens.copy()
    for row in noisy:
        first_eot = int(np.argmax(row == tok.eot_token_id))
        row[first_eot + 1 :] = 7
    np.testing.assert_allclose(encode(text_params, noisy), base, rtol=1e-6, atol=1e-6)
    # shorter sequences (a prefix holding the eot) give the same embedding too
    np.testing.assert_allclose(encode(text_params, tokens[:, :10]), base, rtol=1e-5, atol=1e-6)
    # but changing a token before it does
    changed = tokens.copy()
    changed[:, 1] = 3
    assert not np.allclose(encode(text_params, changed), base, atol=1e-4)


def test_zeroshot_rows(tiny_clip, written, tok):
    _, params, text_params = written
    backbone = models.make_backbone(tiny_clip, params, text_params)
    names = ["cat", "dog", "air_plane"]
    templates = ("a photo of a {}.", "art of the {}.")
    rows = heads.zeroshot_rows(backbone, names, templates, tok, batch_size=4)  # 4, 2 (padded)
    assert rows.shape == (3, 16)
    encode = jax.jit(clip.make_encode_text_fn(tiny_clip))
    for c, name in enumerate(names):
        # one class at a time, in a different batch layout
        embeds = np.asarray(
            encode(text_params, tok([t.format(name.replace("_", " ")) for t in templates] * 2))
        )[:2]
        mean = np.mean([e / np.linalg.norm(e) for e in embeds], axis=0)
        np.testing.assert_allclose(rows[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="template"):
        heads.zeroshot_rows(backbone, names, ("a photo",), tok)
    vit_backbone = models.make_backbone(models.get("vit_tiny"), {})
    with pytest.raises(CheckpointError, match="no text tower"):
        heads.zeroshot_rows(vit_backbone, names, templates, tok)


def test_zeroshot_head_from_config(tiny_clip, written, vocab_path, tmp_path):
    _, params, text_params = written
    backbone = models.make_backbone(tiny_clip, params, text_params)
    cfg = models.default_config()
    cfg.update(
        name="clip_tiny",
        head="zeroshot",
        tokenizer_vocab=vocab_path,
        templates=("a photo of a {}.",),
    )
    rows = models.zeroshot_head(backbone, ["cat", "dog"], cfg)
    npy = str(tmp_path / "rows.npy")
    heads.save_rows(npy, rows)
    cfg.zeroshot_head = npy
    np.testing.assert_array_equal(models.zeroshot_head(backbone, ["cat", "dog"], cfg), rows)
    with pytest.raises(CheckpointError, match=r"shape \(2, 16\)"):
        models.zeroshot_head(backbone, ["cat", "dog", "frog"], cfg)
    cfg.update(zeroshot_head="", tokenizer_vocab="")
    with pytest.raises(ConfigError, match="tokenizer_vocab"):
        models.zeroshot_head(backbone, ["cat"], cfg)


def test_clip_logits_formula():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    expected = (
        100.0
        * (img / np.linalg.norm(img, axis=1, keepdims=True))
        @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    )
    np.testing.assert_allclose(clip.clip_logits(img, txt, np.log(100.0)), expected, rtol=1e-5)
