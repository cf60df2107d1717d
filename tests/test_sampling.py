"""Sampling against `transformers`' Janus `generate` (greedy, float32, CPU) and its own invariants."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import oracle
from janus_jax import convert, sampling, sharding, token_loop
from janus_jax.models import decode
from janus_jax.models import janus as janus_lib
from janus_jax.models import llm

BOS, PAD, BOI, IMAGE_TOKEN = 1, 2, 3, 5  # within the oracle's 256-token vocab
CFG = 3.0


@functools.lru_cache(maxsize=None)
def _setup():
  hf = oracle.build("gqa", seed=1)
  hf.generation_config.bos_token_id = BOS
  hf.generation_config.pad_token_id = PAD
  hf.generation_config.generation_kwargs = {"boi_token_id": BOI}
  model = janus_lib.build(convert.config_from_hf(hf.config.to_dict()))
  params = convert.params_from_hf_state_dict(oracle.state_dict_numpy(hf), model)
  return hf, model, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def setup():
  return _setup()


def _t2i_prompts(pad_first_row: int = 3, length: int = 11):
  """Two text-to-image prompts (BOS ... BOI); row 0 is shorter, left-padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(10, 256, (2, length))
  ids[:, 0], ids[:, -1] = BOS, BOI
  valid = np.ones(ids.shape, bool)
  ids[0, :pad_first_row], valid[0, :pad_first_row] = PAD, False
  ids[0, pad_first_row] = BOS
  return ids, valid


def _hf_image_tokens(hf, ids, valid, **kw):
  with torch.no_grad():
    return hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(valid.astype(np.int64)),
                       generation_mode="image", guidance_scale=CFG, **kw).numpy()


@contextlib.contextmanager
def _narrow_blocks():
  """models/decode.py's column blocks 7 wide (at any row count), so the unrolled (CPU) sampler
  splits every kernel of the oracle's shapes into several uneven blocks; jit caches cleared
  around it, as the width is not part of any compilation key."""
  jax.clear_caches()
  with (mock.patch.object(decode, "BLOCK_COLUMNS", 7),
        mock.patch.object(decode, "EIGEN_BLOCK_COLUMNS", 7)):
    yield
  jax.clear_caches()


@functools.lru_cache(maxsize=None)
def _greedy_image_tokens(unroll_layers: bool = True):
  _, model, params = _setup()
  ids, valid = _t2i_prompts()
  with _narrow_blocks():
    return np.asarray(sampling.generate_image_tokens(
        model, params, ids, valid, rng=jax.random.key(0), pad_id=PAD, cfg_weight=CFG,
        settings=sampling.GREEDY, unroll_layers=unroll_layers))


@pytest.mark.parametrize("unroll_layers", [True, False], ids=["blocked", "layer_scan"])
def test_greedy_image_tokens_match_transformers(setup, unroll_layers):
  hf, model, _ = setup
  ids, valid = _t2i_prompts()
  ours = _greedy_image_tokens(unroll_layers)
  assert ours.shape == (2, 16) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, _hf_image_tokens(hf, ids, valid, do_sample=False))


@pytest.mark.parametrize("unroll_layers", [True, False], ids=["blocked", "layer_scan"])
def test_segmented_image_loop_matches_transformers(setup, unroll_layers):
  """The token loop cut into 4 scans over growing cache prefixes (15 trunk calls: segments of 4,
  4, 3 and 4 steps) still gives the oracle's greedy tokens, and sampled tokens equal one scan's."""
  hf, model, params = setup
  ids, valid = _t2i_prompts()
  run = lambda settings, segments, seed=0: np.asarray(sampling.generate_image_tokens(
      model, params, ids, valid, rng=jax.random.key(seed), pad_id=PAD, cfg_weight=CFG,
      settings=settings, unroll_layers=unroll_layers, segments=segments))
  np.testing.assert_array_equal(run(sampling.GREEDY, 4),
                                _hf_image_tokens(hf, ids, valid, do_sample=False))
  np.testing.assert_array_equal(run(sampling.Sampler(), 4, seed=5), run(sampling.Sampler(), 1, seed=5))


