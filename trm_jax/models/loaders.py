"""Checkpoint converters, one per published format, loud on any mismatch.

- ``load_vit_npz``: the ImageNet-21k ViT ``.npz`` files of google-research/
  vision_transformer (read by big_vision and timm too), e.g. ``ViT-B_16.npz`` or the
  AugReg files ``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz``.
- ``load_clip_safetensors``: Hugging Face ``model.safetensors`` of a ``CLIPModel``
  (``openai/clip-vit-base-patch16`` layout), read with ``safetensors.numpy``.
- ``load_vit_safetensors``: Hugging Face ``model.safetensors`` of a ``ViTModel``
  (``google/vit-base-patch16-224-in21k`` layout: the ImageNet-21k ViT converted from the
  same ``.npz``, its ``pre_logits`` as the ``pooler``).

Each compares the file's names and shapes with the variant's (computed with
``jax.eval_shape``, nothing allocated) and raises ``CheckpointError`` listing every
missing, extra and mis-shaped key. The only changes a loader makes are named here:
the position embedding is resampled when the file's patch grid differs from the
variant's image size; arrays are cast to float32; the npz ``head`` (the 21k-class
classifier), the HF ViT ``classifier`` and the HF ``position_ids`` buffers (constant
``arange``s that old transformers versions serialised) are dropped by name, because they
are not backbone parameters; an npz saved inside an optimizer state (keys under
``opt/target/``) is read from that prefix, an HF ViT with a task head from ``vit.``.

``save_vit_npz``, ``save_vit_safetensors``, ``save_clip_safetensors`` and
``create_checkpoint`` write the same layouts, for offline tests and for exporting
fine-tuned or merged models; ``read_hf_config`` and ``check_hf_config`` read and check
the ``config.json`` next to an HF file.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.errors import CheckpointError
from trm_jax.models import clip, common, vit

# The npz classifier of the pre-training task: not part of the backbone.
NPZ_HEAD_KEYS = ("head/kernel", "head/bias")
# Non-persistent buffers some transformers versions wrote into CLIP checkpoints.
HF_CLIP_BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
_OPT_PREFIX = "opt/target/"
_NPZ_POSEMB = "Transformer/posembed_input/pos_embedding"
_HF_VISION_POSEMB = "vision_model.embeddings.position_embedding.weight"


def _exists(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} checkpoint not found: {path}")


def _shapes(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in flat.items()}


def _square_grid(rows: int, prefix: int = 1) -> int | None:
    grid = round(max(rows - prefix, 0) ** 0.5)
    return grid if grid > 0 and grid * grid + prefix == rows else None


def _resamples_posemb(found: tuple | None, expected: tuple, width: int) -> bool:
    """Whether a stored position embedding of shape ``found`` is one that loading
    resamples to ``expected``: ``[1, 1 + g*g, width]`` on another square grid."""
    return (
        found is not None
        and len(found) == 3
        and found[0] == 1
        and found[2] == width
        and _square_grid(found[1]) is not None
        and found != expected
    )


def _to_jax(flat: Mapping[str, np.ndarray]) -> common.PyTree:
    return common.unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# ----------------------------------------------------------------------------- ViT npz


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file by name (``CheckpointError`` if absent or corrupt)."""
    _exists(path, "npz")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"cannot read npz checkpoint {path}: {err}") from None


