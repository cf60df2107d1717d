"""Released configs, with nothing allocated: parameter counts, logical axes, dtypes, remat."""

from __future__ import annotations

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from janus_jax.models import janus as janus_lib
from janus_jax.models import llm
from janus_jax.models import matmul
from janus_jax.models import vq

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def reference_key_shapes(d: int, mlp: int, layers: int, vocab: int = 102400):
  """(key, shape) of every tensor in an original-format checkpoint (reference facts, section 4)."""
  keys = [("language_model.model.embed_tokens.weight", (vocab, d)),
          ("language_model.model.norm.weight", (d,)), ("language_model.lm_head.weight", (vocab, d))]
  for n in range(layers):
    p = f"language_model.model.layers.{n}."
    keys += [(p + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
    keys += [(p + "mlp.gate_proj.weight", (mlp, d)), (p + "mlp.up_proj.weight", (mlp, d)),
             (p + "mlp.down_proj.weight", (d, mlp)), (p + "input_layernorm.weight", (d,)),
             (p + "post_attention_layernorm.weight", (d,))]
  v, w = "vision_model.vision_tower.", 1024
  keys += [(v + "pos_embed", (1, 576, w)), (v + "patch_embed.proj.weight", (w, 3, 16, 16)),
           (v + "patch_embed.proj.bias", (w,)), (v + "norm.weight", (w,)), (v + "norm.bias", (w,))]
  for b in range(24):
    p = f"{v}blocks.{b}."
    keys += [(p + "norm1.weight", (w,)), (p + "norm1.bias", (w,)), (p + "norm2.weight", (w,)),
             (p + "norm2.bias", (w,)), (p + "attn.qkv.weight", (3 * w, w)), (p + "attn.qkv.bias", (3 * w,)),
             (p + "attn.proj.weight", (w, w)), (p + "attn.proj.bias", (w,)),
             (p + "mlp.fc1.weight", (4 * w, w)), (p + "mlp.fc1.bias", (4 * w,)),
             (p + "mlp.fc2.weight", (w, 4 * w)), (p + "mlp.fc2.bias", (w,))]
  a = v + "attn_pool."
  keys += [(a + "latent", (1, 1, w)), (a + "q.weight", (w, w)), (a + "q.bias", (w,)),
           (a + "kv.weight", (2 * w, w)), (a + "kv.bias", (2 * w,)), (a + "proj.weight", (w, w)),
           (a + "proj.bias", (w,)), (a + "norm.weight", (w,)), (a + "norm.bias", (w,)),
           (a + "mlp.fc1.weight", (4 * w, w)), (a + "mlp.fc1.bias", (4 * w,)),
           (a + "mlp.fc2.weight", (w, 4 * w)), (a + "mlp.fc2.bias", (w,))]
  keys += [("aligner.layers.0.weight", (d, w)), ("aligner.layers.0.bias", (d,)),
           ("aligner.layers.2.weight", (d, d)), ("aligner.layers.2.bias", (d,)),
           ("gen_embed.weight", (16384, 8)),
           ("gen_aligner.layers.0.weight", (d, 8)), ("gen_aligner.layers.0.bias", (d,)),
           ("gen_aligner.layers.2.weight", (d, d)), ("gen_aligner.layers.2.bias", (d,)),
           ("gen_head.output_mlp_projector.weight", (d, d)), ("gen_head.output_mlp_projector.bias", (d,)),
           ("gen_head.vision_head.weight", (16384, d)), ("gen_head.vision_head.bias", (16384,))]

  def res(prefix, i, o):
    out = [(prefix + "norm1.weight", (i,)), (prefix + "norm1.bias", (i,)),
           (prefix + "conv1.weight", (o, i, 3, 3)), (prefix + "conv1.bias", (o,)),
           (prefix + "norm2.weight", (o,)), (prefix + "norm2.bias", (o,)),
           (prefix + "conv2.weight", (o, o, 3, 3)), (prefix + "conv2.bias", (o,))]
    if i != o:
      out += [(prefix + "nin_shortcut.weight", (o, i, 1, 1)), (prefix + "nin_shortcut.bias", (o,))]
    return out

  def attn(prefix, c):
    out = [(prefix + "norm.weight", (c,)), (prefix + "norm.bias", (c,))]
    for x in ("q", "k", "v", "proj_out"):
      out += [(prefix + f"{x}.weight", (c, c, 1, 1)), (prefix + f"{x}.bias", (c,))]
    return out

  def conv(prefix, i, o, k=3):
    return [(prefix + "weight", (o, i, k, k)), (prefix + "bias", (o,))]

  g = "gen_vision_model."
  keys += conv(g + "encoder.conv_in.", 3, 128)
  enc = [(128, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
  for lvl, (i, o) in enumerate(enc):
    p = f"{g}encoder.conv_blocks.{lvl}."
    keys += res(p + "res.0.", i, o) + res(p + "res.1.", o, o)
    keys += attn(p + "attn.0.", o) + attn(p + "attn.1.", o) if lvl == 4 else conv(p + "downsample.conv.", o, o)
  for part in ("encoder", "decoder"):
    keys += res(f"{g}{part}.mid.0.", 512, 512) + attn(f"{g}{part}.mid.1.", 512) + res(f"{g}{part}.mid.2.", 512, 512)
  keys += [(g + "encoder.norm_out.weight", (512,)), (g + "encoder.norm_out.bias", (512,))]
  keys += conv(g + "encoder.conv_out.", 512, 256) + conv(g + "quant_conv.", 256, 8, 1)
  keys += [(g + "quantize.embedding.weight", (16384, 8)), (g + "quantize.codebook_used", (65536,))]
  keys += conv(g + "post_quant_conv.", 8, 256, 1) + conv(g + "decoder.conv_in.", 256, 512)
  dec = [(512, 512), (512, 256), (256, 256), (256, 128), (128, 128)]
  for lvl, (i, o) in enumerate(dec):
    p = f"{g}decoder.conv_blocks.{lvl}."
    keys += res(p + "res.0.", i, o) + res(p + "res.1.", o, o) + res(p + "res.2.", o, o)
    if lvl == 0:
      keys += attn(p + "attn.0.", o) + attn(p + "attn.1.", o) + attn(p + "attn.2.", o)
    if lvl != 4:
      keys += conv(p + "upsample.conv.", o, o)
  keys += [(g + "decoder.norm_out.weight", (128,)), (g + "decoder.norm_out.bias", (128,))]
  keys += conv(g + "decoder.conv_out.", 128, 3)
  return keys


@functools.lru_cache(maxsize=None)
def tiny_params(seed: int = 0):
  """Tiny params, drawn on the host once per session."""
  model = janus_lib.build(load_config("tiny").model)
  return jax.tree.map(jnp.asarray, janus_lib.init_params_host(model, seed))


def test_host_init_matches_the_model_shapes_and_dtypes():
  model = janus_lib.build(load_config("tiny").model)
  abstract = nn.unbox(janus_lib.abstract_params(model))
  host = janus_lib.init_params_host(model, 0)
  assert jax.tree.structure(abstract) == jax.tree.structure(host)
  for a, h in zip(jax.tree.leaves(abstract), jax.tree.leaves(host)):
    assert a.shape == h.shape and a.dtype == h.dtype


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,dims", [("janus_1_3b", (2048, 5632, 24)),
                                       ("janus_pro_1b", (2048, 5632, 24)),
                                       ("janus_pro_7b", (4096, 11008, 30))])
def test_released_parameter_counts(name, dims):
  model = janus_lib.build(load_config(name).model)
  ours = _count(nn.unbox(janus_lib.abstract_params(model)))
  keys = reference_key_shapes(*dims)
  unused = ("attn_pool.", "codebook_used")  # in the checkpoint, never run, not built here
  expected = sum(int(np.prod(s)) for k, s in keys if not any(u in k for u in unused))
  assert ours == expected
  total = sum(int(np.prod(s)) for _, s in keys)
  assert (2.05e9 < total < 2.15e9) if "1b" in name or "1_3b" in name else (7.3e9 < total < 7.5e9)


AXIS_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm", "patches",
              "conv_in", "conv_out", "codebook", None}


def test_every_parameter_has_logical_axes():
  model = janus_lib.build(load_config("tiny").model)
  boxed = janus_lib.abstract_params(model)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, leaf.names
  stacked = boxed["llm"]["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
  assert stacked.names == ("layers", "embed", "mlp")


def test_bfloat16_compute_and_params_track_float32():
  cfg = load_config("tiny").model
  f32 = janus_lib.build(cfg)
  params = tiny_params()
  cfg_bf16 = cfg.copy_and_resolve_references()
  cfg_bf16.dtype = cfg_bf16.param_dtype = "bfloat16"
  bf16 = janus_lib.build(cfg_bf16)
  params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(
      nn.unbox(janus_lib.abstract_params(bf16))))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 256, (2, 12)))
  pixels = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

  def run(module):
    x = jnp.concatenate([module.encode_images(pixels), module.embed_text(ids)], axis=1)
    valid = jnp.ones(x.shape[:2], bool)
    hidden, _ = module(x, llm.positions_from_mask(valid), llm.causal_mask(valid))
    return module.text_logits(hidden), module.image_logits(hidden), module.vq_decode(ids[:, :4] % 64)

  ref = jax.jit(lambda p: f32.apply({"params": p}, method=run))(params)
  out = jax.jit(lambda p: bf16.apply({"params": p}, method=run))(params_bf16)
  for r, o in zip(ref, out):
    assert o.dtype == jnp.float32  # heads and pixels come back in float32
    err = float(jnp.abs(o - r).max() / (jnp.abs(r).max() + 1e-6))
    assert err < 0.05, err


