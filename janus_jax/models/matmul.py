"""Dense-layer matmuls whose weight gradient reads a materialised x^T (faster on XLA:CPU).

In a Dense layer's backward pass, dW = x^T @ g. XLA:CPU lays that dot out by writing g, not x, in
transposed layout; g's producer is a long elementwise fusion (the SwiGLU or RoPE backward), so the
fusion is recomputed writing column by column. Materialising x^T instead (an optimisation barrier
keeps XLA from undoing it) leaves every fusion row-major: the digits demo's stage-2 step runs
x0.77-0.81, stage 3 x0.86 (LLM layers). In the ViT's exact-GELU MLP ([128 x 16, 96] -> 384 -> 96)
the gradient takes 7.2 ms against 18.9, and the digits encoder's pretraining 104 s against 131;
in the aligners and the image head it is neither faster nor slower (stage-2 / stage-3 A/B rounds
within noise). `config.model.materialize_grad_transpose` turns it on for every trained Dense
layer. Values and gradients are the same. Unmeasured on TPU/GPU: off by default.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxK: jax.Array, w_KxF: jax.Array, precision: Any) -> jax.Array:
  return jnp.matmul(x_MxK, w_KxF, precision=precision)


def _matmul_fwd(x_MxK, w_KxF, precision):
  return _matmul(x_MxK, w_KxF, precision), (x_MxK, w_KxF)


def _matmul_bwd(precision, residuals, g_MxF):
  x_MxK, w_KxF = residuals
  # The barrier materialises x, so the transpose is a plain copy, not a re-run of x's producer.
  x_KxM = jax.lax.optimization_barrier(x_MxK).T
  grad_x = jnp.matmul(g_MxF, w_KxF.T, precision=precision).astype(x_MxK.dtype)
  grad_w = jnp.matmul(x_KxM, g_MxF, precision=precision).astype(w_KxF.dtype)
  return grad_x, grad_w


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def materialized_transpose_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                               precision: Any = None, preferred_element_type: Any = None
                               ) -> jax.Array:
  """`lax.dot_general` for Dense layers (lhs's trailing axes against rhs's leading ones) with the
  weight gradient computed as `x^T @ g` from a materialised x^T. Other dot shapes, and a preferred
  element type, go to `lax.dot_general` unchanged."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract = tuple(a % lhs.ndim for a in lhs_contract)  # pairs in order: not sorted
  rhs_contract = tuple(a % rhs.ndim for a in rhs_contract)
  n = len(lhs_contract)
  if (lhs_batch or rhs_batch or preferred_element_type is not None
      or lhs_contract != tuple(range(lhs.ndim - n, lhs.ndim)) or rhs_contract != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
  k = math.prod(lhs.shape[lhs.ndim - n:])
  out_MxF = _matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), precision)
  return out_MxF.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


def dense_dot_general(materialize_grad_transpose: bool):
  """The `dot_general` a trained Dense layer uses (None: Flax's default, `lax.dot_general`)."""
  return materialized_transpose_dot if materialize_grad_transpose else None