def load_vit_npz(path: str, variant: vit.ViTConfig) -> common.PyTree:
    """Parameters of ``variant`` from a vision_transformer / big_vision ViT ``.npz``.

    Returns the plain pytree ``vit.init_params`` would (published names, float32). The
    position embedding is resampled (bilinear, antialiased) when the file was trained at
    a different image size or patch grid than ``variant.image_size`` (e.g. a 224 px
    checkpoint used at 32 px). ``head/*`` is dropped; anything else that is missing,
    extra or of another shape raises ``CheckpointError``.
    """
    arrays = read_npz(path)
    if _OPT_PREFIX + "embedding/kernel" in arrays:
        arrays = {k[len(_OPT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_OPT_PREFIX)}
    arrays = {k: v for k, v in arrays.items() if k not in NPZ_HEAD_KEYS}
    expected = _shapes(common.flatten(vit.param_shapes(variant)))
    found = _shapes(arrays)
    resample = _resamples_posemb(found.get(_NPZ_POSEMB), expected[_NPZ_POSEMB], variant.width)
    if resample:
        found[_NPZ_POSEMB] = expected[_NPZ_POSEMB]
    hints = []
    if any(k.startswith("pre_logits/") for k in found) and not variant.representation_size:
        hints.append("the file has a pre_logits layer: set representation_size to its width")
    emb = found.get("embedding/kernel")
    if emb is not None and len(emb) == 4 and emb[2] != variant.channels:
        hints.append(
            f"the file's patch embedding takes {emb[2]} input channels, the variant "
            f"{variant.channels}: set channels={emb[2]}"
        )
    common.check_keys(
        expected,
        found,
        source=path,
        target=f"ViT variant {variant.name!r} ({variant.image_size} px)",
        hint="; ".join(hints),
    )
    if resample:
        arrays[_NPZ_POSEMB] = np.asarray(
            common.resample_posemb(arrays[_NPZ_POSEMB].astype(np.float32), variant.grid)
        )
    return _to_jax({k: arrays[k] for k in expected})


def save_vit_npz(
    path: str, params: common.PyTree, *, head: Mapping[str, jax.typing.ArrayLike] | None = None
) -> None:
    """Write ViT ``params`` as an ``.npz`` in the published naming (``a/b/c`` keys).

    ``head`` (``{'kernel': [D, K], 'bias': [K]}``) is written as ``head/kernel``,
    ``head/bias`` like the released files; the exact ``path`` is used (no suffix added).
    """
    flat = {k: np.asarray(v) for k, v in common.flatten(params).items()}
    if head is not None:
        flat.update({f"head/{k}": np.asarray(v) for k, v in head.items()})
    with open(path, "wb") as f:
        np.savez(f, **flat)


# -------------------------------------------------------------------- HF ViT safetensors

# The task head of a ViTForImageClassification file: not part of the backbone.
HF_VIT_HEAD_KEYS = ("classifier.weight", "classifier.bias")
_HF_VIT_POSEMB = "embeddings.position_embeddings"
_HF_VIT_TOP = {
    "cls": "embeddings.cls_token",
    "embedding": "embeddings.patch_embeddings.projection",
    _NPZ_POSEMB: _HF_VIT_POSEMB,
    "Transformer/encoder_norm": "layernorm",
    "pre_logits": "pooler.dense",
}
_HF_VIT_BLOCK = {
    "LayerNorm_0": "layernorm_before",
    "LayerNorm_2": "layernorm_after",
    "MultiHeadDotProductAttention_1/query": "attention.attention.query",
    "MultiHeadDotProductAttention_1/key": "attention.attention.key",
    "MultiHeadDotProductAttention_1/value": "attention.attention.value",
    "MultiHeadDotProductAttention_1/out": "attention.output.dense",
    "MlpBlock_3/Dense_0": "intermediate.dense",
    "MlpBlock_3/Dense_1": "output.dense",
}
# transformers >= 5 names ViTModel's block parameters like its other encoders; a file it
# wrote that way is read through these renames to the names every published file uses.
_HF_VIT_V5 = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def _hf_vit_name(name: str) -> str:
    """Our flat (npz) ViT name -> the transformers ``ViTModel`` state-dict key."""
    if name in _HF_VIT_TOP:
        return _HF_VIT_TOP[name]
    module, leaf = name.rsplit("/", 1)
    block = re.match(r"Transformer/encoderblock_(\d+)/(.+)$", module)
    prefix = f"encoder.layer.{block[1]}.{_HF_VIT_BLOCK[block[2]]}" if block else _HF_VIT_TOP[module]
    return f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}"


