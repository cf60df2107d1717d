"""The generation tokenizer: LlamaGen's VQ-16 (conv encoder, L2-normalised codebook, conv decoder).

NHWC throughout. Attention blocks sit only at the lowest resolution; the decoder has one more res
block per level than the encoder. Downsampling pads right/bottom only, then a stride-2 VALID conv;
upsampling repeats pixels x2, then a 3x3 conv.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from janus_jax.models.llm import default_kernel_init, param_with_axes

Dtype = Any


def _conv(features: int, kernel: int, dtype, param_dtype, name: str, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                 param_dtype=param_dtype,
                 kernel_init=param_with_axes(default_kernel_init, (None, None, "conv_in", "conv_out")),
                 bias_init=param_with_axes(nn.initializers.zeros, ("conv_out",)), name=name)


def _group_norm(dtype, param_dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False,
                      scale_init=param_with_axes(nn.initializers.ones, ("conv_out",)),
                      bias_init=param_with_axes(nn.initializers.zeros, ("conv_out",)), name=name)


class ResnetBlock(nn.Module):
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(_group_norm(name="norm1", **kw)(x_BxHxWxC))
    h = _conv(self.features, 3, name="conv1", **kw)(h)
    h = nn.swish(_group_norm(name="norm2", **kw)(h))
    h = _conv(self.features, 3, name="conv2", **kw)(h)
    if x_BxHxWxC.shape[-1] != self.features:
      x_BxHxWxC = _conv(self.features, 1, name="nin_shortcut", **kw)(x_BxHxWxC)
    return x_BxHxWxC + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, scale C^-0.5, with a residual add."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x_BxHxWxC.shape
    normed = _group_norm(name="norm", **kw)(x_BxHxWxC)
    q, k, v = (_conv(c, 1, name=n, **kw)(normed).reshape(b, h * w, c) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(self.dtype), v)
    return x_BxHxWxC + _conv(c, 1, name="proj_out", **kw)(out.reshape(b, h, w, c))


class MidBlock(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock(x.shape[-1], name="block_1", **kw)(x)
    x = AttnBlock(name="attn_1", **kw)(x)
    return ResnetBlock(x.shape[-1], name="block_2", **kw)(x)


class Encoder(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_BxHxWx3):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = len(c.channel_multipliers)
    x = _conv(c.base_channels, 3, name="conv_in", **kw)(pixels_BxHxWx3.astype(self.dtype))
    for i, mult in enumerate(c.channel_multipliers):
      for j in range(c.num_res_blocks):
        x = ResnetBlock(c.base_channels * mult, name=f"down_{i}_block_{j}", **kw)(x)
        if i == levels - 1:
          x = AttnBlock(name=f"down_{i}_attn_{j}", **kw)(x)
      if i != levels - 1:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = _conv(x.shape[-1], 3, stride=2, padding="VALID", name=f"down_{i}_downsample", **kw)(x)
    x = MidBlock(name="mid", **kw)(x)
    x = nn.swish(_group_norm(name="norm_out", **kw)(x))
    return _conv(c.z_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z_BxhxwxZ):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = len(c.channel_multipliers)
    x = _conv(c.base_channels * c.channel_multipliers[-1], 3, name="conv_in", **kw)(z_BxhxwxZ)
    x = MidBlock(name="mid", **kw)(x)
    # Up block 0 is the lowest resolution (the reversed multipliers), as the checkpoints number it.
    for i, mult in enumerate(reversed(c.channel_multipliers)):
      for j in range(c.num_res_blocks + 1):
        x = ResnetBlock(c.base_channels * mult, name=f"up_{i}_block_{j}", **kw)(x)
        if i == 0:
          x = AttnBlock(name=f"up_{i}_attn_{j}", **kw)(x)
      if i != levels - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = _conv(x.shape[-1], 3, name=f"up_{i}_upsample", **kw)(x)
    x = nn.swish(_group_norm(name="norm_out", **kw)(x))
    return _conv(3, 3, name="conv_out", **kw)(x)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch's F.normalize. The clamp is taken before the square root,
  so a zero vector has a finite gradient (sqrt's derivative at 0 is infinite)."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x32), axis=axis, keepdims=True), eps**2))
  return (x32 / norm).astype(x.dtype)


class VQModel(nn.Module):
  """encode: pixels [B, H, W, 3] in [-1, 1] -> ids [B, h*w]; decode: ids -> pixels (about [-1, 1])."""

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(c, **kw)
    self.decoder = Decoder(c, **kw)
    self.quant_conv = _conv(c.codebook_dim, 1, **kw, name="quant_conv")
    self.post_quant_conv = _conv(c.z_channels, 1, **kw, name="post_quant_conv")
    self.codebook = self.param("codebook", param_with_axes(nn.initializers.normal(1.0),
                                                           ("codebook", None)),
                               (c.codebook_size, c.codebook_dim), self.param_dtype)

  def encode_latents(self, pixels_BxHxWx3: jax.Array) -> jax.Array:
    """Pre-quantisation latents [B, h, w, codebook_dim] (L2-normalised per position)."""
    return l2_normalize(self.quant_conv(self.encoder(pixels_BxHxWx3)).astype(jnp.float32))

  def quantize(self, z_Bxhxwxe: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest L2-normalised code for each L2-normalised latent: (ids [B, h*w], codes [B,h,w,e])."""
    codebook = l2_normalize(self.codebook.astype(jnp.float32))
    b, h, w, e = z_Bxhxwxe.shape
    z_Nxe = z_Bxhxwxe.reshape(-1, e).astype(jnp.float32)
    # Full float32 products: a GPU's default (TF32) would move ~0.3 % of the ids (a simulation
    # with VQ-16-sized random codebooks), where torch keeps float32.
    distances = (jnp.sum(z_Nxe**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)
                 - 2 * jnp.matmul(z_Nxe, codebook.T, precision=jax.lax.Precision.HIGHEST))
    ids = jnp.argmin(distances, axis=1).reshape(b, h * w)
    return ids, codebook[ids].reshape(b, h, w, e)

  def encode(self, pixels_BxHxWx3: jax.Array) -> jax.Array:
    return self.quantize(self.encode_latents(pixels_BxHxWx3))[0]

  def codes_to_pixels(self, codes_Bxhxwxe: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(codes_Bxhxwxe.astype(self.dtype)))

  def decode(self, ids_BxN: jax.Array) -> jax.Array:
    b, n = ids_BxN.shape
    side = int(round(n**0.5))
    if side * side != n:
      raise ValueError(f"vq decode expects a square token grid; got {n} ids per image")
    codes = l2_normalize(self.codebook.astype(jnp.float32))[ids_BxN]
    return self.codes_to_pixels(codes.reshape(b, side, side, -1))

  def __call__(self, pixels_BxHxWx3: jax.Array) -> jax.Array:
    """Reconstruction through the quantiser, for initialisation and round-trip checks."""
    _, codes = self.quantize(self.encode_latents(pixels_BxHxWx3))
    return self.codes_to_pixels(codes)
