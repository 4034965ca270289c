"""CLIP image and text towers in Flax NNX, named like Hugging Face's ``CLIPModel``.

The module tree mirrors ``openai/clip-vit-base-patch16`` in transformers, so a
parameter's path is the safetensors key with ``.`` -> ``/`` and the leaf renamed to
Flax's convention (``weight`` -> ``kernel`` for dense/conv layers, ``scale`` for
LayerNorm, ``embedding`` for embedding tables):

    image tower (``Backbone.params``)
      vision_model/embeddings/{class_embedding [D], patch_embedding/kernel [p,p,C,D],
                               position_embedding/embedding [1+g*g, D]}
      vision_model/pre_layrnorm/{scale,bias}        (sic: the published spelling)
      vision_model/encoder/layers/{i}/self_attn/{q,k,v,out}_proj/{kernel [D,D],bias}
      vision_model/encoder/layers/{i}/{layer_norm1,layer_norm2}/{scale,bias}
      vision_model/encoder/layers/{i}/mlp/{fc1,fc2}/{kernel,bias}
      vision_model/post_layernorm/{scale,bias}
      visual_projection/kernel [D, P]
    text tower (``Backbone.text_params``)
      text_model/embeddings/{token_embedding,position_embedding}/embedding
      text_model/encoder/layers/{i}/...             (as above)
      text_model/final_layer_norm/{scale,bias}
      text_projection/kernel [W, P]
      logit_scale []                                (log of the logit multiplier)

The computation follows the reference: quick-GELU (``x * sigmoid(1.702 x)``),
pre-LayerNorm blocks with epsilon 1e-5, an extra LayerNorm before the image encoder,
the class token's state (image) or the first end-of-text token's state under a causal
mask (text), then a bias-free projection.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from trm_jax.errors import ConfigError
from trm_jax.models import common
from trm_jax.models.vit import dot_product_attention
from trm_jax.tree_util import DTYPES


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Shape of a CLIP model (both towers); defaults are ``openai/clip-vit-base-patch16``.

    ``eot_token_id = -1`` means ``vocab_size - 1`` (the end-of-text token is the last
    id of the CLIP BPE vocabulary); the text feature is taken at its first occurrence.
    ``image_size`` may differ from the checkpoint's: the loader then resamples the
    position embedding.
    """

    name: str = "clip_vit_b16"
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    projection_dim: int = 512
    eot_token_id: int = -1
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: str = "float32"

    family = "clip"
    normalization = "clip"

    def __post_init__(self):
        problems = [
            f"{f.name}={getattr(self, f.name)} must be positive"
            for f in dataclasses.fields(self)
            if f.type == "int" and f.name != "eot_token_id" and getattr(self, f.name) <= 0
        ]
        if not problems:
            if self.vision_width % self.vision_heads:
                problems.append("vision_width is not divisible by vision_heads")
            if self.text_width % self.text_heads:
                problems.append("text_width is not divisible by text_heads")
            if self.image_size % self.patch_size:
                problems.append(
                    f"image_size {self.image_size} is not a multiple of "
                    f"patch_size {self.patch_size}"
                )
            if not -1 <= self.eot_token_id < self.vocab_size:
                problems.append(f"eot_token_id {self.eot_token_id} outside the vocabulary")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if problems:
            raise ConfigError(f"CLIP variant {self.name!r}: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def feature_dim(self) -> int:
        return self.projection_dim

    @property
    def eot_id(self) -> int:
        return self.vocab_size - 1 if self.eot_token_id < 0 else self.eot_token_id


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPAttention(nnx.Module):
    """Self-attention with separate ``[D, D]`` q/k/v/out projections (HF layout)."""

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.heads = heads
        dense = functools.partial(nnx.Linear, width, width, dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
        out = dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask
        )
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class CLIPMLP(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(width, heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = nnx.LayerNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = CLIPMLP(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(width, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, width, heads, mlp_dim, depth, eps, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(width, heads, mlp_dim, eps, dtype=dtype, rngs=rngs)
                for _ in range(depth)
            ]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, rngs: nnx.Rngs):
        width, p = cfg.vision_width, cfg.patch_size
        init = nnx.initializers.normal(stddev=width**-0.5)
        self.class_embedding = nnx.Param(init(rngs.params(), (width,)))
        self.patch_embedding = nnx.Conv(
            cfg.channels,
            width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            1 + cfg.grid**2, width, embedding_init=init, dtype=dtype, rngs=rngs
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch_embedding(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(
            self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1])
        )
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = nnx.LayerNorm(cfg.vision_width, epsilon=eps, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(
            cfg.vision_width,
            cfg.vision_heads,
            cfg.vision_mlp_dim,
            cfg.vision_layers,
            eps,
            dtype=dtype,
            rngs=rngs,
        )
        self.post_layernorm = nnx.LayerNorm(cfg.vision_width, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.encoder(self.pre_layrnorm(self.embeddings(images)))
        return self.post_layernorm(x[:, 0])


class CLIPImageTower(nnx.Module):
    """Images ``[B, S, S, C]`` (CLIP-normalised) -> projected embeddings ``[B, P]`` float32."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.dtype]
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg, dtype=dtype, rngs=rngs)
        self.visual_projection = nnx.Linear(
            cfg.vision_width, cfg.projection_dim, use_bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{cfg.name} expects images [B, {', '.join(map(str, expected))}]"
                f", got {tuple(images.shape)}"
            )
        x = self.vision_model(images.astype(DTYPES[cfg.dtype]))
        return self.visual_projection(x).astype(jnp.float32)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(
            cfg.vocab_size,
            cfg.text_width,
            dtype=dtype,
            rngs=rngs,
            embedding_init=nnx.initializers.normal(stddev=0.02),
        )
        self.position_embedding = nnx.Embed(
            cfg.context_length,
            cfg.text_width,
            dtype=dtype,
            rngs=rngs,
            embedding_init=nnx.initializers.normal(stddev=0.01),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.token_embedding(tokens)
        return x + self.position_embedding.embedding[: tokens.shape[-1]].astype(x.dtype)


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype, rngs: nnx.Rngs):
        self.eot_id = cfg.eot_id
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(
            cfg.text_width,
            cfg.text_heads,
            cfg.text_mlp_dim,
            cfg.text_layers,
            cfg.layer_norm_eps,
            dtype=dtype,
            rngs=rngs,
        )
        self.final_layer_norm = nnx.LayerNorm(
            cfg.text_width, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[-1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x = self.final_layer_norm(self.encoder(self.embeddings(tokens), causal))
        eot = jnp.argmax(tokens == self.eot_id, axis=-1)  # first end-of-text token
        return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]


class CLIPTextTower(nnx.Module):
    """Tokens ``int32 [N, L]`` (L <= context_length) -> projected embeddings ``[N, P]``."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.dtype]
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, rngs=rngs)
        self.text_projection = nnx.Linear(
            cfg.text_width, cfg.projection_dim, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[-1] > self.cfg.context_length:
            raise ValueError(
                f"{self.cfg.name} expects tokens [N, <= "
                f"{self.cfg.context_length}], got {tuple(tokens.shape)}"
            )
        return self.text_projection(self.text_model(tokens)).astype(jnp.float32)


def init_params(cfg: CLIPConfig, key: jax.Array) -> tuple[common.PyTree, common.PyTree]:
    """Random ``(image_params, text_params)`` plain pytrees for ``cfg`` from ``key``."""
    k_image, k_text = jax.random.split(key)
    image = common.module_params(CLIPImageTower(cfg, rngs=nnx.Rngs(params=k_image)))[1]
    text = common.module_params(CLIPTextTower(cfg, rngs=nnx.Rngs(params=k_text)))[1]
    return image, text


@functools.cache
def _abstract(cfg: CLIPConfig):
    """``((image graphdef, image shapes), (text graphdef, text shapes))`` from abstract
    traces (cached)."""
    image = nnx.eval_shape(lambda: CLIPImageTower(cfg, rngs=nnx.Rngs(params=0)))
    text = nnx.eval_shape(lambda: CLIPTextTower(cfg, rngs=nnx.Rngs(params=0)))
    return common.module_params(image), common.module_params(text)


def param_shapes(cfg: CLIPConfig) -> tuple[common.PyTree, common.PyTree]:
    """``jax.ShapeDtypeStruct`` pytrees of ``init_params(cfg, ...)`` (no allocation)."""
    image, text = _abstract(cfg)
    return image[1], text[1]


def _graphdefs(cfg: CLIPConfig) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    image, text = _abstract(cfg)
    return image[0], text[0]


@functools.cache
def make_features_fn(cfg: CLIPConfig):
    """Pure ``features_fn(params, images) -> [B, projection_dim]`` (unnormalised image
    embeddings; cached per cfg)."""
    gdef = _graphdefs(cfg)[0]

    def features_fn(params: common.PyTree, images: jax.Array) -> jax.Array:
        return common.bind(gdef, params)(images)

    return features_fn


@functools.cache
def make_encode_text_fn(cfg: CLIPConfig):
    """Pure ``encode_text_fn(text_params, tokens) -> [N, projection_dim]`` (unnormalised)."""
    gdef = _graphdefs(cfg)[1]

    def encode_text_fn(text_params: common.PyTree, tokens: jax.Array) -> jax.Array:
        return common.bind(gdef, text_params)(jnp.asarray(tokens, jnp.int32))

    return encode_text_fn


def clip_logits(
    image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.typing.ArrayLike
) -> jax.Array:
    """``exp(logit_scale) * cos(image, text)``: ``[B, P] x [N, P] -> [B, N]`` (logits per image)."""
    image = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    text = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return jnp.exp(logit_scale) * image @ text.T
