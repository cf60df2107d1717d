"""Sampling for Janus: text-to-image tokens with classifier-free guidance, image decode, and text.

Everything after the host builds the padded prompt runs in two jitted calls: a prefill over the
prompt bucket that fills a KV cache of the bucket's slots, then the token loop, which grows the
cache to its full length and runs `lax.scan` (images: a fixed number of steps, one or a few scans,
`default_segments`) or `lax.while_loop` (text: stops at EOS), sampling, embedding and running the
trunk per token.

Layouts. Image generation runs 2 rows per image, interleaved: row 2i is the conditional prompt and
row 2i + 1 the unconditional one (every real token except BOS and `<begin_of_image>` replaced by
pad). Batch sharding splits rows in contiguous blocks, so with an image count divisible by the
data-parallel size a cond/uncond pair never straddles devices and the CFG mix stays local.
Prompts are left-padded; the first real token of a row is position 0 (llm.positions_from_mask).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Static sampling settings. temperature 0 = greedy (argmax); top_k 0 and top_p 1 = off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:  # NaN fails too
      raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, "
                       "0 < top_p <= 1")


GREEDY = Sampler(temperature=0.0)


def cfg_logits(cond_BxV: jax.Array, uncond_BxV: jax.Array, weight) -> jax.Array:
  """Classifier-free guidance as the reference mixes it: uncond + w (cond - uncond), in float32."""
  cond_BxV, uncond_BxV = cond_BxV.astype(jnp.float32), uncond_BxV.astype(jnp.float32)
  return uncond_BxV + weight * (cond_BxV - uncond_BxV)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis [B] int32 (first maximum; NaN counts as the maximum).

  A max, then a min over the indices that reach it: two plain reductions, which XLA:CPU
  vectorises, where argmax's (value, index) reduce runs scalar. Sampling one token per image
  from 8 x 16384 logits takes 0.38 ms this way against 1.24 (2-core Zen 5).
  """
  max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  hit_BxV = (x_BxV == max_Bx1) | jnp.isnan(x_BxV)
  index_V = jnp.arange(x_BxV.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit_BxV, index_V, x_BxV.shape[-1]), axis=-1)


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, settings: Sampler) -> jax.Array:
  """One id per row [B] int32: temperature, then top-k, then top-p (the HF warper order)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if settings.temperature == 0:
    return first_argmax(logits_BxV)
  logits_BxV = logits_BxV / settings.temperature
  neg_inf = jnp.finfo(jnp.float32).min
  if 0 < settings.top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, settings.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, neg_inf)
  if settings.top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass strictly before it is below p: the smallest set reaching p,
    # and always at least the most likely token.
    keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < settings.top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, neg_inf)
  # The Gumbel-max draw of jax.random.categorical (same key, same ids), with a faster argmax.
  return first_argmax(logits_BxV + jax.random.gumbel(rng, logits_BxV.shape, jnp.float32))


# --- shapes, validation, sharding -----------------------------------------------------------


def bucket_length(length: int) -> int:
  """Prompt length rounded up so recompiles stay bounded: powers of two from 16, then x128."""
  if length <= 128:
    return max(16, 1 << (length - 1).bit_length())
  return -(-length // 128) * 128


def _plan_length(model: Janus, prompt_len: int, new_tokens: int) -> int:
  """The padded prompt length; raises if the prompt plus new tokens cannot fit the context."""
  max_pos = model.config.llm.max_position_embeddings
  if prompt_len + new_tokens > max_pos:
    raise ValueError(f"prompt of {prompt_len} tokens + {new_tokens} new tokens = "
                     f"{prompt_len + new_tokens} exceeds max_position_embeddings={max_pos}")
  # Clamp the bucket so that the cache never needs more slots than the context allows.
  return min(bucket_length(prompt_len), max_pos - new_tokens)


def _left_pad(x_BxT: np.ndarray, length: int, value) -> np.ndarray:
  pad = length - x_BxT.shape[1]
  return np.pad(x_BxT, [(0, 0), (pad, 0)] + [(0, 0)] * (x_BxT.ndim - 2), constant_values=value)


@functools.lru_cache(maxsize=None)
def _param_shardings(model: Janus, mesh: Mesh) -> Any:
  return sharding.param_shardings(janus_lib.abstract_params(model), mesh)


def _data_parallel(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


def _check_divisible(count: int, what: str, mesh: Mesh | None) -> None:
  dp = _data_parallel(mesh)
  if count % dp:
    raise ValueError(f"{what} = {count} must be divisible by the data-parallel size {dp} "
                     f"(mesh axes {sharding.BATCH_AXES} of {dict(mesh.shape)})")


def _place(mesh: Mesh | None, model: Janus, params: Any, *batch: Any) -> tuple[Any, ...]:
  """Params onto their shardings and batch arrays (leading axis = rows) over the data axes.

  The jitted functions then follow these input shardings (propagation) and the sampler's own
  constraints. They run without a context mesh on purpose, so the model's training-layout
  activation constraints (the sequence over `fsdp`: sharding.mesh_rules) stay unbound: a decode
  step's sequence is one token.
  """
  if mesh is None:
    return (params, *(None if x is None else jnp.asarray(x) for x in batch))
  params = jax.device_put(params, _param_shardings(model, mesh))
  return (params, *(None if x is None else jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
                    for x in batch))


def _constrain_cache(cache: llm.KVCache, mesh: Mesh | None) -> llm.KVCache:
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


def _empty_cache(model: Janus, rows: int, slots: int, mesh: Mesh | None) -> llm.KVCache:
  """A zero KV cache in the compute dtype; with a mesh its rows follow the batch sharding."""
  c = model.config.llm
  cache = llm.KVCache.zeros(c.num_layers, rows, slots, c.num_kv_heads, c.head_dim,
                            janus_lib._dtype(model.config.dtype))
  return _constrain_cache(cache, mesh)


def _grown_cache(cache: llm.KVCache, slots: int, mesh: Mesh | None) -> llm.KVCache:
  """The cache with zero slots appended up to `slots`, as new buffers.

  The prefill fills a cache of only the prompt's slots and the token loop grows it: a prefill
  into the full cache cost 1.21 s against 0.35 s (bench preset, 16 rows, 608 slots, 2-core
  Zen 5), and handing a full stacked cache to the unrolled loop and back cost two more copies.
  """
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, slots - x.shape[-2]), (0, 0)])
  return _constrain_cache(
      llm.KVCache(jax.tree.map(pad, cache.k), jax.tree.map(pad, cache.v), cache.index), mesh)


def _apply(model: Janus, params: Any, fn, *args):
  return model.apply({"params": params}, *args, method=fn)


def _prefill(m: Janus, x_BxTxD, valid_BxT, cache: llm.KVCache):
  """Runs the prompt through the trunk into an empty cache: (last hidden [B, D], cache)."""
  t = valid_BxT.shape[1]
  hidden_BxTxD, cache = m(x_BxTxD, llm.positions_from_mask(valid_BxT),
                          llm.cache_mask(_slot_valid(valid_BxT, cache.slots), cache.index, t), cache)
  return hidden_BxTxD[:, -1], cache


def _step(m: Janus, x_Bx1xD, slot_valid_BxS, positions_B, cache: llm.KVCache):
  """One decode step of the trunk: (hidden [B, D], cache)."""
  hidden, cache = m(x_Bx1xD, positions_B[:, None], llm.cache_mask(slot_valid_BxS, cache.index, 1),
                    cache)
  return hidden[:, 0], cache


def _decode_jit(**jit_kwargs):
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


def _default_unroll(unroll_layers: bool | None) -> bool:
  # The unrolled path splits the weights once per call to save copies per step: a clear win
  # where weight reads bound the step (XLA:CPU); elsewhere the layer scan keeps memory and
  # compile time flat.
  return jax.default_backend() == "cpu" if unroll_layers is None else bool(unroll_layers)


def _decoder(model: Janus, params: Any, unroll: bool, head: str, rows: int):
  """(trunk, logits) for the token loop: trunk `(x [B, 1, D], slot_valid [B, S], positions [B],
  cache) -> (hidden [B, D], cache)`, logits `hidden -> [B, V]` float32 of the "image" or "text"
  head. `unroll`: models/decode.py's steps over per-layer column blocks (`decode.block_columns`
  of `rows`) instead of the layer scan; call this outside the loop (the blocks are split here,
  once) and carry the cache as `decode.split_cache` lays it out (split before the loop, also once).
  """
  logits_method = Janus.image_logits if head == "image" else Janus.text_logits
  if not unroll:
    return (lambda *args: _apply(model, params, _step, *args),
            lambda hidden_BxD: _apply(model, params, logits_method, hidden_BxD))
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

  def step(x_Bx1xD, slot_valid_BxS, positions_B, cache):
    mask_BxS = llm.cache_mask(slot_valid_BxS, cache.index, 1)[:, 0]
    return decode.trunk_step(c.llm, trunk, x_Bx1xD[:, 0], positions_B, mask_BxS, cache)
  return step, logits


def _slot_valid(valid_BxT: jax.Array, slots: int) -> jax.Array:
  """[B, S]: the prompt's validity, then every later slot marked valid up front.

  Causality hides a slot until it is written, so this never needs updating while decoding.
  """
  return jnp.concatenate([valid_BxT, jnp.ones((valid_BxT.shape[0], slots - valid_BxT.shape[1]), bool)],
                         axis=1)


# --- text-to-image --------------------------------------------------------------------------


def cfg_rows(ids_BxT: np.ndarray, valid_BxT: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Interleaved [2B, T] rows: prompt, then its unconditional twin (BOS and last token kept)."""
  ids_BxT, valid_BxT = np.asarray(ids_BxT), np.asarray(valid_BxT, bool)
  first_B = valid_BxT.argmax(axis=1)
  col_T = np.arange(ids_BxT.shape[1])
  blank = valid_BxT & (col_T != first_B[:, None]) & (col_T != ids_BxT.shape[1] - 1)
  uncond = np.where(blank, pad_id, ids_BxT)
  rows = np.stack([ids_BxT, uncond], axis=1).reshape(-1, ids_BxT.shape[1])
  return rows, np.repeat(valid_BxT, 2, axis=0)


