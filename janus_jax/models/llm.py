"""The DeepSeek-LLM decoder (Llama architecture) that Janus reads text and images with.

Pre-norm blocks: RMSNorm -> attention (rotate-half RoPE, optional grouped KV heads) -> residual,
RMSNorm -> SwiGLU MLP -> residual. The layer stack is one `nn.scan`, so parameters carry a leading
`layers` axis and compile time does not grow with depth (or, with `scan_layers` False, a Python
loop over that axis: faster steps for small models on CPUs).

Attention always reads keys and values from a KV cache when one is given: prefill (T prompt tokens)
and single-token decode run through the same code, writing at `cache.index` and attending over
all S cache slots under an explicit boolean mask `[B, T, S]`.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from janus_jax.models.matmul import dense_dot_general

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


class _LogicalAxes(nn.LogicallyPartitioned):
  """nn.LogicallyPartitioned that skips its sharding constraint while its value does not have one
  dimension per name: flax's DenseGeneral initialises and unboxes its kernel flattened to 2-D
  before reshaping it, so under a context mesh (`jax.set_mesh`, as train.py compiles) the 3-D
  names of an attention kernel would be applied to the 2-D view and fail."""

  def unbox(self, apply_constraint=True):
    return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def param_with_axes(init, axes: tuple[str | None, ...]):
  """An initializer that tags its parameter with logical axis names (see janus_jax.sharding)."""
  def tagged(*args, **kwargs):
    return _LogicalAxes(init(*args, **kwargs), tuple(axes))
  return tagged


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values for every layer, written at `index`.

  k, v: [layers, batch, kv_heads, slots, head_dim]; or tuples of one [batch, kv_heads, slots,
  head_dim] buffer per layer (`per_layer`); or nested tuples of one [batch, slots, head_dim]
  buffer per layer and KV head (`per_head`). index: int32 scalar, the first free slot; all rows
  share it (prompts are left-padded, so slot order is time order in every row).
  """

  k: jax.Array
  v: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, batch: int, slots: int, num_kv_heads: int, head_dim: int,
            dtype: Dtype = jnp.float32) -> "KVCache":
    shape = (num_layers, batch, num_kv_heads, slots, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  @property
  def slots(self) -> int:
    return jax.tree.leaves(self.k)[0].shape[-2]

  def per_layer(self) -> "KVCache":
    """One [batch, kv_heads, slots, head_dim] buffer per layer (models/decode.py's steps): each
    layer's attention reads its buffer in place, where slicing a layer out of the stack copies
    it for the attention dots."""
    if isinstance(self.k, tuple):
      return self
    return KVCache(tuple(self.k), tuple(self.v), self.index)

  def per_head(self) -> "KVCache":
    """One [batch, slots, head_dim] buffer per layer and KV head (models/decode.py's steps):
    k[layer][kv_head]. Each head's attention then reads its buffer in place, where slicing a
    layer out of the stack copies it for the attention dots."""
    if isinstance(self.k, tuple):
      return self
    split = lambda x: tuple(tuple(x[i, :, j] for j in range(x.shape[2]))
                            for i in range(x.shape[0]))
    return KVCache(split(self.k), split(self.v), self.index)

  def guard(self, x: jax.Array, new_tokens: int) -> jax.Array:
    """x as it is when `new_tokens` more slots fit from `index`. Otherwise dynamic_update_slice
    would clamp the write back onto earlier slots and x would look plausible but be wrong, so:
    a ValueError when the index is known (outside jit), else x filled with NaN (one select)."""
    fits = self.index + new_tokens <= self.slots
    try:
      if not bool(fits):
        raise ValueError(f"KV cache overflow: {new_tokens} new token(s) at index "
                         f"{int(self.index)} need {int(self.index) + new_tokens} slots; the cache "
                         f"has {self.slots}")
      return x
    except jax.errors.ConcretizationTypeError:  # traced: the index is known only at run time
      return jnp.where(fits, x, jnp.nan)


class RMSNorm(nn.Module):
  """Normalise in float32, cast back to the input dtype, then scale (the Llama order)."""

  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    return rms_norm(x, scale, self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary_embedding(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotate-half (NeoX) RoPE: halves [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]; angles in float32."""
  head_dim = x_BxTxNxH.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x_BxTxNxH * cos + rotated * sin).astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  materialize_grad_transpose: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache, cache_index):
    dot_general = dense_dot_general(self.materialize_grad_transpose)
    dense = lambda features, axes, name, in_axes=-1: nn.DenseGeneral(
        features, axis=in_axes, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=param_with_axes(default_kernel_init, axes), name=name,
        dot_general=dot_general)
    q_BxTxNxH = dense((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), "q_proj")(x_BxTxD)
    k_BxTxKxH = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj")(x_BxTxD)
    v_BxTxKxH = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj")(x_BxTxD)
    q_BxTxNxH = rotary_embedding(q_BxTxNxH, positions_BxT, self.rope_theta)
    k_BxTxKxH = rotary_embedding(k_BxTxKxH, positions_BxT, self.rope_theta)

    k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
    v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3)
    if kv_cache is not None:
      # The whole stack rides in the layer-scan carry: writing this layer's new slots in place
      # and slicing the layer out for reading keeps the cache from being copied every layer.
      cache_k, cache_v, layer = kv_cache
      start = (layer, 0, 0, cache_index, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k_BxKxTxH[None].astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v_BxKxTxH[None].astype(cache_v.dtype), start)
      k_BxKxSxH = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
      v_BxKxSxH = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
      new_cache = (cache_k, cache_v)
    else:
      k_BxKxSxH, v_BxKxSxH, new_cache = k_BxKxTxH, v_BxKxTxH, None

    out_BxTxNxH = attend(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, self.dtype)
    out = nn.DenseGeneral(x_BxTxD.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          kernel_init=param_with_axes(default_kernel_init, ("heads", "head_dim", "embed")),
                          name="o_proj", dot_general=dot_general)(out_BxTxNxH)
    return out, new_cache


def attend(q_BxTxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
           mask_BxTxS: jax.Array, dtype: Dtype) -> jax.Array:
  """Masked softmax attention [B, T, N, H]; each group of G = N / K query heads shares a KV head.
  Logits and softmax in float32.

  A group's queries are one [T * G, H] operand per KV head, so each product is one batched
  [T * G, H] x [H, S] matmul over (B, K) with no transpose of the [.., T, S] logits: on XLA:CPU
  the digits demo's attention (fwd + bwd, [16, 4 heads, 128, 128]) takes 12.4 ms a layer against
  15.2 for a [B, T, K, G, H] einsum; stage-2 steps x0.90 (quick demo) and x0.95 (full demo), A/B
  rounds in one process; single-token decode the same or faster. T stays the outer factor of the
  merged rows, so a sequence-sharded T needs no resharding."""
  b, t, n, h = q_BxTxNxH.shape
  kv_heads, s = k_BxKxSxH.shape[1], k_BxKxSxH.shape[2]
  g = n // kv_heads
  q_BxKxQxH = q_BxTxNxH.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(
      b, kv_heads, t * g, h)  # Q = T * G rows
  logits_BxKxQxS = jnp.einsum("bkqh,bksh->bkqs", q_BxKxQxH, k_BxKxSxH.astype(dtype),
                              preferred_element_type=jnp.float32) * h**-0.5
  logits_BxKxTxGxS = jnp.where(mask_BxTxS[:, None, :, None, :],
                               logits_BxKxQxS.reshape(b, kv_heads, t, g, s),
                               jnp.finfo(jnp.float32).min)
  probs_BxKxQxS = jax.nn.softmax(logits_BxKxTxGxS, axis=-1).astype(dtype).reshape(
      b, kv_heads, t * g, s)
  out_BxKxQxH = jnp.einsum("bkqs,bksh->bkqh", probs_BxKxQxS, v_BxKxSxH.astype(dtype))
  return out_BxKxQxH.reshape(b, kv_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  materialize_grad_transpose: bool = False

  @nn.compact
  def __call__(self, x_BxTxD):
    dense = lambda features, axes, name: nn.Dense(
        features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=param_with_axes(default_kernel_init, axes), name=name,
        dot_general=dense_dot_general(self.materialize_grad_transpose))
    gate = dense(self.mlp_dim, ("embed", "mlp"), "gate_proj")(x_BxTxD)
    up = dense(self.mlp_dim, ("embed", "mlp"), "up_proj")(x_BxTxD)
    return dense(x_BxTxD.shape[-1], ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """One pre-norm Llama block; `(x, (k, v)) -> (x, (k, v))` so it can be scanned over layers."""

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  materialize_grad_transpose: bool = False

  @nn.compact
  def __call__(self, carry, layer, positions_BxT, mask_BxTxS, cache_index):
    c = self.config
    x_BxTxD, cache_k, cache_v = carry
    layer_cache = None if cache_k is None else (cache_k, cache_v, layer)
    norm = lambda name: RMSNorm(c.rms_norm_eps, self.param_dtype, name=name)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_seq", "act_embed"))
    attn_out, layer_cache = Attention(
        c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, self.dtype, self.param_dtype,
        self.materialize_grad_transpose, name="self_attn")(
            norm("input_layernorm")(x_BxTxD), positions_BxT, mask_BxTxS, layer_cache, cache_index)
    h = x_BxTxD + attn_out
    h = h + Mlp(c.mlp_dim, self.dtype, self.param_dtype, self.materialize_grad_transpose,
                name="mlp")(norm("post_attention_layernorm")(h))
    cache_k, cache_v = (None, None) if layer_cache is None else layer_cache
    return (h, cache_k, cache_v), None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _check_remat_policy(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}; expected one of {sorted(REMAT_POLICIES)}")


def maybe_remat(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
  """The layer class wrapped in `nn.remat` with a named policy ("none" leaves it as is)."""
  _check_remat_policy(policy)
  if policy == "none":
    return layer_cls
  # No CSE prevention needed: the layers run inside scan.
  return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], prevent_cse=False)


class DecoderStack(nn.Module):
  """All decoder layers, then the final RMSNorm.

  Parameters always carry a leading `layers` axis (one `nn.scan` creates them). `scan_layers`
  False runs the layers as a Python loop over that axis instead of a scan: compile time grows
  with depth, but XLA:CPU then skips the scan's stacked residual buffers (zero-filled, written
  and sliced per layer every step): the digits demo's train step runs ~10 % faster.
  `materialize_grad_transpose`: see `matmul.materialized_transpose_dot`.
  """

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  materialize_grad_transpose: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache: KVCache | None = None):
    c = self.config
    k, v = (None, None) if cache is None else (cache.k, cache.v)
    index = None if cache is None else cache.index
    carry = (x_BxTxD.astype(self.dtype), k, v)
    if self.scan_layers or self.is_initializing():
      scanned = nn.scan(
          maybe_remat(DecoderLayer, self.remat_policy),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, self.dtype, self.param_dtype, self.materialize_grad_transpose, name="layers")
      carry, _ = scanned(carry, jnp.arange(c.num_layers), positions_BxT, mask_BxTxS, index)
    else:
      layer = DecoderLayer(c, self.dtype, self.param_dtype, self.materialize_grad_transpose,
                           parent=None)
      carry = apply_unrolled(layer, split_layers(nn.unbox(self.variables["params"]["layers"])),
                             carry, positions_BxT, mask_BxTxS, index,
                             remat_policy=self.remat_policy)
    x_BxTxD, k, v = carry
    x_BxTxD = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(x_BxTxD)
    if cache is not None:
      x_BxTxD = cache.guard(x_BxTxD, x_BxTxD.shape[1])
      cache = KVCache(k, v, cache.index + x_BxTxD.shape[1])
    return x_BxTxD, cache


def split_layers(stacked_params: Any) -> list[Any]:
  """The scanned stack's params ([layers, ...] leaves) as one tree per layer."""
  num_layers = jax.tree.leaves(stacked_params)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], stacked_params) for i in range(num_layers)]


