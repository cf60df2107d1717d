"""One-token decode steps over per-layer weights: the sampler's unrolled path (the CPU default).

A decode step multiplies 2-16 rows by every weight matrix once, so reading the weights bounds it.
XLA:CPU streams a wide [K, N] float32 kernel through one dot of so few rows at about 16 GB/s,
but at about 24 GB/s when the same columns are separate arrays of a few hundred columns
(`block_columns`): its thunk executor runs independent dots on both cores (it hands work to a
second thread only when more than 8 are ready at once), and narrow panels tile better even on one
(2-core Sapphire Rapids, 40 distinct 1024 x 2816 kernels, rows 2: 16 -> 24 GB/s; rows 16:
9.5 -> 15.5 GB/s). The blocks must be separate buffers: slicing a kernel inside the token loop,
or concatenating blocks back, copies it every step. So the `prepare_*` functions split the
trunk, the image head and the text head once per generate call, outside the loop, and the steps
read every block in place. KV caches are one buffer per layer for the same reason, and from
EIGEN_ROWS rows one [B, S, H] buffer per layer and KV head (`split_cache`), with `attend_per_head`
giving each head its own dots: Eigen runs a dot batched over (rows, heads) on one thread below
~540 slots (16 rows: 45 ms of attention a step at 512 slots, 28 at 607). A [B, 1, S, H] buffer
would not do: XLA fuses its write twice (once for the squeezed read) and copies every buffer
every step.
Off XLA:CPU each kernel stays one block (unmeasured on a GPU so far: benchmarks/sampling.py
--preset pro1b --dtype bfloat16 times this path against the layer scan).

The math is llm.DecoderLayer's (shared: `llm.rms_norm`, `llm.rotary_embedding`, `llm.attend`) and
adapters.ImageHead's; tests/test_sampling.py checks the sampler on this path against
`transformers` token for token.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from janus_jax.models import llm

# Columns per block on XLA:CPU, by the library that runs a step's dots (token_loop.decode_jit:
# Eigen from EIGEN_ROWS rows, YNNPACK below). YNNPACK, 1-3 rows: 768 (2 blocks for a 1024-wide
# kernel, 22 for the 16384-wide image head; 384 and 1536 measured no better, bench preset, 2 rows;
# 256 read 36.5 / 37.5 ms a step against 33.2 / 33.5, 2-core Xeon). Eigen: 256 (16 rows, same
# Xeon, one process: 64.8 / 65.4 ms a step against 79.4 / 80.8 with 768; a weights-only chain of
# 16 rows 32-34 ms against 41-43, where 128-352 read ~35 and >= 1024 worse).
BLOCK_COLUMNS = 768
EIGEN_BLOCK_COLUMNS = 256
EIGEN_ROWS = 4


def split_cache(cache: llm.KVCache, rows: int) -> llm.KVCache:
  """The cache as `trunk_step` carries it for steps of `rows` rows: per layer and KV head from
  EIGEN_ROWS rows (where Eigen's batched attention dots would run on one thread), per layer
  below, where YNNPACK's batched dots are no slower: bench preset, 2 rows, 576 tokens, 2-core
  Xeon, one process: 32.6 / 33.0 ms a step against 33.8 / 33.8, and 2.8 s of compile against
  7.3-7.7 (the loop carries 32 buffers, not 256). Call it once, outside the loop."""
  return cache.per_head() if rows >= EIGEN_ROWS else cache.per_layer()


def block_columns(rows: int) -> int | None:
  """The column-block width for steps of `rows` rows; None (whole kernels) off XLA:CPU."""
  if jax.default_backend() != "cpu":
    return None
  return EIGEN_BLOCK_COLUMNS if rows >= EIGEN_ROWS else BLOCK_COLUMNS


def split_columns(kernel: jax.Array, in_axes: int, dtype, width: int | None = None
                  ) -> tuple[jax.Array, ...]:
  """kernel [*in (in_axes of them), *out] -> near-equal column blocks [prod(in), <= width] in
  `dtype` (width default: BLOCK_COLUMNS on XLA:CPU; elsewhere one block, as a GPU gemm wants the
  whole kernel in one call)."""
  k_IxO = kernel.reshape(math.prod(kernel.shape[:in_axes]), -1).astype(dtype)
  width = width or (BLOCK_COLUMNS if jax.default_backend() == "cpu" else k_IxO.shape[1])
  count = -(-k_IxO.shape[1] // width)
  bounds = np.linspace(0, k_IxO.shape[1], count + 1).round().astype(int)
  return tuple(k_IxO[:, a:b] for a, b in zip(bounds[:-1], bounds[1:]))


def matmul(x_BxI: jax.Array, blocks: tuple[jax.Array, ...], bias_O: jax.Array | None = None
           ) -> jax.Array:
  """x @ concat(blocks) (+ bias) [B, O], one dot per block, in the blocks' dtype."""
  x_BxI = x_BxI.astype(blocks[0].dtype)
  y_BxO = jnp.concatenate([jnp.dot(x_BxI, b) for b in blocks], axis=-1)
  return y_BxO if bias_O is None else y_BxO + bias_O.astype(y_BxO.dtype)


# --- weights ----------------------------------------------------------------------------------


def prepare_trunk(params: Any, dtype, width: int | None = None) -> dict:
  """The LLM decoder's weights (Janus params["llm"]["decoder"]) as per-layer column blocks."""
  split = lambda kernel, in_axes=1: split_columns(kernel, in_axes, dtype, width)
  layers = []
  for p in llm.split_layers(params["layers"]):
    attn, mlp = p["self_attn"], p["mlp"]
    layers.append(dict(
        input_norm=p["input_layernorm"]["scale"], post_norm=p["post_attention_layernorm"]["scale"],
        q=split(attn["q_proj"]["kernel"]), k=split(attn["k_proj"]["kernel"]),
        v=split(attn["v_proj"]["kernel"]), o=split(attn["o_proj"]["kernel"], 2),
        gate=split(mlp["gate_proj"]["kernel"]), up=split(mlp["up_proj"]["kernel"]),
        down=split(mlp["down_proj"]["kernel"])))
  return dict(layers=layers, norm=params["norm"]["scale"])


def prepare_image_head(params: Any, dtype, width: int | None = None) -> dict:
  """adapters.ImageHead's weights (Janus params["image_head"]) as column blocks."""
  return {name: dict(kernel=split_columns(p["kernel"], 1, dtype, width), bias=p["bias"])
          for name, p in params.items()}


def prepare_text_head(params: Any, dtype, width: int | None = None) -> tuple[jax.Array, ...]:
  """The text head (Janus params["llm"]["lm_head"]) as column blocks."""
  return split_columns(params["kernel"], 1, dtype, width)


# --- steps ------------------------------------------------------------------------------------


def trunk_step(config: Any, trunk: dict, x_BxD: jax.Array, positions_B: jax.Array,
               mask_BxS: jax.Array, cache: llm.KVCache) -> tuple[jax.Array, llm.KVCache]:
  """llm.DecoderStack for one new token per row (final norm included): (hidden [B, D], cache).

  cache: per layer and KV head or per layer (`split_cache`), written at cache.index; mask_BxS:
  the slots each row may attend to (llm.cache_mask for one token).
  """
  b, eps = x_BxD.shape[0], config.rms_norm_eps
  dtype = trunk["layers"][0]["q"][0].dtype
  positions_Bx1 = positions_B[:, None]
  rope = lambda x_BxNxH: llm.rotary_embedding(x_BxNxH[:, None], positions_Bx1, config.rope_theta)[:, 0]
  ks, vs = list(cache.k), list(cache.v)
  x_BxD = x_BxD.astype(dtype)
  for i, w in enumerate(trunk["layers"]):
    h_BxD = llm.rms_norm(x_BxD, w["input_norm"], eps)
    heads = lambda name, n: matmul(h_BxD, w[name]).reshape(b, n, config.head_dim)
    q_BxNxH = rope(heads("q", config.num_heads))
    ks[i] = _write(ks[i], rope(heads("k", config.num_kv_heads)), cache.index)
    vs[i] = _write(vs[i], heads("v", config.num_kv_heads), cache.index)
    if isinstance(ks[i], tuple):
      out_BxNxH = attend_per_head(q_BxNxH, ks[i], vs[i], mask_BxS, dtype)
    else:
      out_BxNxH = llm.attend(q_BxNxH[:, None], ks[i], vs[i], mask_BxS[:, None], dtype)[:, 0]
    x_BxD = x_BxD + matmul(out_BxNxH.reshape(b, -1), w["o"])
    h_BxD = llm.rms_norm(x_BxD, w["post_norm"], eps)
    gated_BxM = jax.nn.silu(matmul(h_BxD, w["gate"])) * matmul(h_BxD, w["up"])
    x_BxD = x_BxD + matmul(gated_BxM, w["down"])
  x_BxD = cache.guard(llm.rms_norm(x_BxD, trunk["norm"], eps), 1)
  return x_BxD, llm.KVCache(tuple(ks), tuple(vs), cache.index + 1)


def _write(buffers: jax.Array | tuple[jax.Array, ...], new_BxKxH: jax.Array, index: jax.Array
           ) -> jax.Array | tuple[jax.Array, ...]:
  """The new slot written at `index` into a layer's [B, K, S, H] buffer, or into each KV head's
  own [B, S, H] buffer."""
  if not isinstance(buffers, tuple):
    return jax.lax.dynamic_update_slice(buffers, new_BxKxH[:, :, None].astype(buffers.dtype),
                                        (0, 0, index, 0))
  return tuple(jax.lax.dynamic_update_slice(buf, new_BxKxH[:, j, None].astype(buf.dtype),
                                            (0, index, 0))
               for j, buf in enumerate(buffers))


def attend_per_head(q_BxNxH: jax.Array, ks: tuple[jax.Array, ...], vs: tuple[jax.Array, ...],
                    mask_BxS: jax.Array, dtype) -> jax.Array:
  """llm.attend for one query token over per-KV-head buffers ([B, S, H] each): [B, N, H].

  One dot per KV head and product, so a layer's attention is 2 x kv_heads independent dots,
  which XLA:CPU's thunk executor spreads over its threads (it runs up to 8 ready thunks in one
  thread); a dot batched over (rows, heads) runs on one thread below ~540 slots.
  """
  b, n, h = q_BxNxH.shape
  g = n // len(ks)
  q_BxKxGxH = q_BxNxH.reshape(b, len(ks), g, h)
  logits_BxKxGxS = jnp.stack(
      [jnp.einsum("bgh,bsh->bgs", q_BxKxGxH[:, j], k.astype(dtype),
                  preferred_element_type=jnp.float32) for j, k in enumerate(ks)], axis=1) * h**-0.5
  logits_BxKxGxS = jnp.where(mask_BxS[:, None, None, :], logits_BxKxGxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxS = jax.nn.softmax(logits_BxKxGxS, axis=-1).astype(dtype)
  out_BxKxGxH = jnp.stack([jnp.einsum("bgs,bsh->bgh", probs_BxKxGxS[:, j], v.astype(dtype))
                           for j, v in enumerate(vs)], axis=1)
  return out_BxKxGxH.reshape(b, n, h)


def image_logits(head: dict, hidden_BxD: jax.Array) -> jax.Array:
  """adapters.ImageHead: [B, codebook_size] float32 logits."""
  x_BxE = matmul(hidden_BxD, head["proj_out"]["kernel"], head["proj_out"]["bias"])
  x_BxE = jax.nn.gelu(x_BxE, approximate=False)
  return matmul(x_BxE, head["vision_head"]["kernel"], head["vision_head"]["bias"]).astype(
      jnp.float32)


def text_logits(head: tuple[jax.Array, ...], hidden_BxD: jax.Array) -> jax.Array:
  """The text head: [B, vocab] float32 logits."""
  return matmul(hidden_BxD, head).astype(jnp.float32)
