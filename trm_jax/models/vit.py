"""Vision Transformer image tower in Flax NNX, named like the published JAX checkpoints.

Module and attribute names reproduce the parameter names of the ImageNet-21k ViT
checkpoints released with google-research/vision_transformer (and read by big_vision):

    embedding/{kernel [p,p,C,D], bias}           patch projection (a strided conv)
    cls [1,1,D]                                   class token
    Transformer/posembed_input/pos_embedding [1, 1+g*g, D]
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/
        {kernel [D,H,D/H], bias [H,D/H]}, .../out/{kernel [H,D/H,D], bias [D]}
    Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel,bias}
    Transformer/encoder_norm/{scale,bias}
    pre_logits/{kernel,bias}                      only when representation_size > 0

so ``flatten(params)`` *is* the npz key set (the 21k classifier ``head`` is not part of
the backbone). The forward pass matches that code: pre-LayerNorm blocks (epsilon 1e-6),
tanh-approximated GELU (``flax.linen.gelu``'s default), the class token's final state as
the feature.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from trm_jax.errors import ConfigError
from trm_jax.models import common
from trm_jax.tree_util import DTYPES


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT image tower (hashable: it keys the cached graph definitions).

    ``image_size`` must be a multiple of ``patch_size``; ``channels`` is 3 for RGB or
    1 for grayscale inputs; ``representation_size > 0`` adds the ``pre_logits`` dense +
    tanh layer of the original ImageNet-21k release; ``dtype`` is the compute dtype
    (parameters stay float32; features are returned as float32).
    """

    name: str
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int = 224
    channels: int = 3
    representation_size: int = 0
    dtype: str = "float32"

    family = "vit"
    normalization = "inception"

    def __post_init__(self):
        problems = []
        for field in ("width", "depth", "heads", "mlp_dim", "patch_size", "image_size", "channels"):
            if getattr(self, field) <= 0:
                problems.append(f"{field}={getattr(self, field)} must be positive")
        if not problems:
            if self.width % self.heads:
                problems.append(f"width {self.width} is not divisible by heads {self.heads}")
            if self.image_size % self.patch_size:
                problems.append(
                    f"image_size {self.image_size} is not a multiple of patch_size "
                    f"{self.patch_size}"
                )
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if problems:
            raise ConfigError(f"ViT variant {self.name!r}: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length: the class token plus ``grid**2`` patches."""
        return 1 + self.grid**2

    @property
    def feature_dim(self) -> int:
        return self.representation_size or self.width


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Softmax attention over ``[B, L, H, d]`` inputs; logits and softmax in float32.

    ``mask`` (broadcastable to ``[B, H, Lq, Lk]``, True = attend) is optional. Written
    with plain einsums so that every order of derivative is available.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MultiHeadDotProductAttention(nnx.Module):
    """Self-attention with ``[D, H, D/H]`` query/key/value kernels (Linen's layout)."""

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        head_dim = width // heads
        dense = functools.partial(
            nnx.LinearGeneral, dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.lecun_normal()
        )
        self.query = dense(width, (heads, head_dim))
        self.key = dense(width, (heads, head_dim))
        self.value = dense(width, (heads, head_dim))
        self.out = dense((heads, head_dim), width, axis=(-2, -1))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(dot_product_attention(self.query(x), self.key(x), self.value(x)))


class MlpBlock(nnx.Module):
    """Dense -> GELU (tanh approximation) -> Dense."""

    def __init__(self, width: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
        dense = functools.partial(
            nnx.Linear,
            dtype=dtype,
            rngs=rngs,
            kernel_init=nnx.initializers.xavier_uniform(),
            bias_init=nnx.initializers.normal(stddev=1e-6),
        )
        self.Dense_0 = dense(width, mlp_dim)
        self.Dense_1 = dense(mlp_dim, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=True))


class Encoder1DBlock(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.dtype]
        self.LayerNorm_0 = nnx.LayerNorm(cfg.width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.MultiHeadDotProductAttention_1 = MultiHeadDotProductAttention(
            cfg.width, cfg.heads, dtype=dtype, rngs=rngs
        )
        self.LayerNorm_2 = nnx.LayerNorm(cfg.width, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.MlpBlock_3 = MlpBlock(cfg.width, cfg.mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.MultiHeadDotProductAttention_1(self.LayerNorm_0(x))
        return x + self.MlpBlock_3(self.LayerNorm_2(x))


class AddPositionEmbs(nnx.Module):
    """Learned ``[1, tokens, D]`` position embedding (``posembed_input/pos_embedding``)."""

    def __init__(self, tokens: int, width: int, *, rngs: nnx.Rngs):
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(stddev=0.02)(rngs.params(), (1, tokens, width))
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.pos_embedding[...].astype(x.dtype)


class Encoder(nnx.Module):
    """``Transformer``: position embedding, ``depth`` blocks, final LayerNorm."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.depth = cfg.depth
        self.posembed_input = AddPositionEmbs(cfg.num_tokens, cfg.width, rngs=rngs)
        for i in range(cfg.depth):
            setattr(self, f"encoderblock_{i}", Encoder1DBlock(cfg, rngs=rngs))
        self.encoder_norm = nnx.LayerNorm(
            cfg.width, epsilon=1e-6, dtype=DTYPES[cfg.dtype], rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.posembed_input(x)
        for i in range(self.depth):
            x = getattr(self, f"encoderblock_{i}")(x)
        return self.encoder_norm(x)


class VisionTransformer(nnx.Module):
    """ViT image tower: ``[B, S, S, C]`` images -> ``[B, feature_dim]`` float32 features."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.dtype]
        self.cfg = cfg
        p = cfg.patch_size
        self.embedding = nnx.Conv(
            cfg.channels,
            cfg.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=nnx.initializers.lecun_normal(),
            dtype=dtype,
            rngs=rngs,
        )
        self.cls = nnx.Param(jnp.zeros((1, 1, cfg.width), jnp.float32))
        self.Transformer = Encoder(cfg, rngs=rngs)
        if cfg.representation_size:
            self.pre_logits = nnx.Linear(cfg.width, cfg.representation_size, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{cfg.name} expects images [B, {', '.join(map(str, expected))}], "
                f"got {tuple(images.shape)}"
            )
        x = self.embedding(images.astype(DTYPES[cfg.dtype]))
        x = x.reshape(x.shape[0], -1, cfg.width)
        cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, cfg.width))
        x = self.Transformer(jnp.concatenate([cls, x], axis=1))
        x = x[:, 0]
        if cfg.representation_size:
            x = jnp.tanh(self.pre_logits(x))
        return x.astype(jnp.float32)


def init_params(cfg: ViTConfig, key: jax.Array) -> common.PyTree:
    """Random parameters (plain pytree, published names) for ``cfg`` from ``key``."""
    module = VisionTransformer(cfg, rngs=nnx.Rngs(params=key))
    return common.module_params(module)[1]


@functools.cache
def _abstract(cfg: ViTConfig) -> tuple[nnx.GraphDef, common.PyTree]:
    """Graph definition and parameter shapes of ``cfg``, from one abstract trace (cached:
    tracing a ViT-L init takes seconds)."""
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(params=0)))
    return common.module_params(abstract)


def param_shapes(cfg: ViTConfig) -> common.PyTree:
    """``jax.ShapeDtypeStruct`` pytree of ``init_params(cfg, ...)`` (no allocation)."""
    return _abstract(cfg)[1]


def graphdef(cfg: ViTConfig) -> nnx.GraphDef:
    """The NNX graph definition of ``cfg``."""
    return _abstract(cfg)[0]


@functools.cache
def make_features_fn(cfg: ViTConfig):
    """Pure ``features_fn(params, images) -> [B, feature_dim]`` for ``cfg`` (cached per cfg,
    so repeated builds hand jitted callers the same function object)."""
    gdef = graphdef(cfg)

    def features_fn(params: common.PyTree, images: jax.Array) -> jax.Array:
        return common.bind(gdef, params)(images)

    features_fn.__doc__ = f"Features of {cfg.name}: images [B,S,S,C] -> [B, {cfg.feature_dim}]."
    return features_fn
