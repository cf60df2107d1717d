"""The small parts between the encoders and the LLM.

- `MlpAligner`: Linear, then (GELU, Linear) x (depth - 1). Both the understanding aligner
  (vision width -> D) and the generation aligner (codebook dim -> D) are one of these.
- `ImageHead`: Linear D -> D, GELU, Linear D -> codebook size (logits over image tokens).
- The generation embedding (image-token id -> codebook_dim vector) is a plain `nn.Embed` built in
  janus.py; it is its own table, not the VQ codebook.
All GELUs are the exact erf form.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from janus_jax.models.llm import default_kernel_init, param_with_axes
from janus_jax.models.matmul import dense_dot_general

Dtype = Any


def _dense(features: int, axes: tuple[str | None, str | None], dtype, param_dtype, name: str,
           materialize_grad_transpose: bool = False):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=param_with_axes(default_kernel_init, axes),
                  bias_init=param_with_axes(nn.initializers.zeros, axes[1:]),
                  dot_general=dense_dot_general(materialize_grad_transpose), name=name)


class MlpAligner(nn.Module):
  features: int
  depth: int = 2
  input_axis: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  materialize_grad_transpose: bool = False  # see matmul.materialized_transpose_dot

  @nn.compact
  def __call__(self, x_BxNxI: jax.Array) -> jax.Array:
    m = self.materialize_grad_transpose
    x = _dense(self.features, (self.input_axis, "embed"), self.dtype, self.param_dtype, "fc1",
               m)(x_BxNxI.astype(self.dtype))
    for i in range(self.depth - 1):
      x = nn.gelu(x, approximate=False)
      x = _dense(self.features, ("mlp", "embed"), self.dtype, self.param_dtype, f"hidden_{i}",
                 m)(x)
    return x


class ImageHead(nn.Module):
  hidden: int
  codebook_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  materialize_grad_transpose: bool = False  # see matmul.materialized_transpose_dot

  @nn.compact
  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    m = self.materialize_grad_transpose
    x = _dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, "proj_out",
               m)(hidden_BxTxD)
    x = nn.gelu(x, approximate=False)
    return _dense(self.codebook_size, ("mlp", "vocab"), self.dtype, self.param_dtype,
                  "vision_head", m)(x)