def _hf_vit_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of our ``name`` in the transformers layout (torch ``[out, in]`` linears)."""
    if name.endswith("/kernel"):
        if len(shape) == 4:  # HWIO -> OIHW
            return (shape[3], shape[2], shape[0], shape[1])
        if "/out/" in name:  # [H, D/H, D] -> [D, D]
            return (shape[-1], int(np.prod(shape[:-1])))
        return (int(np.prod(shape[1:])), shape[0])  # [D, H, D/H] or [in, out] -> [out, in]
    if name.endswith("/bias") and len(shape) == 2:  # [H, D/H] -> [D]
        return (int(np.prod(shape)),)
    return shape


def _vit_to_hf(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith("/kernel"):
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        if "/out/" in name:
            return value.reshape(-1, value.shape[-1]).T
        return value.reshape(value.shape[0], -1).T
    return value.reshape(_hf_vit_shape(name, value.shape))


def _vit_from_hf(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("/kernel"):
        return value.transpose(2, 3, 1, 0) if len(shape) == 4 else value.T.reshape(shape)
    return value.reshape(shape)


def _hf_vit_canonical(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Published ``ViTModel`` names: ``vit.`` prefix and ``classifier.*`` of an image
    classifier removed, transformers-5 block names renamed."""
    tensors = {k: v for k, v in tensors.items() if k not in HF_VIT_HEAD_KEYS}
    if "vit.embeddings.cls_token" in tensors:
        tensors = {k.removeprefix("vit."): v for k, v in tensors.items()}
    out = {}
    for key, value in tensors.items():
        if key.startswith("layers."):
            for pattern, repl in _HF_VIT_V5:
                key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def load_vit_safetensors(path: str, variant: vit.ViTConfig) -> common.PyTree:
    """Parameters of ``variant`` from a Hugging Face ``ViTModel`` ``model.safetensors``.

    The same pytree ``load_vit_npz`` gives for the same weights (published npz names,
    float32): torch ``[out, in]`` linears are transposed and the attention projections
    split into heads; ``pooler.dense`` is ``pre_logits`` (``representation_size`` must
    be its width). The position embedding is resampled as in ``load_vit_npz``. The
    forward pass stays this library's (tanh GELU, LayerNorm epsilon 1e-6, as in the JAX
    code the weights were trained with), whatever ``config.json`` says.
    """
    tensors = _hf_vit_canonical(read_safetensors(path))
    ours = {k: tuple(v.shape) for k, v in common.flatten(vit.param_shapes(variant)).items()}
    by_hf = {_hf_vit_name(k): k for k in ours}
    expected = {hf: _hf_vit_shape(k, ours[k]) for hf, k in by_hf.items()}
    found = _shapes(tensors)
    resample = _resamples_posemb(found.get(_HF_VIT_POSEMB), expected[_HF_VIT_POSEMB], variant.width)
    if resample:
        found[_HF_VIT_POSEMB] = expected[_HF_VIT_POSEMB]
    hints = []
    pooler = found.get("pooler.dense.weight")
    if pooler is not None and not variant.representation_size:
        hints.append(
            f"the file has a pooler (pre_logits) layer: set representation_size={pooler[0]}"
        )
    emb = found.get("embeddings.patch_embeddings.projection.weight")
    if emb is not None and len(emb) == 4 and emb[1] != variant.channels:
        hints.append(f"the file's patch embedding takes {emb[1]} input channels: set channels")
    common.check_keys(
        expected,
        found,
        source=path,
        target=f"ViT variant {variant.name!r} ({variant.image_size} px)",
        hint="; ".join(hints),
    )
    flat = {}
    for hf_key, name in by_hf.items():
        value = np.asarray(tensors[hf_key], np.float32)
        if hf_key == _HF_VIT_POSEMB and resample:
            value = np.asarray(common.resample_posemb(value, variant.grid))
        flat[name] = _vit_from_hf(name, value, ours[name])
    return _to_jax(flat)


def save_vit_safetensors(path: str, params: common.PyTree) -> None:
    """Write ViT ``params`` as a transformers ``ViTModel`` ``model.safetensors``
    (the published names; ``pre_logits`` as ``pooler.dense``)."""
    from safetensors.numpy import save_file

    flat = common.flatten(params)
    save_file(
        {
            _hf_vit_name(k): np.array(_vit_to_hf(k, np.asarray(v, np.float32)), order="C")
            for k, v in flat.items()
        },
        path,
    )


