"""Janus: one LLM reading two decoupled visual encodings.

understanding: pixels -> understanding_encoder (SigLIP) -> understanding_aligner -> LLM -> text head
generation:    LLM hidden -> image_head -> image-token id -> generation_embed -> generation_aligner
               -> next LLM input; ids -> generation_tokenizer (VQ) decode -> pixels

Every method is a pure function of (params, inputs): call them with
`model.apply({"params": params}, ..., method=Janus.encode_images)` and so on.
"""

from __future__ import annotations

import functools

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from janus_jax.models import adapters, llm, siglip, vq

Dtype = Any


def _dtype(name_or_dtype) -> Any:
  return jnp.dtype(name_or_dtype) if isinstance(name_or_dtype, str) else name_or_dtype


class Janus(nn.Module):
  """`config` is the `model` block of a configs/*.py file (see configs/tiny.py for every field)."""

  config: Any

  def setup(self):
    c = self.config
    kw = dict(dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
    layers = dict(remat_policy=c.remat_policy, scan_layers=c.get("scan_layers", True))
    # Every trained Dense layer (not the VQ's convs) may take the CPU-friendly weight gradient.
    dense = dict(materialize_grad_transpose=c.get("materialize_grad_transpose", False))
    d = c.llm.hidden_size
    self.understanding_encoder = siglip.VisionTransformer(c.vision, **layers, **dense, **kw)
    self.understanding_aligner = adapters.MlpAligner(d, c.aligner_depth, **dense, **kw)
    self.generation_tokenizer = vq.VQModel(c.vq, **kw)
    self.generation_embed = nn.Embed(
        c.vq.codebook_size, c.vq.codebook_dim, **kw,
        embedding_init=llm.param_with_axes(llm.default_kernel_init, ("codebook", None)))
    self.generation_aligner = adapters.MlpAligner(d, c.generation_aligner_depth, **dense, **kw)
    self.image_head = adapters.ImageHead(c.image_head_dim, c.vq.codebook_size, **dense, **kw)
    self.llm = llm.LanguageModel(c.llm, **layers, **dense, **kw)

  # --- inputs -------------------------------------------------------------------------------
  def encode_images(self, pixels_BxHxWx3: jax.Array) -> jax.Array:
    """pixels in [-1, 1] -> understanding features [B, num_patches, D]."""
    return self.understanding_aligner(self.understanding_encoder(pixels_BxHxWx3))

  def embed_text(self, ids_BxT: jax.Array) -> jax.Array:
    return self.llm.embed(ids_BxT)

  def embed_image_tokens(self, ids_BxT: jax.Array) -> jax.Array:
    """Image-token ids -> LLM input embeddings [B, T, D] (generation embedding + aligner)."""
    return self.generation_aligner(self.generation_embed(ids_BxT))

  def embed_inputs(self, ids_BxT: jax.Array, image_mask_BxT: jax.Array | None = None,
                   pixels_BxIxHxWx3: jax.Array | None = None,
                   image_valid_BxI: jax.Array | None = None) -> jax.Array:
    """Text embeddings with image features written at the image-placeholder positions.

    Within each row, as the reference pairs them over the batch: the k-th True of row b's
    `image_mask` takes the k-th feature row of row b's valid images ([I * num_patches] in order);
    padding image slots (image_valid False) are skipped. Per row, so that a batch sharded over
    its rows gathers from its own rows' features: the reference's batch-wide pairing made every
    device hold every image's features (Janus-Pro-7B stage 2 on 256 devices, benchmarks/
    training.py: 42.7 GiB per device against 33.8). The two agree whenever each row holds as many
    image positions as its images have features, as every batch the pipeline or the chat
    templates build does. Negative ids (ignore labels) embed as id 0.
    """
    x_BxTxD = self.embed_text(jnp.maximum(ids_BxT, 0))
    if pixels_BxIxHxWx3 is None:
      return x_BxTxD
    b, n_img = pixels_BxIxHxWx3.shape[:2]
    feats = self.encode_images(pixels_BxIxHxWx3.reshape(b * n_img, *pixels_BxIxHxWx3.shape[2:]))
    per_image = feats.shape[1]
    feats_BxFxD = feats.reshape(b, n_img * per_image, -1).astype(x_BxTxD.dtype)
    if image_valid_BxI is None:
      image_valid_BxI = jnp.ones((b, n_img), bool)
    valid_BxF = jnp.repeat(image_valid_BxI.astype(bool), per_image, axis=1)
    valid_first_BxF = jnp.argsort(~valid_BxF, axis=1, stable=True)  # valid feature rows first
    mask_BxT = image_mask_BxT.astype(bool)
    rank_BxT = jnp.clip(jnp.cumsum(mask_BxT, axis=1) - 1, 0, feats_BxFxD.shape[1] - 1)
    index_BxT = jnp.take_along_axis(valid_first_BxF, rank_BxT, axis=1)
    gathered_BxTxD = jnp.take_along_axis(feats_BxFxD, index_BxT[..., None], axis=1)
    return jnp.where(mask_BxT[..., None], gathered_BxTxD, x_BxTxD)

  # --- the trunk ----------------------------------------------------------------------------
  def __call__(self, embeddings_BxTxD: jax.Array, positions_BxT: jax.Array, mask: jax.Array,
               cache: llm.KVCache | None = None) -> tuple[jax.Array, llm.KVCache | None]:
    """LLM trunk: (hidden [B, T, D] after the final norm, updated cache).

    mask is boolean [B, T, S]: query t may attend key slot s; S = T without a cache, else the
    cache's slot count (see llm.causal_mask / llm.cache_mask / llm.segment_mask).
    """
    return self.llm(embeddings_BxTxD, positions_BxT, mask, cache)

  # --- heads --------------------------------------------------------------------------------
  def text_logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
    return self.llm.logits(hidden_BxTxD).astype(jnp.float32)

  def image_logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
    return self.image_head(hidden_BxTxD).astype(jnp.float32)

  # --- the generation tokenizer -------------------------------------------------------------
  def vq_encode(self, pixels_BxHxWx3: jax.Array) -> jax.Array:
    return self.generation_tokenizer.encode(pixels_BxHxWx3)

  def vq_decode(self, ids_BxN: jax.Array) -> jax.Array:
    return self.generation_tokenizer.decode(ids_BxN).astype(jnp.float32)

  def touch_all(self, pixels_BxHxWx3: jax.Array, ids_BxT: jax.Array) -> jax.Array:
    """Runs every part once; only for `init`."""
    und = self.encode_images(pixels_BxHxWx3)
    x = jnp.concatenate([und, self.embed_text(ids_BxT), self.embed_image_tokens(ids_BxT)], axis=1)
    valid = jnp.ones(x.shape[:2], bool)
    hidden, _ = self(x, llm.positions_from_mask(valid), llm.causal_mask(valid))
    vq_pixels = self.generation_tokenizer(pixels_BxHxWx3)
    return self.text_logits(hidden).sum() + self.image_logits(hidden).sum() + vq_pixels.sum()


def init_params(model: Janus, rng: jax.Array) -> Any:
  """Parameters (logically partitioned boxes) for every part, from dummy inputs."""
  c = model.config
  pixels = jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  return model.init(rng, pixels, ids, method=Janus.touch_all)["params"]


def init_params_host(model: Janus, seed: int) -> Any:
  """Unboxed numpy params with the same distributions as `init_params`, drawn on the host.

  XLA:CPU compiles a jitted init slowly (minutes of threefry for ~200 leaves on 2 cores); small
  models (tests, the digits demo) start in well under a second this way. Large models should use
  the jitted `init_params` with out_shardings so no host holds the whole model.
  """
  import flax
  import numpy as np

  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(nn.unbox(abstract_params(model)))
  out = {}
  for path, leaf in flat.items():
    name = path[-1]
    if name == "scale":
      value = np.ones(leaf.shape, np.float32)
    elif name == "bias":
      value = np.zeros(leaf.shape, np.float32)
    else:
      std = 1.0 if name == "codebook" else 0.02  # as the initializers in the model files
      value = std * rng.standard_normal(leaf.shape, np.float32)
    out[path] = value.astype(leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=8)
def abstract_params(model: Janus) -> Any:
  """ShapeDtypeStructs (still logically partitioned), with nothing allocated. Cached per model
  config: tracing the init takes seconds, and loading, sharding and host init each need it.
  Treat the result as read-only."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def build(config: ml_collections.ConfigDict) -> Janus:
  """The `Janus` module for a model config (any ConfigDict; stored frozen so it hashes)."""
  return Janus(ml_collections.FrozenConfigDict(config))
