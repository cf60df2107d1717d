"""The understanding encoder: SigLIP ViT as Janus runs it.

Patch conv (with bias) + learned position embedding (no class token), pre-LN blocks with exact-GELU
MLPs, then the final LayerNorm. The attention-pooling head of the checkpoint is never run, so it is
not built. Blocks are one `nn.scan` (parameters carry a leading `layers` axis).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from janus_jax.models.llm import (apply_unrolled, default_kernel_init, maybe_remat, param_with_axes,
                                  split_layers)
from janus_jax.models.matmul import dense_dot_general

Dtype = Any


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                      scale_init=param_with_axes(nn.initializers.ones, ("norm",)),
                      bias_init=param_with_axes(nn.initializers.zeros, ("norm",)), name=name)


class EncoderBlock(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  materialize_grad_transpose: bool = False

  @nn.compact
  def __call__(self, x_BxNxW, _):
    c = self.config
    head_dim = c.width // c.num_heads

    def dense_general(features, kernel_axes, name, axis=-1):
      out_rank = len(features) if isinstance(features, tuple) else 1
      return nn.DenseGeneral(features, axis=axis, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=param_with_axes(default_kernel_init, kernel_axes),
                             bias_init=param_with_axes(nn.initializers.zeros, kernel_axes[-out_rank:]),
                             dot_general=dense_dot_general(self.materialize_grad_transpose),
                             name=name)

    x_BxNxW = nn.with_logical_constraint(x_BxNxW, ("act_batch", "act_seq", "act_embed"))
    h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm1")(x_BxNxW)
    qkv_axes = ("embed", "heads", "head_dim")
    q = dense_general((c.num_heads, head_dim), qkv_axes, "q_proj")(h)
    k = dense_general((c.num_heads, head_dim), qkv_axes, "k_proj")(h)
    v = dense_general((c.num_heads, head_dim), qkv_axes, "v_proj")(h)
    # Heads leading before the products (as llm.attend): XLA:CPU attention x0.92 (fwd + bwd).
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, N, head_dim]
    logits = jnp.einsum("bnqh,bnkh->bnqk", q, k,
                        preferred_element_type=jnp.float32) * head_dim**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    attn = jnp.einsum("bnqk,bnkh->bnqh", probs, v).transpose(0, 2, 1, 3)
    x_BxNxW = x_BxNxW + dense_general(c.width, ("heads", "head_dim", "embed"), "out_proj",
                                      axis=(-2, -1))(attn)

    h = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm2")(x_BxNxW)
    h = dense_general(c.mlp_dim, ("embed", "mlp"), "fc1")(h)
    h = nn.gelu(h, approximate=False)
    x_BxNxW = x_BxNxW + dense_general(c.width, ("mlp", "embed"), "fc2")(h)
    return x_BxNxW, None


class VisionTransformer(nn.Module):
  """pixels [B, H, W, 3] in [-1, 1] -> features [B, (H/P)*(W/P), width], row-major patch order."""

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  materialize_grad_transpose: bool = False  # see matmul.materialized_transpose_dot

  @nn.compact
  def __call__(self, pixels_BxHxWx3: jax.Array) -> jax.Array:
    c = self.config
    p = c.patch_size
    if pixels_BxHxWx3.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"understanding encoder expects pixels [B, {c.image_size}, {c.image_size}, 3], "
                       f"got {pixels_BxHxWx3.shape}")
    patches = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=param_with_axes(default_kernel_init, (None, None, "conv_in", "embed")),
                      bias_init=param_with_axes(nn.initializers.zeros, ("embed",)),
                      name="patch_embedding")(pixels_BxHxWx3.astype(self.dtype))
    # Images stay split by rows over both batch axes up to [B, N, W], where the layers take the
    # sequence over `fsdp`: propagated back through the patch reshape instead, that layout
    # replicated every image on every device whenever the patch grid's side did not divide fsdp.
    patches = nn.with_logical_constraint(patches, ("act_images", None, None, "act_embed"))
    b, gh, gw, w = patches.shape
    x_BxNxW = patches.reshape(b, gh * gw, w)
    pos = self.param("position_embedding",
                     param_with_axes(default_kernel_init, ("patches", "embed")), (gh * gw, w),
                     self.param_dtype)
    x_BxNxW = x_BxNxW + pos.astype(self.dtype)[None]

    if self.scan_layers or self.is_initializing():
      x_BxNxW, _ = nn.scan(
          maybe_remat(EncoderBlock, self.remat_policy), variable_axes={"params": 0},
          split_rngs={"params": True}, in_axes=nn.broadcast, length=c.depth,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, self.dtype, self.param_dtype, self.materialize_grad_transpose, name="layers")(
          x_BxNxW, None)
    else:  # the same layers as a Python loop (see llm.DecoderStack)
      block = EncoderBlock(c, self.dtype, self.param_dtype, self.materialize_grad_transpose,
                           parent=None)
      x_BxNxW = apply_unrolled(block, split_layers(nn.unbox(self.variables["params"]["layers"])),
                               x_BxNxW, remat_policy=self.remat_policy)
    return _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "post_layernorm")(x_BxNxW)