def test_default_segments_follow_cache_against_weights(setup):
  _, model, params = setup
  c = model.config.llm
  weights = [params["llm"]["decoder"], params["image_head"], params["generation_aligner"]]
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(weights))
  row_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * 32  # float32, 32 slots
  fits = weight_bytes // row_bytes
  assert sampling.default_segments(model, params, fits, 32) == 1
  assert sampling.default_segments(model, params, fits + 1, 32) == 4


def test_segment_bounds():
  assert sampling._segment_bounds(15, 4) == [(0, 4), (4, 8), (8, 11), (11, 15)]
  assert sampling._segment_bounds(2, 4) == [(0, 1), (1, 2)]


def test_unrolled_whole_kernels_off_cpu_match_transformers(setup):
  """Off XLA:CPU the unrolled sampler keeps each kernel whole (one gemm per weight): the backend
  is reported as a GPU while the weights are prepared, and the tokens still equal the oracle's."""
  hf, model, params = setup
  ids, valid = _t2i_prompts()
  kernel = params["llm"]["decoder"]["layers"]["mlp"]["up_proj"]["kernel"][0]
  with mock.patch.object(decode, "BLOCK_COLUMNS", 7):
    assert len(decode.split_columns(kernel, 1, jnp.float32)) > 1
    jax.clear_caches()
    with mock.patch.object(jax, "default_backend", return_value="gpu"):
      assert len(decode.split_columns(kernel, 1, jnp.float32)) == 1
      ours = np.asarray(sampling.generate_image_tokens(
          model, params, ids, valid, rng=jax.random.key(0), pad_id=PAD, cfg_weight=CFG,
          settings=sampling.GREEDY, unroll_layers=True))
  jax.clear_caches()
  np.testing.assert_array_equal(ours, _hf_image_tokens(hf, ids, valid, do_sample=False))


