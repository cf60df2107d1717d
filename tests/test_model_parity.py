"""Every part of the Flax Janus against `transformers`' PyTorch Janus (float32, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import oracle
from janus_jax import convert
from janus_jax.models import janus as janus_lib
from janus_jax.models import llm

IMAGE_TOKEN = 5  # image_token_id in the oracle's config


@functools.lru_cache(maxsize=None)
def _setup(variant: str):
  hf = oracle.build(variant, seed={"gqa": 1, "mha": 2}[variant])
  model = janus_lib.build(convert.config_from_hf(hf.config.to_dict()))
  params = convert.params_from_hf_state_dict(oracle.state_dict_numpy(hf), model)
  return hf, model, jax.tree.map(jnp.asarray, params)


@pytest.fixture(params=list(oracle.VARIANTS), scope="module")
def setup(request):
  return _setup(request.param)


def _with_layers(model, scan_layers: bool):
  """The same model with its layers as a scan (True) or a Python loop (False)."""
  config = ml_collections.ConfigDict(model.config)
  config.scan_layers = scan_layers
  return janus_lib.build(config)


LAYERS = pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])


def _apply(model, params, method, *args):
  return model.apply({"params": params}, *args, method=method)


def _pixels(rng, b, size):
  return rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@LAYERS
def test_understanding_features(setup, scan_layers):
  hf, model, params = setup
  model = _with_layers(model, scan_layers)
  pixels = _pixels(np.random.default_rng(0), 2, 32)
  ours = _apply(model, params, janus_lib.Janus.encode_images, pixels)
  with torch.no_grad():
    ref = hf.model.get_image_features(_nchw(pixels)).pooler_output.numpy()
  assert ours.shape == ref.shape == (2, 16, 64)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def _mixed_batch(rng, pad_first_row: int = 3):
  """Two rows: text, then an image's 16 placeholders, then text; row 0 left-padded."""
  b, t = 2, 28
  ids = rng.integers(10, 256, (b, t))
  ids[:, 6:22] = IMAGE_TOKEN
  valid = np.ones((b, t), bool)
  valid[0, :pad_first_row] = False
  ids[0, :pad_first_row] = 0
  return ids, valid


@LAYERS
def test_llm_logits_on_text_and_image(setup, scan_layers):
  hf, model, params = setup
  model = _with_layers(model, scan_layers)
  rng = np.random.default_rng(1)
  ids, valid = _mixed_batch(rng)
  pixels = _pixels(rng, 2, 32)
  positions = np.asarray(llm.positions_from_mask(jnp.asarray(valid)))

  def forward(module):
    x = module.embed_inputs(ids, ids == IMAGE_TOKEN, pixels[:, None])
    hidden, _ = module(x, positions, llm.causal_mask(jnp.asarray(valid)))
    return hidden, module.text_logits(hidden), module.image_logits(hidden)

  hidden, text_logits, image_logits = model.apply({"params": params}, method=forward)
  with torch.no_grad():
    out = hf.model(input_ids=torch.from_numpy(ids), pixel_values=_nchw(pixels),
                   attention_mask=torch.from_numpy(valid.astype(np.int64)),
                   position_ids=torch.from_numpy(positions))
    ref_hidden = out.last_hidden_state
    ref_text = hf.lm_head(ref_hidden).numpy()
    ref_image = hf.model.generation_head(ref_hidden).numpy()
  np.testing.assert_allclose(np.asarray(text_logits)[valid], ref_text[valid], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(image_logits)[valid], ref_image[valid], atol=1e-4, rtol=1e-4)
  # The image head alone, on identical inputs.
  head = _apply(model, params, janus_lib.Janus.image_logits, ref_hidden.numpy())
  np.testing.assert_allclose(np.asarray(head), ref_image, atol=1e-5, rtol=1e-6)
  assert np.abs(ref_text).max() > 1 and np.abs(ref_image).max() > 1  # non-trivial scale


