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
from jax.sharding import Mesh

from janus_jax import sharding, token_loop
from janus_jax.models import decode
from janus_jax.models import janus as janus_lib

Janus = janus_lib.Janus


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Static sampling settings. temperature 0 = greedy (argmax); top_k 0 and top_p 1 = off.

  Logits tied exactly at the top-p cutoff are all kept; `transformers` keeps those its sort puts
  first (only exact ties differ: bfloat16 or rounded logits).
  """

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


def _kth_largest(logits_BxV: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
  """[B, 1]: each row's k-th largest logit. lax.top_k does not partition over rows: on a mesh it
  would gather every row's logits onto every device each step, so there it runs per shard."""
  kth = lambda x_BxV: jax.lax.top_k(x_BxV, k)[0][:, -1:]
  if token_loop.data_parallel(mesh) == 1:
    return kth(logits_BxV)
  rows = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
  return jax.shard_map(kth, mesh=mesh, in_specs=rows, out_specs=rows)(logits_BxV)


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, settings: Sampler,
                  mesh: Mesh | None = None) -> jax.Array:
  """One id per row [B] int32: temperature, then top-k, then top-p (the HF warper order).
  mesh: the one the rows are split over (the draw does not depend on it)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if settings.temperature == 0:
    return first_argmax(logits_BxV)
  # Shifted by the row max first: a tiny temperature then sends the rest to -inf, where plain
  # division overflowed to +inf and the draw took the first positive logit, not the largest.
  logits_BxV = (logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True)) / settings.temperature
  neg_inf = jnp.finfo(jnp.float32).min
  if 0 < settings.top_k < logits_BxV.shape[-1]:
    kth_Bx1 = _kth_largest(logits_BxV, settings.top_k, mesh)
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
    cache = token_loop.empty_cache(model, ids_RxT.shape[0], ids_RxT.shape[1], mesh)
    return token_loop.prefill(m, m.embed_text(ids_RxT), valid_RxT, cache)
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


@token_loop.decode_jit(
    static_argnames=("model", "num_tokens", "settings", "mesh", "unroll", "segments"))
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
  slot_valid_RxS = token_loop.slot_valid(valid_RxT, prompt_slots + num_tokens)
  trunk, image_logits = token_loop.decoder(model, params, unroll, "image", rows)
  cache = decode.split_cache(cache, rows) if unroll else cache  # once, outside the loop
  keys = jax.random.split(rng, num_tokens)  # one per image token

  def sample(hidden_RxD, key):
    logits_RxV = image_logits(hidden_RxD)
    pairs = logits_RxV.reshape(rows // 2, 2, -1)
    return sample_logits(key, cfg_logits(pairs[:, 0], pairs[:, 1], cfg_weight), settings, mesh)

  def body(slot_valid_RxS):
    def step(carry, key):
      hidden_RxD, cache, positions_R = carry
      ids_N = sample(hidden_RxD, key)
      ids_Rx1 = jnp.repeat(ids_N, 2)[:, None]  # the sampled id feeds both rows of its image
      x_Rx1xD = token_loop.apply(model, params, Janus.embed_image_tokens, ids_Rx1)
      hidden_RxD, cache = trunk(x_Rx1xD, slot_valid_RxS, positions_R, cache)
      return (hidden_RxD, cache, positions_R + 1), ids_N
    return step

  positions_R = valid_RxT.sum(axis=1).astype(jnp.int32)
  trunk_calls, chunks_SxN = len(keys) - 1, []
  bounds = _segment_bounds(trunk_calls, segments)
  for start, stop in bounds:
    # trunk call j writes slot T + j
    cache = token_loop.grown_cache(cache, prompt_slots + stop, mesh)
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
  _check_same_shape(ids_BxT, prompt_valid=valid_BxT)
  if not valid_BxT[:, -1].all():
    raise ValueError("prompts must be left-padded: the last column (<begin_of_image>) must be real")
  vocab = model.config.llm.vocab_size
  if not 0 <= pad_id < vocab:  # an id past the table would embed as its last row, silently
    raise ValueError(f"pad_id = {pad_id} is outside the vocabulary [0, {vocab})")
  if images_per_prompt < 1:
    raise ValueError(f"images_per_prompt = {images_per_prompt} must be at least 1")
  n = model.config.vq.grid_size**2 if num_image_tokens is None else num_image_tokens
  if n < 1:  # (0 used to mean the default)
    raise ValueError(f"num_image_tokens = {n} must be at least 1")
  images = ids_BxT.shape[0] * images_per_prompt
  token_loop.check_divisible(images, "number of images (prompts x images_per_prompt)", mesh)
  length = token_loop.plan_length(model, ids_BxT.shape[1], n)
  ids_BxT = np.repeat(token_loop.left_pad(ids_BxT, length, pad_id), images_per_prompt, axis=0)
  valid_BxT = np.repeat(token_loop.left_pad(valid_BxT, length, False), images_per_prompt, axis=0)
  rows_RxT, valid_RxT = cfg_rows(ids_BxT, valid_BxT, pad_id)
  params, rows_RxT, valid_RxT = token_loop.place(mesh, model, params, rows_RxT.astype(np.int32),
                                                 valid_RxT)
  rows_per_device = rows_RxT.shape[0] // token_loop.data_parallel(mesh)
  segments = segments or default_segments(model, params, rows_per_device, length + n)
  hidden_RxD, cache = _image_prefill(model, params, rows_RxT, valid_RxT, mesh=mesh)
  return _image_decode(model, params, hidden_RxD, cache, valid_RxT, rng, jnp.float32(cfg_weight),
                       num_tokens=n, settings=settings, mesh=mesh,
                       unroll=token_loop.default_unroll(unroll_layers), segments=segments)


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
    pixels = token_loop.apply(model, params, Janus.vq_decode, ids_CxN)
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
  codebook = model.config.vq.codebook_size
  if bool(jnp.any((ids_BxN < 0) | (ids_BxN >= codebook))):
    raise ValueError(f"image-token ids must lie in [0, {codebook}) (the VQ codebook); got "
                     f"{int(ids_BxN.min())} .. {int(ids_BxN.max())}")
  return _decode_images(model, params, ids_BxN,
                        per_call=images_per_call(model, *ids_BxN.shape))


# --- text -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "mesh"))
def _text_prefill(model, params, ids_BxT, valid_BxT, image_mask_BxT, pixels, image_valid, *, mesh):
  """(first-token logits [B, V], a cache of the prompt's T slots)."""
  def run(m):
    cache = token_loop.empty_cache(model, ids_BxT.shape[0], ids_BxT.shape[1], mesh)
    x_BxTxD = m.embed_inputs(ids_BxT, image_mask_BxT, pixels, image_valid)
    hidden_BxD, cache = token_loop.prefill(m, x_BxTxD, valid_BxT, cache)
    return m.text_logits(hidden_BxD), cache
  return model.apply({"params": params}, method=run)


@token_loop.decode_jit(static_argnames=("model", "settings", "max_new_tokens", "mesh", "unroll"))
def _text_decode(model, params, logits_BxV, cache, valid_BxT, rng, eos_id, *, settings,
                 max_new_tokens, mesh, unroll):
  """Greedy/sampled tokens [B, max_new_tokens] until every row has produced EOS; the prompt's
  cache grows by max_new_tokens slots here (see token_loop.grown_cache)."""
  b = valid_BxT.shape[0]
  slots = valid_BxT.shape[1] + max_new_tokens
  slot_valid_BxS = token_loop.slot_valid(valid_BxT, slots)
  trunk, text_logits = token_loop.decoder(model, params, unroll, "text", b)
  cache = token_loop.grown_cache(decode.split_cache(cache, b) if unroll else cache, slots, mesh)
  keys = jax.random.split(rng, max_new_tokens)
  first_B = sample_logits(keys[0], logits_BxV, settings, mesh)
  tokens_BxN = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)
  positions_B = valid_BxT.sum(axis=1).astype(jnp.int32)

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~done_B.all()

  def body(carry):
    # Feeds token i - 1 and samples token i, so the final token is never run through the trunk.
    i, cache, tokens_BxN, done_B, positions_B = carry
    prev_B = jax.lax.dynamic_index_in_dim(tokens_BxN, i - 1, axis=1, keepdims=False)
    x_Bx1xD = token_loop.apply(model, params, Janus.embed_text, prev_B[:, None])
    hidden_BxD, cache = trunk(x_Bx1xD, slot_valid_BxS, positions_B, cache)
    logits_BxV = text_logits(hidden_BxD)
    next_B = jnp.where(done_B, eos_id, sample_logits(keys[i], logits_BxV, settings, mesh))
    tokens_BxN = jax.lax.dynamic_update_index_in_dim(tokens_BxN, next_B, i, axis=1)
    return i + 1, cache, tokens_BxN, done_B | (next_B == eos_id), positions_B + 1

  carry = (jnp.int32(1), cache, tokens_BxN, first_B == eos_id, positions_B)
  _, _, tokens_BxN, _, _ = jax.lax.while_loop(cond, body, carry)
  is_eos_BxN = tokens_BxN == eos_id
  lengths_B = jnp.where(is_eos_BxN.any(axis=1), is_eos_BxN.argmax(axis=1) + 1, max_new_tokens)
  return tokens_BxN, lengths_B.astype(jnp.int32)