@functools.partial(jax.jit, static_argnames=("model", "mesh"))
def _image_prefill(model, params, ids_RxT, valid_RxT, *, mesh):
  """(last hidden [R, D], a cache of the prompt's T slots)."""
  def run(m):
    cache = _empty_cache(model, ids_RxT.shape[0], ids_RxT.shape[1], mesh)
    return _prefill(m, m.embed_text(ids_RxT), valid_RxT, cache)
  return model.apply({"params": params}, method=run)


def default_segments(model: Janus, params: Any, rows: int, slots: int) -> int:
  """Scans for an image loop of `rows` rows (per device) and `slots` cache slots: 4 when the full
  KV cache outweighs the weights a step reads (many rows), else 1.

  Bench preset, 576 tokens, 2-core Zen 5, 4 segments against 1: at 16 rows (cache 640 MB,
  weights 487 MB) 39.5 / 42.8 / 37.5 ms a step against 47.9 / 53.3 / 40.4 (two benchmark runs,
  one A/B in one process); at 2 rows (80 MB) 21.0 / 22.0 / 21.3 against 17.9 / 22.7 / 20.7.
  With per-head attention on a 2-core Xeon (one process): 16 rows 62.5 / 64.2 against 64.8 / 65.4.
  """
  c = model.config.llm
  weights = [params["llm"]["decoder"], params["image_head"], params["generation_aligner"]]
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(weights))
  cache_bytes = (2 * c.num_layers * rows * slots * c.num_kv_heads * c.head_dim
                 * jnp.dtype(janus_lib._dtype(model.config.dtype)).itemsize)
  return 4 if cache_bytes > weight_bytes else 1


