"""PyTorch <-> JAX parameter mapping for Janus.

The mapping is derived from our own parameter tree: every leaf path names its `transformers`
(`JanusForConditionalGeneration`) key, and its layout change follows from the leaf kind:

  Linear [out, in]        <-> kernel [in..., out...] (transpose, then reshape for DenseGeneral)
  Conv2d [O, I, kh, kw]   <-> kernel [kh, kw, I, O]
  everything else         <-> same values, reshaped (biases, norms, embeddings)

Scanned stacks (LLM and vision layers) carry a leading `layers` axis; their keys hold `{i}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from janus_jax.models import janus as janus_lib
from janus_jax.models import presets

# HF keys that exist in checkpoints but are never used by the model.
IGNORED_HF_KEYS = re.compile(r"(^|\.)(attn_pool\.|codebook_used$|rotary_emb\.inv_freq$)")

_VISION_LAYER = {"layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2",
                 "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                 "v_proj": "self_attn.v_proj", "out_proj": "self_attn.projection_layer",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# DenseGeneral kernels whose *input* spans two axes ([heads, head_dim, embed]).
_TWO_INPUT_AXES = {"o_proj", "out_proj"}


def _vq_module(name: str) -> str:
  """down_2_block_1 -> down.2.block.1; up_0_upsample -> up.0.upsample.conv; mid/... unchanged."""
  m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", name)
  if m:
    return f"{m[1]}.{m[2]}.{m[3]}.{m[4]}"
  m = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", name)
  if m:
    return f"{m[1]}.{m[2]}.{m[3]}.conv"
  return name


def hf_key(path: tuple[str, ...]) -> tuple[str, bool]:
  """Our parameter path -> (HF key, stacked over layers: the key then holds `{i}`)."""
  head, rest, leaf = path[0], list(path[1:-1]), _LEAF.get(path[-1], path[-1])
  if head == "llm":
    if rest[:2] == ["decoder", "layers"]:
      return ".".join(["model.language_model.layers.{i}", *rest[2:], leaf]), True
    if rest == ["decoder", "norm"]:
      return f"model.language_model.norm.{leaf}", False
    if rest == ["embed_tokens"]:
      return "model.language_model.embed_tokens.weight", False
    if rest == ["lm_head"]:
      return "lm_head.weight", False
  if head == "understanding_encoder":
    prefix = "model.vision_model"
    if path[1] == "position_embedding":
      return f"{prefix}.embeddings.position_embedding.weight", False
    if rest[0] == "layers":
      return f"{prefix}.encoder.layers.{{i}}.{_VISION_LAYER[rest[1]]}.{leaf}", True
    if rest[0] == "patch_embedding":
      return f"{prefix}.embeddings.patch_embedding.{leaf}", False
    return f"{prefix}.{rest[0]}.{leaf}", False
  if head in ("understanding_aligner", "generation_aligner"):
    prefix = "model.aligner" if head == "understanding_aligner" else "model.generation_aligner"
    layer = rest[0] if rest[0] == "fc1" else "hidden_layers." + rest[0].split("_")[1]
    return f"{prefix}.{layer}.{leaf}", False
  if head == "image_head":
    return f"model.generation_head.{rest[0]}.{leaf}", False
  if head == "generation_embed":
    return "model.generation_embeddings.weight", False
  if head == "generation_tokenizer":
    if path[1] == "codebook":
      return "model.vqmodel.quantize.embedding.weight", False
    return ".".join(["model.vqmodel", *(_vq_module(r) for r in rest), leaf]), False
  raise KeyError(f"no HF key for parameter {'/'.join(path)}")


def _kind(path: tuple[str, ...]) -> str:
  if path[-1] != "kernel":
    return "reshape"
  if path[0] == "generation_tokenizer" or path[-2] == "patch_embedding":
    return "conv"
  return "linear2" if path[-2] in _TWO_INPUT_AXES else "linear"


def _torch_shape(shape: tuple[int, ...], kind: str, path: tuple[str, ...]) -> tuple[int, ...]:
  if kind == "conv":
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if kind in ("linear", "linear2"):
    split = 2 if kind == "linear2" else 1
    return (int(np.prod(shape[split:])), int(np.prod(shape[:split])))
  return (int(np.prod(shape)),) if path[-1] == "bias" else tuple(shape)


def torch_to_jax(tensor: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  """One unstacked tensor in PyTorch layout -> our layout with `shape`."""
  if kind == "conv":
    tensor = tensor.transpose(2, 3, 1, 0)
  elif kind in ("linear", "linear2"):
    tensor = tensor.T
  return np.ascontiguousarray(tensor).reshape(shape)


def jax_to_torch(array: np.ndarray, kind: str, path: tuple[str, ...]) -> np.ndarray:
  """One unstacked array in our layout -> PyTorch layout (inverse of torch_to_jax)."""
  shape = _torch_shape(array.shape, kind, path)
  if kind == "conv":
    array = array.transpose(3, 2, 0, 1)
  elif kind in ("linear", "linear2"):
    array = array.reshape(shape[1], shape[0]).T
  return np.ascontiguousarray(array).reshape(shape)


def _flat_abstract(model: janus_lib.Janus) -> dict[tuple[str, ...], Any]:
  abstract = nn.unbox(janus_lib.abstract_params(model))
  return flax.traverse_util.flatten_dict(abstract)


def params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], model: janus_lib.Janus,
                              source: str = "state dict") -> Any:
  """Our params from a `transformers` Janus state dict of numpy arrays (any float dtype).

  Raises KeyError / ValueError naming the missing, unexpected or mis-shaped key.
  """
  flat = {}
  used = set()
  dtype = np.dtype(janus_lib._dtype(model.config.param_dtype))
  for path, leaf in _flat_abstract(model).items():
    key, stacked = hf_key(path)
    kind = _kind(path)
    keys = [key.format(i=i) for i in range(leaf.shape[0])] if stacked else [key]
    shape = leaf.shape[1:] if stacked else leaf.shape
    parts = []
    for k in keys:
      if k not in state_dict:
        raise KeyError(f"{source}: missing tensor {k!r} (for parameter {'/'.join(path)})")
      tensor = np.asarray(state_dict[k])
      expected = _torch_shape(shape, kind, path)
      if tuple(tensor.shape) != expected:
        raise ValueError(f"{source}: tensor {k!r} has shape {tuple(tensor.shape)}, expected {expected}")
      parts.append(torch_to_jax(tensor, kind, shape).astype(dtype))
      used.add(k)
    flat[path] = np.stack(parts) if stacked else parts[0]
  unexpected = sorted(k for k in state_dict if k not in used and not IGNORED_HF_KEYS.search(k))
  if unexpected:
    raise KeyError(f"{source}: unexpected tensors {unexpected[:5]}"
                   f"{' and %d more' % (len(unexpected) - 5) if len(unexpected) > 5 else ''}")
  return flax.traverse_util.unflatten_dict(flat)


def hf_state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
  """The inverse: a `transformers`-format state dict (numpy, our param dtype)."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(nn.unbox(params)).items():
    key, stacked = hf_key(path)
    value = np.asarray(jax.device_get(value))
    items = [(key.format(i=i), value[i]) for i in range(value.shape[0])] if stacked else [(key, value)]
    for k, v in items:
      out[k] = jax_to_torch(v, _kind(path), path)
  return out