@pytest.mark.parametrize("path", ["layer_scan", "blocked_per_head", "blocked_per_layer"])
def test_cached_decode_equals_full_forward(setup, path):
  """Teacher-forced cached steps give the logits of one uncached forward; CFG argmax = tokens.

  blocked_*: models/decode.py's step over column blocks (7 columns wide: uneven multi-block
  splits of every kernel of the oracle's shapes) with the cache per layer and KV head or per
  layer (decode.split_cache's two layouts).
  """
  _, model, params = setup
  ids, valid = _t2i_prompts()
  tokens = _greedy_image_tokens()
  rows, row_valid = sampling.cfg_rows(ids, valid, PAD)
  t, n = rows.shape[1], tokens.shape[1]
  fed = np.repeat(tokens[:, :-1], 2, axis=0)  # the last token is never fed back

  def full(m):
    x = jnp.concatenate([m.embed_text(rows), m.embed_image_tokens(fed)], axis=1)
    seq_valid = jnp.concatenate([row_valid, np.ones(fed.shape, bool)], axis=1)
    hidden, _ = m(x, llm.positions_from_mask(seq_valid), llm.causal_mask(seq_valid))
    return m.image_logits(hidden[:, t - 1:])

  def prefill(m):
    c = model.config.llm
    cache = llm.KVCache.zeros(c.num_layers, rows.shape[0], t + n, c.num_kv_heads, c.head_dim)
    hidden, cache = token_loop.prefill(m, m.embed_text(rows), row_valid, cache)
    return m.image_logits(hidden), cache

  slot_valid = token_loop.slot_valid(jnp.asarray(row_valid), t + n)

  def step(m, ids, positions, cache):
    hidden, cache = token_loop.decode_step(m, m.embed_image_tokens(ids), slot_valid, positions, cache)
    return m.image_logits(hidden), cache

  def blocked_step(m, ids, positions, cache):
    trunk = decode.prepare_trunk(params["llm"]["decoder"], jnp.float32, width=7)
    head = decode.prepare_image_head(params["image_head"], jnp.float32, width=7)
    assert all(len(b) > 1 for b in trunk["layers"][0].values() if isinstance(b, tuple))
    mask = llm.cache_mask(slot_valid, cache.index, 1)[:, 0]
    hidden, cache = decode.trunk_step(model.config.llm, trunk, m.embed_image_tokens(ids)[:, 0],
                                      positions, mask, cache)
    return decode.image_logits(head, hidden), cache

  apply = lambda fn: jax.jit(functools.partial(model.apply, {"params": params}, method=fn))
  want = np.asarray(apply(full)())
  logits, cache = apply(prefill)()
  if path != "layer_scan":
    cache = cache.per_head() if path == "blocked_per_head" else cache.per_layer()
    assert isinstance(cache.k[0], tuple) == (path == "blocked_per_head")
  steps, step_fn = [logits], apply(step if path == "layer_scan" else blocked_step)
  for i in range(n - 1):
    logits, cache = step_fn(fed[:, i:i + 1], row_valid.sum(1) + i, cache)
    steps.append(logits)
  got = np.stack(steps, axis=1)
  # One-token steps and the full forward run different XLA:CPU dot kernels: float32 reassociation
  # reaches 1.2e-5 on some hosts (Sapphire Rapids); a wrong cache slot or mask is off by ~0.1.
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
  mixed = np.asarray(sampling.cfg_logits(want[0::2], want[1::2], CFG))
  np.testing.assert_array_equal(mixed.argmax(-1), tokens)
  top2 = np.sort(mixed, axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-3, "near-tie in the oracle; pick another seed"
  # One slot is left: a step fills it. One more would clamp its write back onto an earlier slot
  # (dynamic_update_slice) and look plausible: NaN under jit, an error outside it.
  ids1, positions = fed[:, :1], row_valid.sum(1) + n - 1
  logits, cache = step_fn(ids1, positions, cache)
  assert np.isfinite(np.asarray(logits)).all() and int(cache.index) == cache.slots == t + n
  assert np.isnan(np.asarray(step_fn(ids1, positions + 1, cache)[0])).all()
  eager = functools.partial(model.apply, {"params": params},
                            method=step if path == "layer_scan" else blocked_step)
  with pytest.raises(ValueError, match=rf"KV cache overflow: 1 new token\(s\) at index {t + n} "
                                       rf"need {t + n + 1} slots; the cache has {t + n}"):
    eager(ids1, positions + 1, cache)


def test_cfg_logits_formula():
  rng = np.random.default_rng(1)
  cond, uncond = rng.normal(size=(2, 3, 7)).astype(np.float32)
  got = sampling.cfg_logits(jnp.asarray(cond, jnp.bfloat16), jnp.asarray(uncond, jnp.bfloat16), 5.0)
  c32 = np.asarray(jnp.asarray(cond, jnp.bfloat16), np.float32)
  u32 = np.asarray(jnp.asarray(uncond, jnp.bfloat16), np.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, u32 + 5.0 * (c32 - u32), rtol=1e-6)


def test_first_argmax_and_draws_equal_jax():
  rng = np.random.default_rng(3)
  x = rng.integers(-3, 3, size=(64, 40)).astype(np.float32)  # many ties
  x[5, [7, 20]] = np.nan
  x[6, :] = -np.inf
  np.testing.assert_array_equal(sampling.first_argmax(jnp.asarray(x)), jnp.argmax(jnp.asarray(x), -1))
  logits = jnp.asarray(rng.normal(size=(32, 300)).astype(np.float32) * 4)
  for seed in range(3):
    np.testing.assert_array_equal(
        sampling.sample_logits(jax.random.key(seed), logits, sampling.Sampler(temperature=1.0)),
        jax.random.categorical(jax.random.key(seed), logits, axis=-1))


def test_sample_logits_settings():
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3
  greedy = np.asarray(logits.argmax(-1))
  key = jax.random.key(1)
  draw = lambda s, k=key: np.asarray(sampling.sample_logits(k, logits, s))
  np.testing.assert_array_equal(draw(sampling.GREEDY), greedy)
  np.testing.assert_array_equal(draw(sampling.Sampler(top_k=1)), greedy)
  np.testing.assert_array_equal(draw(sampling.Sampler(top_p=1e-6)), greedy)
  # logits / 1e-38 overflowed to inf, and the draw took the first positive logit (0 of 64 rows
  # greedy); shifted by the row max first, a tiny temperature is greedy.
  np.testing.assert_array_equal(draw(sampling.Sampler(temperature=1e-38)), greedy)
  base = sampling.Sampler(temperature=1.5)
  np.testing.assert_array_equal(draw(base), draw(base))
  assert (draw(base) != draw(base, jax.random.key(2))).any()
  assert (draw(base) != greedy).any()
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  assert all(t in row for t, row in zip(draw(sampling.Sampler(top_k=5)), top5))
  # top_p: every draw lies in the smallest prefix (by probability) whose mass reaches p.
  probs = np.asarray(jax.nn.softmax(logits))
  order = np.argsort(-probs, axis=-1)
  mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
  for seed in range(4):
    for t, o, m in zip(draw(sampling.Sampler(top_p=0.6), jax.random.key(seed)), order, mass_before):
      assert t in o[m < 0.6]
  with pytest.raises(ValueError, match="top_p"):
    sampling.Sampler(top_p=0.0)


def _sampled_image_tokens(seed: int, mesh=None, segments=1):
  _, model, params = _setup()
  ids, valid = _t2i_prompts()
  return np.asarray(sampling.generate_image_tokens(
      model, params, ids, valid, rng=jax.random.key(seed), pad_id=PAD, cfg_weight=CFG,
      settings=sampling.Sampler(temperature=1.0), images_per_prompt=2, mesh=mesh,
      segments=segments))


@functools.lru_cache(maxsize=None)
def _sampled_unsharded(seed: int):
  return _sampled_image_tokens(seed)


def test_seeded_image_sampling_is_reproducible(setup):
  a = _sampled_unsharded(0)
  assert a.shape == (4, 16)
  np.testing.assert_array_equal(a, _sampled_image_tokens(0))
  assert (a != _sampled_unsharded(1)).any()
  assert (a[0] != a[1]).any()  # two images of one prompt differ


@pytest.mark.parametrize("per_call", [None, 2], ids=["one_call", "chunked"])
def test_decode_images_reference_postprocessing(setup, per_call):
  """chunked: 3 images decoded 2 per call (a lax.map over whole chunks, then the rest)."""
  hf, model, params = setup
  tokens = _greedy_image_tokens()
  if per_call:
    tokens = np.concatenate([tokens, tokens[::-1] ^ 1])[:3]
    pixels = tokens.shape[1] * 4 ** (len(model.config.vq.channel_multipliers) - 1)
    jax.clear_caches()
    with mock.patch.object(sampling, "VQ_PIXELS_PER_CALL", per_call * pixels):
      assert sampling.images_per_call(model, 3, tokens.shape[1]) == per_call
      ours = np.asarray(sampling.decode_images(model, params, tokens))
    jax.clear_caches()
  else:
    ours = np.asarray(sampling.decode_images(model, params, tokens))
  with torch.no_grad():
    hf.model.vqmodel.quantize.quant_state_dims = [4, 4]
    ref = hf.decode_image_tokens(torch.from_numpy(tokens.astype(np.int64))).numpy()
  ref = np.clip((ref + 1) / 2 * 255, 0, 255).astype(np.uint8)  # truncation, as the reference
  side = 4 * 2 ** (len(model.config.vq.channel_multipliers) - 1)
  assert ours.dtype == np.uint8 and ours.shape == ref.shape == (len(tokens), side, side, 3)
  diff = np.abs(ours.astype(int) - ref)
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def _chat_prompts():
  """Two understanding prompts with one image each (16 placeholders); row 0 left-padded by 3."""
  rng = np.random.default_rng(2)
  ids = rng.integers(10, 256, (2, 24))
  ids[:, 4:20] = IMAGE_TOKEN
  valid = np.ones(ids.shape, bool)
  ids[0, :3], valid[0, :3] = 0, False
  pixels = rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
  return ids, valid, pixels


def _hf_text(hf, ids, valid, pixels, eos, max_new):
  hf.generation_config.eos_token_id = eos
  with torch.no_grad():
    out = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(valid.astype(np.int64)),
                      pixel_values=torch.from_numpy(pixels[:, 0].transpose(0, 3, 1, 2).copy()),
                      max_new_tokens=max_new, do_sample=False, pad_token_id=0)
  return out.numpy()[:, ids.shape[1]:]