def apply_unrolled(layer: nn.Module, layer_params: list[Any], carry: Any, *broadcast_args: Any,
                   remat_policy: str = "none") -> Any:
  """What `nn.scan(layer)` computes, as a Python loop over per-layer params (see `split_layers`).

  The layer is called as `layer(carry, i, *broadcast_args) -> (carry, _)`, i the layer's index
  (a Python int, so cache writes slice statically), each call under the remat policy.
  """
  _check_remat_policy(remat_policy)
  for i, params in enumerate(layer_params):
    call = lambda p, c, i=i: layer.apply({"params": p}, c, i, *broadcast_args)[0]
    if remat_policy != "none":
      call = jax.checkpoint(call, policy=REMAT_POLICIES[remat_policy])
    carry = call(params, carry)
  return carry


def causal_mask(valid_BxT: jax.Array) -> jax.Array:
  """[B, T, T] mask for one forward over a whole (left-padded) sequence."""
  t = valid_BxT.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None] & valid_BxT[:, None, :].astype(bool)


def cache_mask(valid_BxS: jax.Array, cache_index: jax.Array, num_new: int) -> jax.Array:
  """[B, T, S] mask for T new tokens written at `cache_index` into S cache slots.

  valid_BxS marks the slots holding real tokens (zero on left padding and on unwritten slots is
  fine: causality already hides slots at or beyond each query's own).
  """
  slots = valid_BxS.shape[1]
  query_slot_T = cache_index + jnp.arange(num_new)
  causal_TxS = jnp.arange(slots)[None, :] <= query_slot_T[:, None]
  return causal_TxS[None] & valid_BxS[:, None, :].astype(bool)