def _segment_bounds(trunk_calls: int, segments: int) -> list[tuple[int, int]]:
  cuts = np.linspace(0, trunk_calls, segments + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@_decode_jit(static_argnames=("model", "num_tokens", "settings", "mesh", "unroll", "segments"))
def _image_decode(model, params, hidden_RxD, cache, valid_RxT, rng, cfg_weight, *, num_tokens,
                  settings, mesh, unroll, segments):
  """Samples num_tokens tokens per image from the prefill's state; the trunk runs num_tokens - 1
  times, into the prompt's cache grown by as many slots.

  The loop runs as `segments` scans in turn, each over a cache grown only to the slots it can
  write by its end, so its attention reads no unwritten slots: with 4 segments of 576 tokens a
  step reads ~0.64 of the full cache on average. Each segment compiles its own loop body (at 16
  rows of the bench preset, per-head attention: 22 s against 9 s of compile, for 62.5 / 64.2 ms a
  step against 64.8 / 65.4, 2-core Xeon; README); `default_segments` picks 4 where
  the cache outweighs the weights.
  """
  rows, prompt_slots = hidden_RxD.shape[0], valid_RxT.shape[1]
  slot_valid_RxS = _slot_valid(valid_RxT, prompt_slots + num_tokens)
  trunk, image_logits = _decoder(model, params, unroll, "image", rows)
  cache = decode.split_cache(cache, rows) if unroll else cache  # once, outside the loop
  keys = jax.random.split(rng, num_tokens)  # one per image token

  def sample(hidden_RxD, key):
    logits_RxV = image_logits(hidden_RxD)
    pairs = logits_RxV.reshape(rows // 2, 2, -1)
    return sample_logits(key, cfg_logits(pairs[:, 0], pairs[:, 1], cfg_weight), settings)

  def body(slot_valid_RxS):
    def step(carry, key):
      hidden_RxD, cache, positions_R = carry
      ids_N = sample(hidden_RxD, key)
      x_Rx1xD = _apply(model, params, Janus.embed_image_tokens, jnp.repeat(ids_N, 2)[:, None])
      hidden_RxD, cache = trunk(x_Rx1xD, slot_valid_RxS, positions_R, cache)
      return (hidden_RxD, cache, positions_R + 1), ids_N
    return step

  positions_R = valid_RxT.sum(axis=1).astype(jnp.int32)
  trunk_calls, chunks_SxN = len(keys) - 1, []
  bounds = _segment_bounds(trunk_calls, segments)
  for start, stop in bounds:
    cache = _grown_cache(cache, prompt_slots + stop, mesh)  # trunk call j writes slot T + j
    (hidden_RxD, cache, positions_R), ids_SxN = jax.lax.scan(
        body(slot_valid_RxS[:, :cache.slots]), (hidden_RxD, cache, positions_R), keys[start:stop])
    chunks_SxN.append(ids_SxN)
  last_N = sample(hidden_RxD, keys[-1])
  return jnp.concatenate([c.T for c in chunks_SxN] + [last_N[:, None]], axis=1)


def generate_image_tokens(model: Janus, params: Any, prompt_ids_BxT, prompt_valid_BxT, *,
                          rng: jax.Array, pad_id: int, cfg_weight: float = 5.0,
                          settings: Sampler = Sampler(), images_per_prompt: int = 1,
                          num_image_tokens: int | None = None,
                          mesh: Mesh | None = None,
                          unroll_layers: bool | None = None,
                          segments: int | None = None) -> jax.Array:
  """Image-token ids [B * images_per_prompt, N] int32 (prompt-major), N = grid_size**2 default.

  prompt rows are left-padded, BOS first real token and `<begin_of_image>` last. Each image gets
  a conditional and an unconditional row; the sampled id feeds both. N - 1 trunk calls in all.
  unroll_layers: decode with the layers unrolled over per-layer weights (default: on CPU only).
  segments: scans the token loop is cut into, each attending over a growing cache prefix
  (`_image_decode`; default: `default_segments`); the tokens do not depend on it.
  """
  ids_BxT = np.asarray(prompt_ids_BxT)
  valid_BxT = np.asarray(prompt_valid_BxT, bool)
  if not valid_BxT[:, -1].all():
    raise ValueError("prompts must be left-padded: the last column (<begin_of_image>) must be real")
  n = num_image_tokens or model.config.vq.grid_size**2
  images = ids_BxT.shape[0] * images_per_prompt
  _check_divisible(images, "number of images (prompts x images_per_prompt)", mesh)
  length = _plan_length(model, ids_BxT.shape[1], n)
  ids_BxT = np.repeat(_left_pad(ids_BxT, length, pad_id), images_per_prompt, axis=0)
  valid_BxT = np.repeat(_left_pad(valid_BxT, length, False), images_per_prompt, axis=0)
  rows_RxT, valid_RxT = cfg_rows(ids_BxT, valid_BxT, pad_id)
  params, rows_RxT, valid_RxT = _place(mesh, model, params, rows_RxT.astype(np.int32), valid_RxT)
  hidden_RxD, cache = _image_prefill(model, params, rows_RxT, valid_RxT, mesh=mesh)
  return _image_decode(model, params, hidden_RxD, cache, valid_RxT, rng, jnp.float32(cfg_weight),
                       num_tokens=n, settings=settings, mesh=mesh,
                       unroll=_default_unroll(unroll_layers),
                       segments=segments or default_segments(
                           model, params, rows_RxT.shape[0] // _data_parallel(mesh), length + n))


# Output pixels per VQ-decode call on XLA:CPU: 2 images of 384 x 384. The decoder's activations
# (128 channels at full resolution, 75 MB an image in float32) then stay nearer the caches: 8
# images decode in 2.67 s an image this way, against 3.25 in one call and 2.82 one at a time
# (bench preset, 2-core Xeon; a slower hour, A/B in one process: 3.01 / 3.20 against 3.84 / 4.02).
VQ_PIXELS_PER_CALL = 2 * 384 * 384


def images_per_call(model: Janus, num_images: int, num_tokens: int) -> int:
  """Images `decode_images` decodes per call: VQ_PIXELS_PER_CALL worth on XLA:CPU, else all."""
  if jax.default_backend() != "cpu":
    return num_images
  pixels = num_tokens * 4 ** (len(model.config.vq.channel_multipliers) - 1)
  return max(1, min(num_images, VQ_PIXELS_PER_CALL // pixels))


@functools.partial(jax.jit, static_argnames=("model", "per_call"))
def _decode_images(model, params, ids_BxN, *, per_call):
  def decode(ids_CxN):
    pixels = _apply(model, params, Janus.vq_decode, ids_CxN)
    # The reference assigns into a uint8 array, which truncates toward zero (no rounding).
    return jnp.clip((pixels + 1) / 2 * 255, 0, 255).astype(jnp.uint8)

  b, n = ids_BxN.shape
  if per_call >= b:
    return decode(ids_BxN)
  whole = b - b % per_call  # chunks of per_call images in one lax.map, then the rest
  chunks = jax.lax.map(decode, ids_BxN[:whole].reshape(whole // per_call, per_call, n))
  parts = [chunks.reshape(whole, *chunks.shape[2:])]
  if whole < b:
    parts.append(decode(ids_BxN[whole:]))
  return jnp.concatenate(parts)


def decode_images(model: Janus, params: Any, ids_BxN) -> jax.Array:
  """Image-token ids [B, N] -> uint8 pixels [B, H, W, 3] (VQ decode, reference post-processing),
  `images_per_call` images at a time."""
  ids_BxN = jnp.asarray(ids_BxN, jnp.int32)
  return _decode_images(model, params, ids_BxN,
                        per_call=images_per_call(model, *ids_BxN.shape))


# --- text -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "mesh"))
def _text_prefill(model, params, ids_BxT, valid_BxT, image_mask_BxT, pixels, image_valid, *, mesh):
  """(first-token logits [B, V], a cache of the prompt's T slots)."""
  def run(m):
    cache = _empty_cache(model, ids_BxT.shape[0], ids_BxT.shape[1], mesh)
    x_BxTxD = m.embed_inputs(ids_BxT, image_mask_BxT, pixels, image_valid)
    hidden_BxD, cache = _prefill(m, x_BxTxD, valid_BxT, cache)
    return m.text_logits(hidden_BxD), cache
  return model.apply({"params": params}, method=run)


@_decode_jit(static_argnames=("model", "settings", "max_new_tokens", "mesh", "unroll"))
def _text_decode(model, params, logits_BxV, cache, valid_BxT, rng, eos_id, *, settings,
                 max_new_tokens, mesh, unroll):
  """Greedy/sampled tokens [B, max_new_tokens] until every row has produced EOS; the prompt's
  cache grows by max_new_tokens slots here (see _grown_cache)."""
  b = valid_BxT.shape[0]
  slots = valid_BxT.shape[1] + max_new_tokens
  slot_valid_BxS = _slot_valid(valid_BxT, slots)
  trunk, text_logits = _decoder(model, params, unroll, "text", b)
  cache = _grown_cache(decode.split_cache(cache, b) if unroll else cache, slots, mesh)
  keys = jax.random.split(rng, max_new_tokens)
  first_B = sample_logits(keys[0], logits_BxV, settings)
  tokens_BxN = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)
  positions_B = valid_BxT.sum(axis=1).astype(jnp.int32)

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~done_B.all()

  def body(carry):
    # Feeds token i - 1 and samples token i, so the final token is never run through the trunk.
    i, cache, tokens_BxN, done_B, positions_B = carry
    prev_B = jax.lax.dynamic_index_in_dim(tokens_BxN, i - 1, axis=1, keepdims=False)
    x_Bx1xD = _apply(model, params, Janus.embed_text, prev_B[:, None])
    hidden_BxD, cache = trunk(x_Bx1xD, slot_valid_BxS, positions_B, cache)
    logits_BxV = text_logits(hidden_BxD)
    next_B = jnp.where(done_B, eos_id, sample_logits(keys[i], logits_BxV, settings))
    tokens_BxN = jax.lax.dynamic_update_index_in_dim(tokens_BxN, next_B, i, axis=1)
    return i + 1, cache, tokens_BxN, done_B | (next_B == eos_id), positions_B + 1

  carry = (jnp.int32(1), cache, tokens_BxN, first_B == eos_id, positions_B)
  _, _, tokens_BxN, _, _ = jax.lax.while_loop(cond, body, carry)
  is_eos_BxN = tokens_BxN == eos_id
  lengths_B = jnp.where(is_eos_BxN.any(axis=1), is_eos_BxN.argmax(axis=1) + 1, max_new_tokens)
  return tokens_BxN, lengths_B.astype(jnp.int32)


def generate_text(model: Janus, params: Any, input_ids_BxT, attention_mask_BxT, *, rng: jax.Array,
                  max_new_tokens: int, eos_id: int, settings: Sampler = GREEDY,
                  image_mask_BxT=None, pixels=None, image_valid=None,
                  mesh: Mesh | None = None,
                  unroll_layers: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """(tokens [B, max_new_tokens] int32, lengths [B] int32) for left-padded prompts.

  lengths count the tokens up to and including EOS (max_new_tokens without one); later positions
  hold eos_id. pixels [B, n, H, W, 3] in [-1, 1] fill the image_mask placeholders in order
  (Janus.embed_inputs); image_valid [B, n] marks real images. unroll_layers: as in
  generate_image_tokens.
  """
  ids_BxT = np.asarray(input_ids_BxT)
  valid_BxT = np.asarray(attention_mask_BxT).astype(bool)
  if not valid_BxT[:, -1].all():  # prefill reads the last column's logits; the cache assumes it
    raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 in every row "
                     f"(rows {np.flatnonzero(~valid_BxT[:, -1]).tolist()} end in padding)")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens = {max_new_tokens} must be at least 1")
  _check_divisible(ids_BxT.shape[0], "batch size", mesh)
  length = _plan_length(model, ids_BxT.shape[1], max_new_tokens)
  ids_BxT = _left_pad(np.where(valid_BxT, ids_BxT, 0), length, 0).astype(np.int32)
  valid_BxT = _left_pad(valid_BxT, length, False)
  if pixels is not None:
    image_mask_BxT = _left_pad(np.asarray(image_mask_BxT).astype(bool), length, False)
    pixels = np.asarray(pixels, np.float32)
    image_valid = (np.ones(pixels.shape[:2], bool) if image_valid is None
                   else np.asarray(image_valid, bool))
  else:
    image_mask_BxT = None  # no images: every id embeds as text
  params, ids_BxT, valid_BxT, image_mask_BxT, pixels, image_valid = _place(
      mesh, model, params, ids_BxT, valid_BxT, image_mask_BxT, pixels, image_valid)
  logits_BxV, cache = _text_prefill(model, params, ids_BxT, valid_BxT, image_mask_BxT, pixels,
                                    image_valid, mesh=mesh)
  tokens_BxN, lengths_B = _text_decode(
      model, params, logits_BxV, cache, valid_BxT, rng, jnp.int32(eos_id), settings=settings,
      max_new_tokens=max_new_tokens, mesh=mesh, unroll=_default_unroll(unroll_layers))
  return tokens_BxN, lengths_B