@pytest.mark.parametrize("unroll_layers", [True, False], ids=["blocked", "layer_scan"])
def test_greedy_text_matches_transformers(setup, unroll_layers):
  hf, model, params = setup
  ids, valid, pixels = _chat_prompts()
  gen = lambda i, v, p, eos: sampling.generate_text(
      model, params, i, v, rng=jax.random.key(0), max_new_tokens=8, eos_id=eos,
      image_mask_BxT=i == IMAGE_TOKEN, pixels=p, unroll_layers=unroll_layers)
  free_run = _hf_text(hf, ids, valid, pixels, eos=BOS, max_new=8)
  assert (free_run != BOS).all()
  eos = int(free_run[0, 3])  # row 0 stops after 4 tokens; row 1 (almost surely) runs on
  ref = _hf_text(hf, ids, valid, pixels, eos=eos, max_new=8)
  with _narrow_blocks():
    tokens, lengths = map(np.asarray, gen(ids, valid, pixels, eos))
  assert lengths[0] == 4 and tokens.shape == (2, 8)
  for row in range(2):
    n = lengths[row]
    np.testing.assert_array_equal(tokens[row, :n], ref[row, :n])
    assert (tokens[row, n:] == eos).all()
  # Each prompt alone (row 0 without its padding) gives its tokens from the batch.
  for row, start in ((0, 3), (1, 0)):
    alone, alone_len = map(np.asarray, gen(ids[row:row + 1, start:], valid[row:row + 1, start:],
                                           pixels[row:row + 1], eos))
    np.testing.assert_array_equal(alone[0], tokens[row])
    assert alone_len[0] == lengths[row]


