"""Parity with the reference PyTorch implementations in Hugging Face transformers.

Runs with the optional ``parity`` extra (torch, transformers); skipped without it.
- CLIP: a tiny random ``CLIPModel`` saved with ``save_pretrained`` (model.safetensors +
  config.json) is loaded by ``load_clip_safetensors``; image embeddings, text
  embeddings and logits agree within 1e-4.
- Tokenizer: ``CLIPTokenizer`` built from the same merges gives the same ids.
- Full-size layouts: the state-dict keys and shapes of ``CLIPModel`` for every
  registered CLIP variant (built on the meta device: nothing allocated) equal ours.
- ViT: our npz-named parameters, mapped the way timm maps the published files, into a
  ``ViTModel`` give the same class-token features.
"""

import gzip
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trm_jax import models  # noqa: E402
from trm_jax.models import clip, common, loaders  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def _perturb(model, seed):
    """Add noise to every parameter so LayerNorm scales/biases are not the trivial 1/0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _tensor(out, attr):
    """transformers 5 returns a ModelOutput from get_*_features; 4.x a tensor."""
    return out if torch.is_tensor(out) else getattr(out, attr)


@pytest.fixture(scope="module")
def hf_clip(tok, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tok.sot_token_id,
            eos_token_id=tok.eot_token_id,
            pad_token_id=tok.eot_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    _perturb(model, 1)
    directory = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def test_clip_parity(hf_clip, tok):
    model, directory = hf_clip
    with open(directory / "config.json") as f:
        variant = loaders.clip_variant_from_hf_config(json.load(f), name="clip_tiny")
    weights = loaders.load_clip_safetensors(str(directory / "model.safetensors"), variant)
    backbone = models.make_backbone(weights.variant, weights.params, weights.text_params)

    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    tokens = tok(
        [
            "a photo of a cat.",
            "art of the automobile.",
            "a horse in a video game.",
            "itap of a truck.",
        ]
    )
    ours_image = np.asarray(jax.jit(backbone.features_fn)(backbone.params, images))
    ours_text = np.asarray(jax.jit(backbone.encode_text_fn)(backbone.text_params, tokens))
    ours_logits = np.asarray(
        clip.clip_logits(ours_image, ours_text, backbone.text_params["logit_scale"])
    )

    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        ids = torch.from_numpy(tokens.astype(np.int64))
        ref_image = _tensor(model.get_image_features(pixel_values=pixels), "pooler_output")
        ref_text = _tensor(model.get_text_features(input_ids=ids), "pooler_output")
        out = model(input_ids=ids, pixel_values=pixels)

    np.testing.assert_allclose(ours_image, ref_image.numpy(), **TOL)
    np.testing.assert_allclose(ours_text, ref_text.numpy(), **TOL)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit(ours_image), out.image_embeds.numpy(), **TOL)
    np.testing.assert_allclose(unit(ours_text), out.text_embeds.numpy(), **TOL)
    np.testing.assert_allclose(ours_logits, out.logits_per_image.numpy(), **TOL)
    assert np.abs(ours_logits).max() > 1e-2  # not a degenerate comparison


def test_tokenizer_parity(vocab_path, tok, tmp_path):
    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    texts = [
        "a photo of a cat.",
        "A Bad PHOTO of the  airplane!",
        "it's a ship's photo; they're here.",
        "2 frogs, 42 deer",
        "café naïve über",
        "unseen zebra words?!",
    ]
    expected = hf(texts)["input_ids"]
    for text, ids in zip(texts, expected, strict=True):
        assert [tok.sot_token_id, *tok.encode(text), tok.eot_token_id] == list(ids), text


@pytest.mark.parametrize("name", ["clip_vit_b16", "clip_vit_b32", "clip_vit_l14"])
def test_full_size_clip_layout(name):
    variant = models.get(name)
    vision = dict(
        hidden_size=variant.vision_width,
        intermediate_size=variant.vision_mlp_dim,
        num_hidden_layers=variant.vision_layers,
        num_attention_heads=variant.vision_heads,
        image_size=variant.image_size,
        patch_size=variant.patch_size,
    )
    text = dict(
        hidden_size=variant.text_width,
        intermediate_size=variant.text_mlp_dim,
        num_hidden_layers=variant.text_layers,
        num_attention_heads=variant.text_heads,
        vocab_size=variant.vocab_size,
        max_position_embeddings=variant.context_length,
    )
    config = transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=variant.projection_dim
    )
    with torch.device("meta"):
        model = transformers.CLIPModel(config)
    theirs = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if k not in loaders.HF_CLIP_BUFFERS
    }
    assert theirs == loaders.hf_clip_shapes(variant)


def _hf_vit_state(params, depth, new_names: bool):
    """Our npz-named ViT params -> a transformers ViTModel state dict (timm's mapping)."""
    flat = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in common.flatten(params).items()}
    d = flat["cls"].shape[-1]
    sd = {
        "embeddings.cls_token": flat["cls"],
        "embeddings.position_embeddings": flat["Transformer/posembed_input/pos_embedding"],
        "embeddings.patch_embeddings.projection.weight": flat["embedding/kernel"].permute(
            3, 2, 0, 1
        ),
        "embeddings.patch_embeddings.projection.bias": flat["embedding/bias"],
        "layernorm.weight": flat["Transformer/encoder_norm/scale"],
        "layernorm.bias": flat["Transformer/encoder_norm/bias"],
    }
    for i in range(depth):
        src = f"Transformer/encoderblock_{i}/"
        mha = src + "MultiHeadDotProductAttention_1/"
        if new_names:
            dst = f"layers.{i}."
            names = {
                "query": "attention.q_proj",
                "key": "attention.k_proj",
                "value": "attention.v_proj",
                "out": "attention.o_proj",
                "fc1": "mlp.fc1",
                "fc2": "mlp.fc2",
            }
        else:
            dst = f"encoder.layer.{i}."
            names = {
                "query": "attention.attention.query",
                "key": "attention.attention.key",
                "value": "attention.attention.value",
                "out": "attention.output.dense",
                "fc1": "intermediate.dense",
                "fc2": "output.dense",
            }
        for n in ("query", "key", "value"):
            sd[f"{dst}{names[n]}.weight"] = flat[f"{mha}{n}/kernel"].reshape(d, d).T
            sd[f"{dst}{names[n]}.bias"] = flat[f"{mha}{n}/bias"].reshape(d)
        sd[f"{dst}{names['out']}.weight"] = flat[f"{mha}out/kernel"].reshape(d, d).T
        sd[f"{dst}{names['out']}.bias"] = flat[f"{mha}out/bias"]
        for j, n in enumerate(("fc1", "fc2")):
            sd[f"{dst}{names[n]}.weight"] = flat[f"{src}MlpBlock_3/Dense_{j}/kernel"].T
            sd[f"{dst}{names[n]}.bias"] = flat[f"{src}MlpBlock_3/Dense_{j}/bias"]
        for ours, theirs in (
            ("LayerNorm_0", "layernorm_before"),
            ("LayerNorm_2", "layernorm_after"),
        ):
            sd[f"{dst}{theirs}.weight"] = flat[f"{src}{ours}/scale"]
            sd[f"{dst}{theirs}.bias"] = flat[f"{src}{ours}/bias"]
    return sd


def test_vit_parity(tiny_vit, tmp_path):
    path = str(tmp_path / "vit.npz")
    loaders.create_checkpoint(tiny_vit, path, seed=5)
    params = loaders.load_vit_npz(path, tiny_vit)
    # make every tensor (LayerNorms, biases) non-trivial
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = treedef.unflatten(
        [p + 0.05 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    wanted = set(model.state_dict())
    for new_names in (True, False):
        sd = _hf_vit_state(params, tiny_vit.depth, new_names)
        if set(sd) == wanted:
            break
    else:
        pytest.fail(f"unknown ViTModel state-dict naming: {sorted(wanted)[:8]}")
    model.load_state_dict(sd)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    ours = jax.jit(models.make_backbone(tiny_vit, params).features_fn)(params, images)
    np.testing.assert_allclose(np.asarray(ours), ref.last_hidden_state[:, 0].numpy(), **TOL)
