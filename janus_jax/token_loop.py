"""The pieces sampling.py builds its token loops from.

Prompt shapes (`bucket_length`, `plan_length`, `left_pad`); placement on a mesh (`place`, batch
rows over the data axes); the KV cache (`empty_cache`, `grown_cache`, `slot_valid`); the trunk's
prefill and one-token `decode_step`, or `decoder`'s unrolled step over per-layer weight blocks
(models/decode.py); and `decode_jit`, which compiles a token loop with the dot library that is
faster for its row count on XLA:CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from janus_jax import sharding
from janus_jax.models import decode
from janus_jax.models import janus as janus_lib
from janus_jax.models import llm

Janus = janus_lib.Janus


def bucket_length(length: int) -> int:
  """Prompt length rounded up so recompiles stay bounded: powers of two from 16, then x128."""
  if length <= 128:
    return max(16, 1 << (length - 1).bit_length())
  return -(-length // 128) * 128


def plan_length(model: Janus, prompt_len: int, new_tokens: int) -> int:
  """The padded prompt length; raises if the prompt plus new tokens cannot fit the context."""
  max_pos = model.config.llm.max_position_embeddings
  if prompt_len + new_tokens > max_pos:
    raise ValueError(f"prompt of {prompt_len} tokens + {new_tokens} new tokens = "
                     f"{prompt_len + new_tokens} exceeds max_position_embeddings={max_pos}")
  # Clamp the bucket so that the cache never needs more slots than the context allows.
  return min(bucket_length(prompt_len), max_pos - new_tokens)


def left_pad(x_BxT: np.ndarray, length: int, value) -> np.ndarray:
  """x padded on the left of axis 1 to `length` with `value` (prompts end at the last column)."""
  pad = length - x_BxT.shape[1]
  return np.pad(x_BxT, [(0, 0), (pad, 0)] + [(0, 0)] * (x_BxT.ndim - 2), constant_values=value)


@functools.lru_cache(maxsize=None)
def param_shardings(model: Janus, mesh: Mesh) -> Any:
  """The params' NamedShardings by the rules table; cached, as a sampler call repeats them."""
  return sharding.param_shardings(janus_lib.abstract_params(model), mesh)


def data_parallel(mesh: Mesh | None) -> int:
  """Devices the rows are split over (the product of the batch axes; 1 without a mesh)."""
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


def check_divisible(count: int, what: str, mesh: Mesh | None) -> None:
  dp = data_parallel(mesh)
  if count % dp:
    raise ValueError(f"{what} = {count} must be divisible by the data-parallel size {dp} "
                     f"(mesh axes {sharding.BATCH_AXES} of {dict(mesh.shape)})")


def place(mesh: Mesh | None, model: Janus, params: Any, *batch: Any) -> tuple[Any, ...]:
  """Params onto their shardings and batch arrays (leading axis = rows) over the data axes.

  The jitted functions then follow these input shardings (propagation) and the sampler's own
  constraints. They run without a context mesh on purpose, so the model's training-layout
  activation constraints (the sequence over `fsdp`: sharding.mesh_rules) stay unbound: a decode
  step's sequence is one token.
  """
  if mesh is None:
    return (params, *(None if x is None else jnp.asarray(x) for x in batch))
  params = jax.device_put(params, param_shardings(model, mesh))
  return (params, *(None if x is None else jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
                    for x in batch))


def constrain_cache(cache: llm.KVCache, mesh: Mesh | None) -> llm.KVCache:
  """With a mesh, the cache's rows follow the batch sharding (stacked [L, B, K, S, H] or
  per-head [B, S, H] buffers)."""
  if mesh is None:
    return cache
  # Only the batch axis is pinned; the rest (heads over `tensor`) follows the k/v projections.
  free = PartitionSpec.UNCONSTRAINED

  def constrain(x):
    lead = 1 if x.ndim == 5 else 0  # the layer axis of a stacked cache
    spec = PartitionSpec(*(None,) * lead, sharding.BATCH_AXES, *(free,) * (x.ndim - lead - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return llm.KVCache(jax.tree.map(constrain, cache.k), jax.tree.map(constrain, cache.v),
                     cache.index)


def empty_cache(model: Janus, rows: int, slots: int, mesh: Mesh | None) -> llm.KVCache:
  """A zero KV cache in the compute dtype; with a mesh its rows follow the batch sharding."""
  c = model.config.llm
  cache = llm.KVCache.zeros(c.num_layers, rows, slots, c.num_kv_heads, c.head_dim,
                            janus_lib._dtype(model.config.dtype))
  return constrain_cache(cache, mesh)


def grown_cache(cache: llm.KVCache, slots: int, mesh: Mesh | None) -> llm.KVCache:
  """The cache with zero slots appended up to `slots`, as new buffers.

  The prefill fills a cache of only the prompt's slots and the token loop grows it: a prefill
  into the full cache cost 1.21 s against 0.35 s (bench preset, 16 rows, 608 slots, 2-core
  Zen 5), and handing a full stacked cache to the unrolled loop and back cost two more copies.
  """
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, slots - x.shape[-2]), (0, 0)])
  return constrain_cache(
      llm.KVCache(jax.tree.map(pad, cache.k), jax.tree.map(pad, cache.v), cache.index), mesh)