def config_from_hf(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our model config from a `transformers` JanusConfig dict (config.json of deepseek-community/*).

  Missing text fields default as LlamaConfig defaults them; missing vision / VQ fields as
  JanusVisionConfig / JanusVQVAEConfig do.
  """
  text, vis, vqc = hf.get("text_config", {}), hf.get("vision_config", {}), hf.get("vq_config", {})
  hidden = text.get("hidden_size", 4096)
  heads = text.get("num_attention_heads", 32)
  llm = presets.llm(
      hidden, text.get("num_hidden_layers", 32), heads, text.get("intermediate_size", 11008),
      num_kv_heads=text.get("num_key_value_heads") or heads, vocab_size=text.get("vocab_size", 32000),
      head_dim=text.get("head_dim") or hidden // heads,
      rope_theta=float((text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10000.0))),
      rms_norm_eps=text.get("rms_norm_eps", 1e-6),
      max_position_embeddings=text.get("max_position_embeddings", 2048))
  width = vis.get("hidden_size", 1024)
  image_size, patch = vis.get("image_size", 384), vis.get("patch_size", 16)
  vision = presets.vision(image_size, patch, width, vis.get("num_hidden_layers", 24),
                          vis.get("num_attention_heads", 16), int(width * vis.get("mlp_ratio", 4.0)))
  vq = presets.vq(vqc.get("num_embeddings", 16384), vqc.get("embed_dim", 8),
                  vqc.get("latent_channels", 256), vqc.get("base_channels", 128),
                  tuple(vqc.get("channel_multiplier", (1, 1, 2, 2, 4))), vqc.get("num_res_blocks", 2),
                  grid_size=image_size // patch)
  return presets.janus(llm, vision, vq, aligner_depth=vis.get("depth", 2),
                       generation_aligner_depth=vqc.get("num_hidden_layers", 2))
