"""One-token decode steps over per-layer weights: the sampler's unrolled path (the CPU default).

A decode step multiplies 2-16 rows by every weight matrix once, so reading the weights bounds it.
XLA:CPU streams a wide [K, N] float32 kernel through one dot of so few rows at about 16 GB/s,
but at about 24 GB/s when the same columns are separate arrays of <= 768 columns: its thunk
executor runs the independent dots on both cores, and narrow panels tile better even on one
(2-core Sapphire Rapids, 40 distinct 1024 x 2816 kernels, rows 2: 16 -> 24 GB/s; rows 16:
9.5 -> 15.5 GB/s). The blocks must be separate buffers: slicing a kernel inside the token loop,
or concatenating blocks back, copies it every step. So the `prepare_*` functions split the
trunk, the image head and the text head once per generate call, outside the loop, and the steps
read every block in place. KV caches are per layer (`llm.KVCache.per_layer`) for the same reason.
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

# Columns per block: 2 blocks for a 1024-wide kernel, 22 for the 16384-wide image head. 384 and
# 1536 measured no better (benchmarks/sampling.py config, B = 1 and 8).
BLOCK_COLUMNS = 768


def split_columns(kernel: jax.Array, in_axes: int, dtype, width: int | None = None
                  ) -> tuple[jax.Array, ...]:
  """kernel [*in (in_axes of them), *out] -> near-equal column blocks [prod(in), <= width] in
  `dtype` (width: BLOCK_COLUMNS on XLA:CPU; elsewhere one block, as a GPU gemm wants the whole
  kernel in one call)."""
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

  cache: per layer ([B, K, S, H] buffers), written at cache.index; mask_BxS: the slots each row
  may attend to (llm.cache_mask for one token).
  """
  b, eps = x_BxD.shape[0], config.rms_norm_eps
  dtype = trunk["layers"][0]["q"][0].dtype
  positions_Bx1, mask_Bx1xS = positions_B[:, None], mask_BxS[:, None, :]
  rope = lambda x_BxNxH: llm.rotary_embedding(x_BxNxH[:, None], positions_Bx1, config.rope_theta)
  ks, vs = list(cache.k), list(cache.v)
  x_BxD = x_BxD.astype(dtype)
  for i, w in enumerate(trunk["layers"]):
    h_BxD = llm.rms_norm(x_BxD, w["input_norm"], eps)
    heads = lambda name, n: matmul(h_BxD, w[name]).reshape(b, n, config.head_dim)
    q_Bx1xNxH = rope(heads("q", config.num_heads))
    k_BxKx1xH = rope(heads("k", config.num_kv_heads)).transpose(0, 2, 1, 3)
    v_BxKx1xH = heads("v", config.num_kv_heads)[:, :, None]
    start = (0, 0, cache.index, 0)
    ks[i] = jax.lax.dynamic_update_slice(ks[i], k_BxKx1xH.astype(ks[i].dtype), start)
    vs[i] = jax.lax.dynamic_update_slice(vs[i], v_BxKx1xH.astype(vs[i].dtype), start)
    out_Bx1xNxH = llm.attend(q_Bx1xNxH, ks[i], vs[i], mask_Bx1xS, dtype)
    x_BxD = x_BxD + matmul(out_Bx1xNxH.reshape(b, -1), w["o"])
    h_BxD = llm.rms_norm(x_BxD, w["post_norm"], eps)
    gated_BxM = jax.nn.silu(matmul(h_BxD, w["gate"])) * matmul(h_BxD, w["up"])
    x_BxD = x_BxD + matmul(gated_BxM, w["down"])
  x_BxD = llm.rms_norm(x_BxD, trunk["norm"], eps)
  return x_BxD, llm.KVCache(tuple(ks), tuple(vs), cache.index + 1)


def image_logits(head: dict, hidden_BxD: jax.Array) -> jax.Array:
  """adapters.ImageHead: [B, codebook_size] float32 logits."""
  x_BxE = matmul(hidden_BxD, head["proj_out"]["kernel"], head["proj_out"]["bias"])
  x_BxE = jax.nn.gelu(x_BxE, approximate=False)
  return matmul(x_BxE, head["vision_head"]["kernel"], head["vision_head"]["bias"]).astype(
      jnp.float32)


def text_logits(head: tuple[jax.Array, ...], hidden_BxD: jax.Array) -> jax.Array:
  """The text head: [B, vocab] float32 logits."""
  return matmul(hidden_BxD, head).astype(jnp.float32)