def read_hf_config(path: str) -> dict[str, Any]:
    """A transformers ``config.json`` as a dict (``CheckpointError`` if absent or bad)."""
    _exists(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def check_hf_config(config: Mapping[str, Any], family: str, source: str) -> None:
    """Raise ``CheckpointError`` unless ``config`` describes a model of ``family``.

    The weights' names and shapes are checked by the loaders; this catches a repository
    of another model type (its ``model_type``) and, for CLIP, an activation other than
    OpenAI's ``quick_gelu``.
    """
    model_type = config.get("model_type")
    if model_type is not None and model_type != family:
        raise CheckpointError(
            f"{source} holds a {model_type!r} model, not a {family!r} one (its config.json)"
        )
    if family == "clip":
        try:
            clip_variant_from_hf_config(config)
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{source} is not a CLIPModel config.json (no {err})") from None


# ------------------------------------------------------------------- HF CLIP safetensors


class ClipWeights(NamedTuple):
    """What ``load_clip_safetensors`` returns."""

    variant: clip.CLIPConfig
    params: common.PyTree
    text_params: common.PyTree


def _hf_name(name: str) -> str:
    """Our flat name -> the transformers state-dict key."""
    *parents, leaf = name.split("/")
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join([*parents, leaf])


def _to_hf(name: str, value: np.ndarray) -> np.ndarray:
    """Our layout -> torch layout (dense ``[in,out]`` -> ``[out,in]``, conv HWIO -> OIHW)."""
    if name.endswith("/kernel"):
        return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    return value


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape ``_to_hf`` gives an array of ``shape`` (without allocating one)."""
    if name.endswith("/kernel"):
        return shape[::-1] if len(shape) == 2 else tuple(shape[i] for i in (3, 2, 0, 1))
    return shape


def _from_hf(name: str, value: np.ndarray) -> np.ndarray:
    """Inverse of ``_to_hf`` (``name`` is ours)."""
    if name.endswith("/kernel"):
        return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return value


def hf_clip_shapes(variant: clip.CLIPConfig) -> dict[str, tuple[int, ...]]:
    """The transformers ``CLIPModel`` state-dict keys and shapes for ``variant``."""
    image, text = clip.param_shapes(variant)
    flat = {**common.flatten(image), **common.flatten(text)}
    return {_hf_name(k): _hf_shape(k, tuple(v.shape)) for k, v in flat.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (``CheckpointError`` on failure)."""
    _exists(path, "safetensors")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {err}") from None


def _count_layers(keys, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)})