def apply(model: Janus, params: Any, fn, *args):
  """model.apply of method `fn` (a Janus method or a function of the bound module)."""
  return model.apply({"params": params}, *args, method=fn)


def prefill(m: Janus, x_BxTxD, valid_BxT, cache: llm.KVCache):
  """Runs the prompt through the trunk into an empty cache: (last hidden [B, D], cache)."""
  t = valid_BxT.shape[1]
  hidden_BxTxD, cache = m(x_BxTxD, llm.positions_from_mask(valid_BxT),
                          llm.cache_mask(slot_valid(valid_BxT, cache.slots), cache.index, t), cache)
  return hidden_BxTxD[:, -1], cache


def decode_step(m: Janus, x_Bx1xD, slot_valid_BxS, positions_B, cache: llm.KVCache):
  """One decode step of the trunk: (hidden [B, D], cache)."""
  hidden, cache = m(x_Bx1xD, positions_B[:, None], llm.cache_mask(slot_valid_BxS, cache.index, 1),
                    cache)
  return hidden[:, 0], cache


def decode_jit(**jit_kwargs):
  """jax.jit for the token loops `fn(model, params, x, ...)`, x's leading axis being the rows.

  XLA:CPU runs dots through YNNPACK fusions by default; for decode matmuls of 4-16 rows its own
  (Eigen) dots are 1.3-1.5x faster, for 1-2 rows YNNPACK is 1.2x faster (benchmarks/sampling.py
  and skinny-matmul timings on a 2-core Zen 5), so the CPU compile picks by row count. The
  backend is looked up at the first call: importing this module initialises none.
  """
  def wrap(fn):
    @functools.cache
    def jitted(eigen_dots: bool):
      options = {"xla_cpu_experimental_ynn_fusion_type": ""} if eigen_dots else None
      return jax.jit(fn, **jit_kwargs, compiler_options=options)

    def pick(args):
      return jitted(jax.default_backend() == "cpu" and args[2].shape[0] >= decode.EIGEN_ROWS)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return pick(args)(*args, **kwargs)
    call.lower = lambda *args, **kwargs: pick(args).lower(*args, **kwargs)
    return call
  return wrap


def default_unroll(unroll_layers: bool | None) -> bool:
  # The unrolled path splits the weights once per call to save copies per step: a clear win
  # where weight reads bound the step (XLA:CPU); elsewhere the layer scan keeps memory and
  # compile time flat.
  return jax.default_backend() == "cpu" if unroll_layers is None else bool(unroll_layers)


def decoder(model: Janus, params: Any, unroll: bool, head: str, rows: int):
  """(trunk, logits) for the token loop: trunk `(x [B, 1, D], slot_valid [B, S], positions [B],
  cache) -> (hidden [B, D], cache)`, logits `hidden -> [B, V]` float32 of the "image" or "text"
  head. `unroll`: models/decode.py's steps over per-layer column blocks (`decode.block_columns`
  of `rows`) instead of the layer scan; call this outside the loop (the blocks are split here,
  once) and carry the cache as `decode.split_cache` lays it out (split before the loop, also once).
  """
  logits_method = Janus.image_logits if head == "image" else Janus.text_logits
  if not unroll:
    return (lambda *args: apply(model, params, decode_step, *args),
            lambda hidden_BxD: apply(model, params, logits_method, hidden_BxD))
  c = model.config
  dtype = janus_lib._dtype(c.dtype)
  width = decode.block_columns(rows)
  trunk = decode.prepare_trunk(params["llm"]["decoder"], dtype, width)
  if head == "image":
    image_head = decode.prepare_image_head(params["image_head"], dtype, width)
    logits = lambda hidden_BxD: decode.image_logits(image_head, hidden_BxD)
  else:
    text_head = decode.prepare_text_head(params["llm"]["lm_head"], dtype, width)
    logits = lambda hidden_BxD: decode.text_logits(text_head, hidden_BxD)

  def unrolled_step(x_Bx1xD, slot_valid_BxS, positions_B, cache):
    mask_BxS = llm.cache_mask(slot_valid_BxS, cache.index, 1)[:, 0]
    return decode.trunk_step(c.llm, trunk, x_Bx1xD[:, 0], positions_B, mask_BxS, cache)
  return unrolled_step, logits


def slot_valid(valid_BxT: jax.Array, slots: int) -> jax.Array:
  """[B, S]: the prompt's validity, then every later slot marked valid up front.

  Causality hides a slot until it is written, so this never needs updating while decoding.
  """
  later_BxS = jnp.ones((valid_BxT.shape[0], slots - valid_BxT.shape[1]), bool)
  return jnp.concatenate([valid_BxT, later_BxS], axis=1)