def test_prompt_longer_than_context(setup):
  _, model, params = setup
  ids = np.full((1, 500), 7)
  ids[0, 0], ids[0, -1] = BOS, BOI
  with pytest.raises(ValueError, match=r"500 tokens \+ 16 new tokens = 516 exceeds "
                                       r"max_position_embeddings=512"):
    sampling.generate_image_tokens(model, params, ids, np.ones_like(ids, bool),
                                   rng=jax.random.key(0), pad_id=PAD)
  with pytest.raises(ValueError, match="max_position_embeddings=512"):
    sampling.generate_text(model, params, ids[:, :400], np.ones((1, 400), bool),
                           rng=jax.random.key(0), max_new_tokens=200, eos_id=BOS)


def test_right_padded_prompts_are_refused(setup):
  """Prefill reads the last column's logits: a row ending in padding would decode from a pad."""
  _, model, params = setup
  ids = np.array([[BOS, 5, 6, BOI], [BOS, 5, BOI, PAD]])
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
  with pytest.raises(ValueError, match=r"left-padded: attention_mask\[:, -1\] .*rows \[1\]"):
    sampling.generate_text(model, params, ids, valid, rng=jax.random.key(0), max_new_tokens=2,
                           eos_id=BOS)
  with pytest.raises(ValueError, match="left-padded"):
    sampling.generate_image_tokens(model, params, ids, valid, rng=jax.random.key(0), pad_id=PAD)
  with pytest.raises(ValueError, match="temperature"):
    sampling.Sampler(temperature=float("nan"))


