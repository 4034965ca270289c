"""Backbones (ViT, CLIP) behind a pure functional boundary, their heads and loaders.

    from trm_jax import models
    cfg = models.default_config()            # name='vit_tiny', random init
    backbone = models.build(cfg, key=jax.random.key(0))
    feats = jax.jit(backbone.features_fn)(backbone.params, images)   # [B, D] float32

``MODELS`` maps a registry name to a frozen variant config (``vit.ViTConfig`` or
``clip.CLIPConfig``); ``get(name, **overrides)`` returns one with fields replaced;
``build(model_config, key=)`` turns a ``default_config()``-shaped ConfigDict into a
``Backbone`` (random init, or the weights of ``model_config.checkpoint``: a local file or
an ``hf:<org>/<name>`` hub repository, see ``hub``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from trm_jax.errors import ConfigError, UnknownNameError
from trm_jax.models import clip, common, heads, hub, loaders, tokenizer, vit
from trm_jax.models.common import Backbone, count_params

__all__ = [
    "MODELS",
    "Backbone",
    "build",
    "clip",
    "clip_tokenizer",
    "common",
    "count_params",
    "default_config",
    "get",
    "heads",
    "hub",
    "init",
    "loaders",
    "make_backbone",
    "param_shapes",
    "tokenizer",
    "variant_from_config",
    "vit",
    "zeroshot_head",
]


def _vit(name, width, depth, heads_, mlp_dim, patch, **kw) -> vit.ViTConfig:
    return vit.ViTConfig(
        name=name, width=width, depth=depth, heads=heads_, mlp_dim=mlp_dim, patch_size=patch, **kw
    )


_VIT_SIZES = {  # width, depth, heads, mlp_dim (Dosovitskiy et al.; Steiner et al. for Ti/S)
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
}

MODELS: dict[str, vit.ViTConfig | clip.CLIPConfig] = {
    **{
        f"vit_{size}{patch}": _vit(f"vit_{size}{patch}", *dims, patch)
        for size, dims in _VIT_SIZES.items()
        for patch in (16, 32)
    },
    # Tests and the embedded offline default: 28 px grayscale, ~0.14M parameters.
    "vit_tiny": _vit("vit_tiny", 64, 4, 4, 128, 4, image_size=28, channels=1),
    "clip_vit_b16": clip.CLIPConfig(name="clip_vit_b16"),
    "clip_vit_b32": clip.CLIPConfig(name="clip_vit_b32", patch_size=32),
    "clip_vit_l14": clip.CLIPConfig(
        name="clip_vit_l14",
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        vision_mlp_dim=4096,
        text_width=768,
        text_heads=12,
        text_mlp_dim=3072,
        projection_dim=768,
    ),
}

# OpenAI's seven-prompt ensemble recommended for ImageNet zero-shot transfer.
DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def get(name: str, **overrides):
    """The registered variant ``name`` with ``overrides`` applied (a new frozen config).

    Unknown names raise ``UnknownNameError`` (a ``KeyError``) listing the choices; unknown
    fields or invalid values raise ``ConfigError``.
    """
    if name not in MODELS:
        raise UnknownNameError(f"unknown model {name!r}; choices: {', '.join(sorted(MODELS))}")
    variant = MODELS[name]
    fields = {f.name for f in dataclasses.fields(variant)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"model {name!r} has no field(s) {unknown}; fields: {sorted(fields)}")
    return dataclasses.replace(variant, **overrides)


def default_config() -> ml_collections.ConfigDict:
    """Every field ``build`` and the heads read. 0 (or -1 where 0 is meaningful) keeps the
    variant's own value.

    name: registry key (``sorted(models.MODELS)``).
    checkpoint: weights ('' = random init): a ViT ``.npz`` or a CLIP ``model.safetensors``
      file, or ``hf:<org>/<name>[@<revision>]``, a hub repository in the transformers
      layout (``hf:openai/clip-vit-base-patch16``, ``hf:google/vit-base-patch16-224-in21k``)
      fetched into the Hugging Face cache (``HF_HOME``, ``HF_HUB_OFFLINE`` honoured).
    checkpoint_format: 'auto' (by file suffix; hub repos are safetensors) | 'npz' |
      'safetensors'.
    image_size, patch_size, channels: input geometry overrides (position embeddings of a
      checkpoint are resampled to the new grid).
    width, depth, heads, mlp_dim, representation_size: ViT shape overrides (random init;
      representation_size=-1 keeps the variant's, 0 removes pre_logits).
    dtype: compute dtype 'float32' | 'bfloat16' (parameters stay float32).
    head: 'prototype' | 'zeroshot' | 'linear'; head_scale: cosine-logit multiplier.
    zeroshot_head: '' or a precomputed ``[C, D]`` rows ``.npy`` (skips the text tower).
    tokenizer_vocab: CLIP BPE file (``bpe_simple_vocab_16e6.txt.gz``), a folder holding
      ``vocab.json`` + ``merges.txt``, or ``hf:<org>/<name>``, for zero-shot heads; '' with
      an ``hf:`` CLIP checkpoint reads the tokenizer files of that repository.
    templates: prompt templates with ``{}`` for the class name.
    """
    return ml_collections.ConfigDict(
        {
            "name": "vit_tiny",
            "checkpoint": "",
            "checkpoint_format": "auto",
            "image_size": 0,
            "patch_size": 0,
            "channels": 0,
            "width": 0,
            "depth": 0,
            "heads": 0,
            "mlp_dim": 0,
            "representation_size": -1,
            "dtype": "float32",
            "head": "prototype",
            "head_scale": 100.0,
            "zeroshot_head": "",
            "tokenizer_vocab": "",
            "templates": DEFAULT_TEMPLATES,
        }
    )


HEADS = heads.HEADS
_FORMATS = ("auto", "npz", "safetensors")


def variant_from_config(model_config: ml_collections.ConfigDict):
    """The variant ``model_config`` describes: ``get(name)`` plus its non-default overrides."""
    cfg = model_config
    if cfg.head not in HEADS:
        raise ConfigError(f"model.head {cfg.head!r} not in {HEADS}")
    if cfg.name not in MODELS:
        raise UnknownNameError(f"unknown model {cfg.name!r}; choices: {', '.join(sorted(MODELS))}")
    overrides = {k: cfg[k] for k in ("image_size", "patch_size", "channels") if cfg[k]}
    if cfg.dtype != "float32":
        overrides["dtype"] = cfg.dtype
    vit_only = {k: cfg[k] for k in ("width", "depth", "heads", "mlp_dim") if cfg[k]}
    if cfg.representation_size >= 0:
        vit_only["representation_size"] = cfg.representation_size
    if vit_only and MODELS[cfg.name].family != "vit":
        raise ConfigError(
            f"model fields {sorted(vit_only)} apply to ViT variants only, not {cfg.name!r}"
        )
    return get(cfg.name, **overrides, **vit_only)


def _format(path: str, fmt: str) -> str:
    if fmt not in _FORMATS:
        raise ConfigError(f"model.checkpoint_format {fmt!r} not in {_FORMATS}")
    if fmt != "auto":
        return fmt
    for suffix, found in ((".npz", "npz"), (".safetensors", "safetensors")):
        if path.endswith(suffix):
            return found
    raise ConfigError(
        f"cannot tell the format of {path!r} from its suffix; set "
        "model.checkpoint_format to 'npz' or 'safetensors'"
    )


def make_backbone(variant, params, text_params=None) -> Backbone:
    """Wrap ``params`` (and CLIP ``text_params``) of ``variant`` as a ``Backbone``."""
    is_clip = variant.family == "clip"
    return Backbone(
        name=variant.name,
        variant=variant,
        params=params,
        features_fn=(clip if is_clip else vit).make_features_fn(variant),
        image_size=variant.image_size,
        channels=variant.channels,
        feature_dim=variant.feature_dim,
        normalization=variant.normalization,
        text_params=text_params if is_clip else None,
        encode_text_fn=clip.make_encode_text_fn(variant) if is_clip else None,
    )


def init(variant, *, key: jax.Array) -> Backbone:
    """A randomly initialised ``Backbone`` of ``variant``."""
    if variant.family == "clip":
        return make_backbone(variant, *clip.init_params(variant, key))
    return make_backbone(variant, vit.init_params(variant, key))


def param_shapes(variant):
    """Image-tower parameter shapes of ``variant`` (``jax.ShapeDtypeStruct`` pytree)."""
    if variant.family == "clip":
        return clip.param_shapes(variant)[0]
    return vit.param_shapes(variant)


def build(model_config: ml_collections.ConfigDict, *, key: jax.Array) -> Backbone:
    """The ``Backbone`` ``model_config`` asks for: random init from ``key`` when
    ``checkpoint`` is empty, else the checkpoint's weights (``key`` unused)."""
    variant = variant_from_config(model_config)
    path = model_config.checkpoint
    if not path:
        return init(variant, key=key)
    if hub.is_hub(path):
        return _build_from_hub(variant, path, model_config.checkpoint_format)
    fmt = _format(path, model_config.checkpoint_format)
    wanted = {"vit": "npz", "clip": "safetensors"}[variant.family]
    if fmt != wanted:
        raise ConfigError(
            f"{variant.family.upper()} variant {variant.name!r} loads {wanted} "
            f"checkpoints, got {fmt} ({path})"
        )
    path = os.path.expanduser(path)
    if variant.family == "vit":
        return make_backbone(variant, loaders.load_vit_npz(path, variant))
    weights = loaders.load_clip_safetensors(path, variant)
    return make_backbone(weights.variant, weights.params, weights.text_params)


def _build_from_hub(variant, spec: str, fmt: str) -> Backbone:
    """A hub repository in the transformers layout: ``model.safetensors`` + ``config.json``
    (CLIP also its tokenizer files, fetched together so later offline runs have them)."""
    if fmt not in ("auto", "safetensors"):
        raise ConfigError(f"{spec} is read as model.safetensors; set checkpoint_format='auto'")
    files = hub.resolve(spec, hub.files_for(variant.family))
    loaders.check_hf_config(loaders.read_hf_config(files["config.json"]), variant.family, spec)
    weights = files["model.safetensors"]
    if variant.family == "vit":
        return make_backbone(variant, loaders.load_vit_safetensors(weights, variant))
    loaded = loaders.load_clip_safetensors(weights, variant)
    return make_backbone(loaded.variant, loaded.params, loaded.text_params)


def clip_tokenizer(model_config: ml_collections.ConfigDict) -> tokenizer.ClipTokenizer:
    """The CLIP tokenizer ``model_config`` names: ``tokenizer_vocab`` (a BPE file, a folder
    with ``vocab.json`` + ``merges.txt``, or ``hf:<repo>``), else the tokenizer files of an
    ``hf:`` checkpoint's repository."""
    spec = model_config.tokenizer_vocab
    if not spec and hub.is_hub(model_config.checkpoint):
        spec = model_config.checkpoint
    if not spec:
        raise ConfigError(
            "a zero-shot head needs model.zeroshot_head (.npy rows), model.tokenizer_vocab "
            "(bpe_simple_vocab_16e6.txt.gz) or an hf: CLIP checkpoint (its vocab.json, merges.txt)"
        )
    if hub.is_hub(spec):
        files = hub.resolve(spec, hub.TOKENIZER_FILES)
        return tokenizer.ClipTokenizer(files["merges.txt"], vocab_json=files["vocab.json"])
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        vocab_json, merges = (os.path.join(path, name) for name in hub.TOKENIZER_FILES)
        return tokenizer.ClipTokenizer(merges, vocab_json=vocab_json)
    return tokenizer.ClipTokenizer(path)


def zeroshot_head(backbone: Backbone, class_names, model_config: ml_collections.ConfigDict):
    """Zero-shot rows ``[C, D]``: from ``model_config.zeroshot_head`` (.npy) when set, else
    from the CLIP text tower with ``clip_tokenizer(model_config)`` and ``templates``."""
    if model_config.zeroshot_head:
        return heads.load_rows(
            model_config.zeroshot_head,
            num_classes=len(class_names),
            feature_dim=backbone.feature_dim,
        )
    tok = clip_tokenizer(model_config)
    return heads.zeroshot_rows(backbone, class_names, tuple(model_config.templates), tok)