def _remat_loss_and_grads(cfg):
  """Jitted value and gradients of a loss through every part (one compile per variant, which
  on 2 cores is faster than running the unjitted model op by op)."""
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, 256, (2, 10)))
  pixels = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  module = janus_lib.build(cfg)

  def f(m):
    x = jnp.concatenate([m.encode_images(pixels), m.embed_text(ids),
                         m.embed_image_tokens(ids % cfg.vq.codebook_size)], axis=1)
    h, _ = m(x, llm.positions_from_mask(jnp.ones(x.shape[:2], bool)),
             llm.causal_mask(jnp.ones(x.shape[:2], bool)))
    return jnp.mean(m.text_logits(h) ** 2) + jnp.mean(m.image_logits(h) ** 2)

  return jax.jit(jax.value_and_grad(lambda p: module.apply({"params": p}, method=f)))(tiny_params())


@functools.lru_cache(maxsize=None)
def _plain_loss_and_grads():
  return jax.device_get(_remat_loss_and_grads(load_config("tiny").model))


@pytest.mark.parametrize("policy,scan_layers,materialize", [
    ("full", True, False), ("dots", True, False), ("none", False, False), ("full", False, False),
    ("none", True, True), ("none", False, True)])
def test_remat_and_unrolled_layers_keep_values_and_gradients(policy, scan_layers, materialize):
  """Remat policies, the Python loop over layers (scan_layers False) and the materialised-
  transpose weight gradients (LLM, ViT, aligners, image head) change how the model runs, never
  what it computes: values and gradients equal the plain scan's."""
  variant = load_config("tiny").model
  variant.remat_policy = policy
  variant.scan_layers = scan_layers
  variant.materialize_grad_transpose = materialize
  plain = _plain_loss_and_grads()
  other = _remat_loss_and_grads(variant)
  np.testing.assert_allclose(other[0], plain[0], rtol=1e-6)
  grads = jax.tree.leaves_with_path(plain[1])
  for part in ("understanding_encoder", "understanding_aligner", "generation_aligner",
               "image_head", "llm"):
    assert any(part in jax.tree_util.keystr(k) and np.abs(g).max() > 0 for k, g in grads), part
  for a, b in zip(jax.tree.leaves(other[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_materialized_transpose_dot_equals_dot_general():
  """Dense (one contracting axis), o_proj's DenseGeneral (two), and dots it must hand to
  `lax.dot_general` (crossed contracting pairs, batch axes): values and both gradients equal
  `lax.dot_general`'s."""
  rng = np.random.default_rng(2)
  cases = [((3, 5, 8), (8, 6), (((2,), (0,)), ((), ()))),
           ((3, 5, 4, 2), (4, 2, 7), (((2, 3), (0, 1)), ((), ()))),
           ((3, 5, 4, 2), (2, 4, 7), (((3, 2), (0, 1)), ((), ()))),  # crossed pairs: falls back
           ((3, 5, 8), (3, 8, 6), (((2,), (1,)), ((0,), (0,))))]
  for x_shape, w_shape, dims in cases:
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=jax.lax.dot_general(x, w, dims).shape), jnp.float32)
    ref_out, ref_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), x, w)
    out, vjp = jax.vjp(lambda a, b: matmul.materialized_transpose_dot(a, b, dims), x, w)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.jit(vjp)(g), ref_vjp(g)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_remat_policy_is_rejected():
  cfg = load_config("tiny").model
  cfg.remat_policy = "sometimes"
  with pytest.raises(ValueError, match="remat_policy"):
    janus_lib.abstract_params(janus_lib.build(cfg))


def test_l2_normalize_matches_torch_and_has_finite_gradients_at_zero():
  """vq.l2_normalize is torch's F.normalize in value and gradient, a zero row included (a NaN
  gradient there would poison Adam's state for every parameter)."""
  import torch

  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  x[1] = 0.0
  want = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
  np.testing.assert_allclose(np.asarray(vq.l2_normalize(jnp.asarray(x))), want.numpy(), atol=1e-7)
  w = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(vq.l2_normalize(v) * w))(jnp.asarray(x))
  xt = torch.from_numpy(x).requires_grad_()
  (torch.nn.functional.normalize(xt, dim=-1) * torch.from_numpy(w)).sum().backward()
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