def test_inconsistent_inputs_are_refused(setup):
  _, model, params = setup
  ids, valid = _t2i_prompts()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"pad_id = 100000 is outside the vocabulary \[0, 256\)"):
    sampling.generate_image_tokens(model, params, ids, valid, rng=key, pad_id=100000)
  with pytest.raises(ValueError, match="images_per_prompt = 0 must be at least 1"):
    sampling.generate_image_tokens(model, params, ids, valid, rng=key, pad_id=PAD,
                                   images_per_prompt=0)
  with pytest.raises(ValueError, match="num_image_tokens = 0 must be at least 1"):  # (was: default)
    sampling.generate_image_tokens(model, params, ids, valid, rng=key, pad_id=PAD,
                                   num_image_tokens=0)
  codebook = model.config.vq.codebook_size
  with pytest.raises(ValueError, match=rf"ids must lie in \[0, {codebook}\).*got 0 \.\. {codebook}"):
    sampling.decode_images(model, params, np.array([[0] * 15 + [codebook]]))
  ids, valid, pixels = _chat_prompts()
  text = functools.partial(sampling.generate_text, model, params, ids, valid, rng=key,
                           max_new_tokens=2, eos_id=BOS)
  with pytest.raises(ValueError, match="together .got only pixels"):
    text(pixels=pixels)
  with pytest.raises(ValueError, match="together .got only image_mask_BxT"):
    text(image_mask_BxT=ids == IMAGE_TOKEN)
  with pytest.raises(ValueError, match="row 0: image_mask marks 16 .* 2 image.s. fill 32"):
    text(image_mask_BxT=ids == IMAGE_TOKEN, pixels=np.concatenate([pixels, pixels], axis=1))
  with pytest.raises(ValueError, match=r"pixels has shape \(2, 1, 16, 16, 3\)"):
    text(image_mask_BxT=ids == IMAGE_TOKEN, pixels=pixels[:, :, :16, :16])
  # A mask one column off its ids would be left-padded on its own and miss the placeholders.
  t = ids.shape[1]
  for bad in ((ids == IMAGE_TOKEN)[:, :-1], np.pad(ids == IMAGE_TOKEN, [(0, 0), (0, 1)])):
    with pytest.raises(ValueError, match=rf"image_mask_BxT has shape \(2, {bad.shape[1]}\), but "
                                         rf"the input ids have \(2, {t}\)"):
      text(image_mask_BxT=bad, pixels=pixels)
  with pytest.raises(ValueError, match=rf"attention_mask has shape \(2, {t - 1}\)"):
    sampling.generate_text(model, params, ids, valid[:, 1:], rng=key, max_new_tokens=2, eos_id=BOS)
  t2i_ids, t2i_valid = _t2i_prompts()
  with pytest.raises(ValueError, match=r"prompt_valid has shape \(2, 1\)"):
    sampling.generate_image_tokens(model, params, t2i_ids, t2i_valid[:, -1:], rng=key, pad_id=PAD)


def test_sharded_sampling_equals_single_device(setup):
  """2 x 2 data-parallel shards, 2-way tensor parallel: the same tokens as one device."""
  _, model, params = setup
  ids, valid = _t2i_prompts()
  mesh = sharding.make_mesh((2, 2, 2))
  greedy = sampling.generate_image_tokens(model, params, ids, valid, rng=jax.random.key(0),
                                          pad_id=PAD, cfg_weight=CFG, settings=sampling.GREEDY,
                                          images_per_prompt=2, mesh=mesh)
  assert len(greedy.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(greedy), np.repeat(_greedy_image_tokens(), 2, axis=0))
  np.testing.assert_array_equal(_sampled_image_tokens(0, mesh), _sampled_unsharded(0))
  np.testing.assert_array_equal(_sampled_image_tokens(0, mesh, segments=3), _sampled_unsharded(0))
  with pytest.raises(ValueError, match="divisible by the data-parallel size 8"):
    sampling.generate_image_tokens(model, params, ids, valid, rng=jax.random.key(0), pad_id=PAD,
                                   images_per_prompt=2, mesh=sharding.make_mesh((4, 2, 1)))


def test_sharded_text_equals_single_device(setup):
  _, model, params = setup
  ids, valid, pixels = _chat_prompts()
  ids, valid, pixels = (np.concatenate([x, x[::-1]]) for x in (ids, valid, pixels))
  run = lambda mesh: sampling.generate_text(
      model, params, ids, valid, rng=jax.random.key(0), max_new_tokens=6, eos_id=BOS,
      settings=sampling.Sampler(temperature=0.8, top_k=20), image_mask_BxT=ids == IMAGE_TOKEN,
      pixels=pixels, mesh=mesh)
  want = run(None)
  got = run(sharding.make_mesh((2, 2, 2)))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_top_k_on_a_mesh_stays_on_each_rows_device():
  """lax.top_k does not partition over rows: on a mesh every step gathered all rows' logits onto
  every device. Now each shard takes its own rows' k-th logit: no collective, same draws."""
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = sharding.make_mesh((4, 2, 1))
  logits = jax.random.normal(jax.random.key(3), (8, 512)) * 4
  rows = jax.device_put(logits, NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))
  settings = sampling.Sampler(temperature=0.9, top_k=30, top_p=0.9)
  draw = jax.jit(lambda key, x: sampling.sample_logits(key, x, settings, mesh))
  hlo = draw.lower(jax.random.key(0), rows).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  for seed in range(4):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(np.asarray(draw(key, rows)),
                                  np.asarray(sampling.sample_logits(key, logits, settings)))