def positions_from_mask(valid_BxT: jax.Array) -> jax.Array:
  """Positions as HF `generate` derives them: the first real token of each row is position 0."""
  return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, T, T] causal mask that keeps packed segments apart; segment id 0 is padding."""
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return causal_mask(segment_ids_BxT != 0) & same


class LanguageModel(nn.Module):
  """Token embedding, decoder stack (ending in the final norm) and the untied text head."""

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True
  materialize_grad_transpose: bool = False

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=param_with_axes(default_kernel_init, ("vocab", "embed")))
    self.decoder = DecoderStack(c, self.dtype, self.param_dtype, self.remat_policy,
                                self.scan_layers, self.materialize_grad_transpose)
    self.lm_head = nn.Dense(
        c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=param_with_axes(default_kernel_init, ("embed", "vocab")),
        dot_general=dense_dot_general(self.materialize_grad_transpose))

  def embed(self, ids_BxT: jax.Array) -> jax.Array:
    # nn.Embed's lookup on a table gathered whole along `embed` first (as FSDP gathers every
    # weight before use): from the table's [vocab, embed over fsdp] layout the partitioner could
    # not move the rows to the activations' (batch, sequence) layout, and on a mesh with data,
    # fsdp and tensor all above 1 it replicated the whole batch's embeddings on every device.
    table_VxD = nn.with_logical_constraint(self.embed_tokens.embedding, ("vocab", None))
    ids_BxT = nn.with_logical_constraint(ids_BxT, ("act_batch", "act_seq"))
    x_BxTxD = jnp.take(table_VxD.astype(self.dtype), ids_BxT, axis=0)
    return nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_seq", "act_embed"))

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None):
    return self.decoder(x_BxTxD, positions_BxT, mask_BxTxS, cache)

  def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
    return self.lm_head(hidden_BxTxD)