def test_generation_embedding_path(setup):
  hf, model, params = setup
  ids = np.random.default_rng(2).integers(0, 64, (3, 7))
  ours = _apply(model, params, janus_lib.Janus.embed_image_tokens, ids)
  with torch.no_grad():
    ref = hf.prepare_embeddings_for_image_generation(torch.from_numpy(ids)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_text_embedding(setup):
  hf, model, params = setup
  ids = np.random.default_rng(3).integers(0, 256, (2, 9))
  ours = _apply(model, params, janus_lib.Janus.embed_text, ids)
  with torch.no_grad():
    ref = hf.model.language_model.embed_tokens(torch.from_numpy(ids)).numpy()
  np.testing.assert_array_equal(ours, ref)


def test_vq_decode(setup):
  hf, model, params = setup
  n = 16  # a 4 x 4 token grid
  ids = np.random.default_rng(4).integers(0, 64, (2, n))
  ours = _apply(model, params, janus_lib.Janus.vq_decode, ids)
  with torch.no_grad():
    hf.model.vqmodel.quantize.quant_state_dims = [4, 4]
    ref = hf.model.vqmodel.decode(torch.from_numpy(ids)).numpy().transpose(0, 2, 3, 1)
  side = 4 * 2 ** (len(model.config.vq.channel_multipliers) - 1)
  assert ours.shape == ref.shape == (2, side, side, 3)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_vq_encode_ids_match_reference(setup):
  """The reference L2-normalises latents and codebook before the nearest-code search."""
  hf, model, params = setup
  side = 4 * 2 ** (len(model.config.vq.channel_multipliers) - 1)
  pixels = _pixels(np.random.default_rng(5), 3, side)
  ours = np.asarray(_apply(model, params, janus_lib.Janus.vq_encode, pixels))
  vqm = hf.model.vqmodel
  with torch.no_grad():
    z = vqm.quant_conv(vqm.encoder(_nchw(pixels))).permute(0, 2, 3, 1).reshape(-1, 8)
    z = torch.nn.functional.normalize(z, dim=-1)
    codebook = torch.nn.functional.normalize(vqm.quantize.embedding.weight, dim=-1)
    dist = (z**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * z @ codebook.T
    ref = dist.argmin(1).reshape(3, -1).numpy()
    hf_port = vqm.encode(_nchw(pixels)).image_tokens.reshape(3, -1).numpy()
    top2 = dist.topk(2, largest=False).values
  assert (top2[:, 1] - top2[:, 0]).min() > 1e-5, "near-tie in the oracle; pick another seed"
  np.testing.assert_array_equal(ours, ref)
  # The `transformers` port skips the normalisation; make sure the test can tell the two apart.
  assert (hf_port != ref).any()


@LAYERS
def test_prefill_then_decode_equals_full_forward(setup, scan_layers):
  hf, model, params = setup
  model = _with_layers(model, scan_layers)
  rng = np.random.default_rng(6)
  ids, valid = _mixed_batch(rng)
  pixels = _pixels(rng, 2, 32)
  t = ids.shape[1]
  prompt = 20
  positions = llm.positions_from_mask(jnp.asarray(valid))
  c = model.config.llm

  def run(module):
    x = module.embed_inputs(ids, ids == IMAGE_TOKEN, pixels[:, None])
    full, _ = module(x, positions, llm.causal_mask(jnp.asarray(valid)))
    cache = llm.KVCache.zeros(c.num_layers, 2, t + 4, c.num_kv_heads, c.head_dim)
    slot_valid = jnp.zeros((2, t + 4), bool).at[:, :t].set(jnp.asarray(valid))
    hidden, cache = module(x[:, :prompt], positions[:, :prompt],
                           llm.cache_mask(slot_valid, cache.index, prompt), cache)
    steps = [hidden]
    for i in range(prompt, t):
      h, cache = module(x[:, i:i + 1], positions[:, i:i + 1],
                        llm.cache_mask(slot_valid, cache.index, 1), cache)
      steps.append(h)
    return module.text_logits(full), module.text_logits(jnp.concatenate(steps, axis=1)), cache.index

  full, stepped, index = model.apply({"params": params}, method=run)
  assert int(index) == t
  np.testing.assert_allclose(np.asarray(stepped)[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), pixel_values=_nchw(pixels),
             attention_mask=torch.from_numpy(valid.astype(np.int64)),
             position_ids=torch.from_numpy(np.asarray(positions))).logits.numpy()
  np.testing.assert_allclose(np.asarray(stepped)[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_several_images_with_padding_slots(setup):
  """Within each row, the k-th placeholder takes the k-th valid image's features."""
  hf, model, params = setup
  rng = np.random.default_rng(7)
  pixels = _pixels(rng, 4, 32).reshape(2, 2, 32, 32, 3)
  valid_images = np.array([[True, True], [True, False]])
  ids = rng.integers(10, 256, (2, 40))
  ids[0, 2:18] = ids[0, 20:36] = IMAGE_TOKEN
  ids[1, 10:26] = IMAGE_TOKEN
  ours = _apply(model, params, janus_lib.Janus.embed_inputs, ids, ids == IMAGE_TOKEN, pixels,
                valid_images)
  with torch.no_grad():
    feats = hf.model.get_image_features(_nchw(pixels.reshape(4, 32, 32, 3))).pooler_output.numpy()
    ref = hf.model.language_model.embed_tokens(torch.from_numpy(ids)).numpy()
  feats = feats.reshape(2, 2, 16, -1)
  ref[0, 2:18], ref[0, 20:36], ref[1, 10:26] = feats[0, 0], feats[0, 1], feats[1, 0]
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