def clip_variant_from_tensors(
    tensors: Mapping[str, Any], *, name: str = "clip", head_dim: int = 64
) -> clip.CLIPConfig:
    """Infer a ``CLIPConfig`` from HF CLIP tensor shapes.

    Head counts cannot be read from shapes; they are ``width // head_dim`` (64 for every
    OpenAI CLIP). Pass an explicit variant (``clip_variant_from_hf_config``) otherwise.
    """
    needed = [
        "vision_model.embeddings.patch_embedding.weight",
        _HF_VISION_POSEMB,
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "visual_projection.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
    ]
    absent = [k for k in needed if k not in tensors]
    if absent:
        raise CheckpointError(f"not a Hugging Face CLIPModel checkpoint: missing {absent}")
    shape = lambda k: tuple(np.shape(tensors[k]))
    width, channels, patch, _ = shape(needed[0])
    grid = _square_grid(shape(_HF_VISION_POSEMB)[0])
    if grid is None:
        raise CheckpointError(
            f"{_HF_VISION_POSEMB} has {shape(_HF_VISION_POSEMB)[0]} rows: "
            "not a class row plus a square patch grid"
        )
    vocab, text_width = shape(needed[4])
    return clip.CLIPConfig(
        name=name,
        image_size=grid * patch,
        patch_size=patch,
        channels=channels,
        vision_width=width,
        vision_heads=max(width // head_dim, 1),
        vision_layers=_count_layers(tensors, "vision_model.encoder.layers."),
        vision_mlp_dim=shape(needed[2])[0],
        text_width=text_width,
        text_heads=max(text_width // head_dim, 1),
        text_layers=_count_layers(tensors, "text_model.encoder.layers."),
        text_mlp_dim=shape(needed[6])[0],
        vocab_size=vocab,
        context_length=shape(needed[5])[0],
        projection_dim=shape(needed[3])[0],
    )


def clip_variant_from_hf_config(
    config: Mapping[str, Any], *, name: str = "clip", image_size: int | None = None
) -> clip.CLIPConfig:
    """``CLIPConfig`` from a transformers ``config.json`` dict (the file next to the weights).

    Raises ``CheckpointError`` for activations other than ``quick_gelu``.
    """
    vision, text = config["vision_config"], config["text_config"]
    for tower in (vision, text):
        act = tower.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise CheckpointError(
                f"CLIP config uses hidden_act={act!r}; only quick_gelu (OpenAI CLIP) is implemented"
            )
    eos = text.get("eos_token_id", 2)
    if eos == 2:  # the legacy config value; transformers then pools at argmax(ids) = last id
        eos = -1
    return clip.CLIPConfig(
        name=name,
        image_size=image_size or vision["image_size"],
        patch_size=vision["patch_size"],
        channels=vision.get("num_channels", 3),
        vision_width=vision["hidden_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_heads=vision["num_attention_heads"],
        vision_mlp_dim=vision["intermediate_size"],
        text_width=text["hidden_size"],
        text_layers=text["num_hidden_layers"],
        text_heads=text["num_attention_heads"],
        text_mlp_dim=text["intermediate_size"],
        vocab_size=text["vocab_size"],
        context_length=text["max_position_embeddings"],
        projection_dim=config["projection_dim"],
        eot_token_id=eos,
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
        logit_scale_init=config.get("logit_scale_init_value", clip.CLIPConfig.logit_scale_init),
    )


def load_clip_safetensors(path: str, variant: clip.CLIPConfig | None = None) -> ClipWeights:
    """Both CLIP towers from a Hugging Face ``model.safetensors``.

    ``variant`` defaults to one inferred from the tensor shapes (heads = width / 64, the
    OpenAI convention). With ``variant.image_size`` different from the checkpoint's, the
    vision position embedding is resampled. Returns ``ClipWeights(variant, params,
    text_params)``; a name/shape mismatch raises ``CheckpointError`` listing the keys.
    """
    tensors = read_safetensors(path)
    tensors = {k: v for k, v in tensors.items() if k not in HF_CLIP_BUFFERS}
    if variant is None:
        variant = clip_variant_from_tensors(tensors)
    image, text = clip.param_shapes(variant)
    ours = {**common.flatten(image), **common.flatten(text)}
    by_hf = {_hf_name(k): k for k in ours}
    expected = hf_clip_shapes(variant)
    found = _shapes(tensors)
    posemb = found.get(_HF_VISION_POSEMB)
    resample = (
        posemb is not None
        and len(posemb) == 2
        and posemb[1] == variant.vision_width
        and _square_grid(posemb[0]) is not None
        and posemb != expected[_HF_VISION_POSEMB]
    )
    if resample:
        found[_HF_VISION_POSEMB] = expected[_HF_VISION_POSEMB]
    common.check_keys(
        expected,
        found,
        source=path,
        target=f"CLIP variant {variant.name!r} ({variant.image_size} px)",
    )
    flat = {}
    for hf_key, our_key in by_hf.items():
        value = np.asarray(tensors[hf_key], np.float32)
        if hf_key == _HF_VISION_POSEMB and resample:
            value = np.asarray(common.resample_posemb(value, variant.grid))
        flat[our_key] = _from_hf(our_key, value)
    image_names = set(common.flatten(image))
    params = _to_jax({k: v for k, v in flat.items() if k in image_names})
    text_params = _to_jax({k: v for k, v in flat.items() if k not in image_names})
    return ClipWeights(variant, params, text_params)


def save_clip_safetensors(path: str, params: common.PyTree, text_params: common.PyTree) -> None:
    """Write both towers as a transformers-compatible ``CLIPModel`` ``model.safetensors``."""
    from safetensors.numpy import save_file

    flat = {**common.flatten(params), **common.flatten(text_params)}
    save_file(
        {
            _hf_name(k): np.array(_to_hf(k, np.asarray(v, np.float32)), order="C")
            for k, v in flat.items()
        },
        path,
    )


# ------------------------------------------------------------------------ offline tests


def create_checkpoint(
    variant: vit.ViTConfig | clip.CLIPConfig, path: str, *, seed: int = 0, num_classes: int = 0
):
    """Write a random checkpoint of ``variant`` in its published format (for offline tests).

    ViT: an ``.npz`` with the vision_transformer names, plus a ``head`` of
    ``num_classes`` outputs when ``num_classes > 0`` (like the released files); returns
    the params. CLIP: a Hugging Face ``model.safetensors``; returns ``(params,
    text_params)``.
    """
    key = jax.random.key(seed)
    if variant.family == "vit":
        params = vit.init_params(variant, key)
        head = None
        if num_classes:
            head = {
                "kernel": 0.01
                * jax.random.normal(jax.random.fold_in(key, 1), (variant.feature_dim, num_classes)),
                "bias": jnp.zeros((num_classes,)),
            }
        save_vit_npz(path, params, head=head)
        return params
    params, text_params = clip.init_params(variant, key)
    save_clip_safetensors(path, params, text_params)
    return params, text_params