def _check_same_shape(ids_BxT: np.ndarray, **masks: np.ndarray | None) -> None:
  """ids are [B, T] and every given mask has their shape (a mask one column short would be
  left-padded on its own and land off its tokens)."""
  if ids_BxT.ndim != 2:
    raise ValueError(f"input ids have shape {ids_BxT.shape}, expected [batch, length]")
  for name, mask in masks.items():
    if mask is not None and mask.shape != ids_BxT.shape:
      raise ValueError(f"{name} has shape {mask.shape}, but the input ids have {ids_BxT.shape}")


def _check_images(model: Janus, rows: int, image_mask_BxT, pixels, image_valid) -> None:
  """The image arguments of generate_text agree: both or neither of mask and pixels, and each
  row's placeholders are exactly its real images' tokens."""
  if (image_mask_BxT is None) != (pixels is None):
    raise ValueError("generate_text: pass image_mask_BxT and pixels together (got only "
                     f"{'pixels' if image_mask_BxT is None else 'image_mask_BxT'})")
  if pixels is None:
    return
  v = model.config.vision
  shape = np.shape(pixels)
  if len(shape) != 5 or shape[0] != rows or shape[2:] != (v.image_size, v.image_size, 3):
    raise ValueError(f"pixels has shape {shape}, expected [{rows}, images, {v.image_size}, "
                     f"{v.image_size}, 3]")
  valid_BxI = np.ones(shape[:2], bool) if image_valid is None else np.asarray(image_valid, bool)
  if valid_BxI.shape != shape[:2]:
    raise ValueError(f"image_valid has shape {valid_BxI.shape}, expected {shape[:2]}")
  per_image = (v.image_size // v.patch_size) ** 2
  placeholders_B = np.asarray(image_mask_BxT, bool).sum(axis=1)
  wanted_B = valid_BxI.sum(axis=1) * per_image
  bad = np.flatnonzero(placeholders_B != wanted_B)
  if bad.size:
    r = int(bad[0])
    raise ValueError(f"row {r}: image_mask marks {placeholders_B[r]} placeholder tokens but its "
                     f"{wanted_B[r] // per_image} image(s) fill {wanted_B[r]} ({per_image} each)")


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
  _check_same_shape(ids_BxT, attention_mask=valid_BxT,
                    image_mask_BxT=None if image_mask_BxT is None else np.asarray(image_mask_BxT))
  if not valid_BxT[:, -1].all():  # prefill reads the last column's logits; the cache assumes it
    raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 in every row "
                     f"(rows {np.flatnonzero(~valid_BxT[:, -1]).tolist()} end in padding)")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens = {max_new_tokens} must be at least 1")
  token_loop.check_divisible(ids_BxT.shape[0], "batch size", mesh)
  length = token_loop.plan_length(model, ids_BxT.shape[1], max_new_tokens)
  ids_BxT = token_loop.left_pad(np.where(valid_BxT, ids_BxT, 0), length, 0).astype(np.int32)
  valid_BxT = token_loop.left_pad(valid_BxT, length, False)
  _check_images(model, valid_BxT.shape[0], image_mask_BxT, pixels, image_valid)
  if pixels is not None:
    image_mask_BxT = token_loop.left_pad(np.asarray(image_mask_BxT).astype(bool), length, False)
    pixels = np.asarray(pixels, np.float32)
    image_valid = (np.ones(pixels.shape[:2], bool) if image_valid is None
                   else np.asarray(image_valid, bool))
  else:
    image_mask_BxT = None  # no images: every id embeds as text
  params, ids_BxT, valid_BxT, image_mask_BxT, pixels, image_valid = token_loop.place(
      mesh, model, params, ids_BxT, valid_BxT, image_mask_BxT, pixels, image_valid)
  logits_BxV, cache = _text_prefill(model, params, ids_BxT, valid_BxT, image_mask_BxT, pixels,
                                    image_valid, mesh=mesh)
  tokens_BxN, lengths_B = _text_decode(
      model, params, logits_BxV, cache, valid_BxT, rng, jnp.int32(eos_id), settings=settings,
      max_new_tokens=max_new_tokens, mesh=mesh, unroll=token_loop.default_unroll(unroll_layers))
  return tokens_BxN, lengths_B
