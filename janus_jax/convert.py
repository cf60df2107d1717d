"""PyTorch <-> JAX parameter mapping for Janus.

The mapping is derived from our own parameter tree: every leaf path names its `transformers`
(`JanusForConditionalGeneration`) key, and its layout change follows from the leaf kind:

  Linear [out, in]        <-> kernel [in..., out...] (transpose, then reshape for DenseGeneral)
  Conv2d [O, I, kh, kw]   <-> kernel [kh, kw, I, O]
  everything else         <-> same values, reshaped (biases, norms, embeddings)

Scanned stacks (LLM and vision layers) carry a leading `layers` axis; their keys hold `{i}`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from janus_jax import original_format
from janus_jax.models import janus as janus_lib
from janus_jax.models import presets

# HF keys that exist in checkpoints but are never used by the model.
IGNORED_HF_KEYS = original_format.IGNORED_KEYS

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
                              source: str = "state dict",
                              place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None) -> Any:
  """Our params (in the model's param dtype) from `transformers`-format tensors.

  `state_dict` may be any mapping that reads tensors on demand (torch_io.TensorSource): tensors
  are converted one at a time into a preallocated leaf, and each finished leaf is handed to
  `place(path, array)` (e.g. `jax.device_put` to its sharding; default: kept as numpy), so peak
  host memory is the params plus about one leaf. Raises KeyError / ValueError naming the
  missing, unexpected or mis-shaped key.
  """
  leaves = _flat_abstract(model)
  if hasattr(state_dict, "shape"):  # headers first: a bad key or shape fails before any read
    _check_tensors(state_dict, leaves, source, lambda k: state_dict.shape(k),
                   getattr(state_dict, "dtype", lambda k: None))
  flat = {}
  dtype = np.dtype(janus_lib._dtype(model.config.param_dtype))
  for path, leaf in leaves.items():
    kind, (keys, shape) = _kind(path), _torch_keys(path, leaf)
    out = np.empty(leaf.shape, dtype)
    for i, k in enumerate(keys):
      tensor = np.asarray(state_dict[k]) if k in state_dict else None
      _check_tensor(state_dict, k, path, shape, source, tensor)
      converted = torch_to_jax(tensor, kind, shape)
      if leaf.shape != shape:  # stacked layers
        out[i] = converted
      else:
        out[...] = converted
    flat[path] = out if place is None else place(path, out)
    del out
  _check_unexpected(state_dict, leaves, source)
  return flax.traverse_util.unflatten_dict(flat)


def _torch_keys(path: tuple[str, ...], leaf: Any) -> tuple[list[str], tuple[int, ...]]:
  """The PyTorch keys of one of our leaves (one per layer when stacked) and each one's shape in
  our layout."""
  key, stacked = hf_key(path)
  if stacked:
    return [key.format(i=i) for i in range(leaf.shape[0])], tuple(leaf.shape[1:])
  return [key], tuple(leaf.shape)


def _check_tensor(state_dict, k: str, path, shape, source: str, tensor=None, tensor_shape=None,
                  tensor_dtype=None) -> None:
  """Raises, naming the key (and its file and original key, if known), unless tensor k exists,
  is floating point and has the PyTorch shape of our `shape`."""
  name = getattr(state_dict, "describe", repr)(k)
  where = f"for parameter {'/'.join(path)}"
  if k not in state_dict:
    raise KeyError(f"{source}: missing tensor {name} ({where})")
  if tensor is not None:
    tensor_shape, tensor_dtype = tuple(tensor.shape), tensor.dtype
  if tensor_dtype is not None and not jnp.issubdtype(tensor_dtype, jnp.floating):
    raise ValueError(f"{source}: tensor {name} has dtype {np.dtype(tensor_dtype)}, expected a "
                     f"float type ({where})")  # an int or bool weight would be cast silently
  expected = _torch_shape(shape, _kind(path), path)
  if tensor_shape is not None and tuple(tensor_shape) != expected:
    raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor_shape)}, expected {expected}")


def _check_tensors(state_dict, leaves, source: str, shape_of, dtype_of) -> None:
  """Every key, shape and stored dtype, from the files' headers alone (no tensor is read)."""
  for path, leaf in leaves.items():
    keys, shape = _torch_keys(path, leaf)
    for k in keys:
      present = k in state_dict
      _check_tensor(state_dict, k, path, shape, source,
                    tensor_shape=shape_of(k) if present else None,
                    tensor_dtype=dtype_of(k) if present else None)
  _check_unexpected(state_dict, leaves, source)


def _check_unexpected(state_dict, leaves, source: str) -> None:
  used = {k for path, leaf in leaves.items() for k in _torch_keys(path, leaf)[0]}
  unexpected = sorted(k for k in state_dict.keys() if k not in used and not IGNORED_HF_KEYS.search(k))
  if unexpected:
    raise KeyError(f"{source}: unexpected tensors {unexpected[:5]}"
                   f"{' and %d more' % (len(unexpected) - 5) if len(unexpected) > 5 else ''}")


def hf_state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
  """The inverse: a `transformers`-format state dict (numpy, our param dtype)."""
  return {k: tensor() for k, tensor in hf_tensors(params).items()}


def hf_tensors(params: Any, dtype: str | None = None) -> dict[str, Callable[..., Any]]:
  """The `transformers`-format tensors as callables, each fetching and converting one tensor
  when called (`meta=True`: its (shape, dtype) only), for torch_io.write_safetensors: an export
  then holds the params plus one tensor, not a second copy of the model. dtype: cast to it."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(nn.unbox(params)).items():
    key, stacked = hf_key(path)
    kind, target = _kind(path), np.dtype(janus_lib._dtype(dtype) if dtype else value.dtype)
    shape = tuple(value.shape[1:] if stacked else value.shape)

    def tensor(meta: bool = False, value=value, index=None, kind=kind, path=path, shape=shape,
               target=target):
      if meta:
        return _torch_shape(shape, kind, path), target
      part = value if index is None else value[index]
      return jax_to_torch(np.asarray(jax.device_get(part)).astype(target), kind, path)
    if stacked:
      for i in range(value.shape[0]):
        out[key.format(i=i)] = functools.partial(tensor, index=i)
    else:
      out[key] = tensor
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
  vision.layer_norm_eps = float(vis.get("layer_norm_eps", 1e-6))
  vq = presets.vq(vqc.get("num_embeddings", 16384), vqc.get("embed_dim", 8),
                  vqc.get("latent_channels", 256), vqc.get("base_channels", 128),
                  tuple(vqc.get("channel_multiplier", (1, 1, 2, 2, 4))), vqc.get("num_res_blocks", 2),
                  grid_size=image_size // patch)
  return presets.janus(llm, vision, vq, aligner_depth=vis.get("depth", 2),
                       generation_aligner_depth=vqc.get("num_hidden_layers", 2))


def detect_schema(cfg: Mapping[str, Any], source: str = "config.json") -> str:
  if "language_config" in cfg:
    return "original"
  if "text_config" in cfg:
    return "hf"
  raise ValueError(f"{source}: unknown config schema: expected the original Janus schema "
                   f"(language_config, vision_config, ...) or the transformers one (text_config, "
                   f"vision_config, vq_config); found keys {sorted(cfg)[:8]}")


def _check_rope(text: Mapping[str, Any], source: str) -> None:
  """Only plain RoPE is implemented (all released Janus models use it): refuse scaled variants."""
  scaling = text.get("rope_scaling") or {}
  kind = (text.get("rope_parameters") or {}).get("rope_type") or scaling.get("rope_type") or (
      scaling.get("type") if scaling else None)
  if kind not in (None, "default"):
    raise ValueError(f"{source}: RoPE type {kind!r} is not supported (only the default RoPE)")


# The activations our modules implement, per config block: the LLM's MLP, and the exact GELU of
# the vision tower + understanding aligner (vision block) and the generation aligner + image head
# (VQ block). Released checkpoints use these; another value would convert to a different model.
_ACTIVATIONS = {"hf": {"text_config": "silu", "vision_config": "gelu", "vq_config": "gelu"},
                "original": {"language_config": "silu"}}


def _check_activations(cfg: Mapping[str, Any], schema: str, source: str) -> None:
  for block, supported in _ACTIVATIONS[schema].items():
    act = (cfg.get(block) or {}).get("hidden_act")
    if act not in (None, supported):
      raise ValueError(f"{source}: {block}.hidden_act {act!r} is not supported (only "
                       f"{supported!r}, as every released Janus checkpoint uses)")


def model_config_from_json(cfg: Mapping[str, Any], source: str = "config.json"):
  """Our model config from a checkpoint's config.json (either schema); ValueError naming the
  file for a config this cannot read."""
  schema = detect_schema(cfg, source)
  try:
    text = cfg["language_config"] if schema == "original" else cfg["text_config"]
    if not isinstance(text, Mapping):
      raise TypeError(f"{'language_config' if schema == 'original' else 'text_config'} is "
                      f"{type(text).__name__}, not an object")
    _check_rope(text, source)
    _check_activations(cfg, schema, source)
    return (original_format.config_from_original(cfg) if schema == "original"
            else config_from_hf(cfg))
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{source}: cannot read the {schema} config: {type(e).__name__}: {e}") from e


def hf_config_dict(config: ml_collections.ConfigDict, image_token_id: int | None = None,
                   token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """A `transformers` JanusConfig dict for our model config (for export)."""
  c = config
  vis, vq = c.vision, c.vq
  text = dict(model_type="llama", vocab_size=c.llm.vocab_size, hidden_size=c.llm.hidden_size,
              intermediate_size=c.llm.mlp_dim, num_hidden_layers=c.llm.num_layers,
              num_attention_heads=c.llm.num_heads, num_key_value_heads=c.llm.num_kv_heads,
              head_dim=c.llm.head_dim, max_position_embeddings=c.llm.max_position_embeddings,
              rms_norm_eps=c.llm.rms_norm_eps, rope_theta=c.llm.rope_theta, hidden_act="silu",
              attention_bias=False, tie_word_embeddings=False, **dict(token_ids or {}))
  vision = dict(model_type="janus_vision_model", hidden_size=vis.width, num_hidden_layers=vis.depth,
                num_attention_heads=vis.num_heads, image_size=vis.image_size,
                patch_size=vis.patch_size, mlp_ratio=vis.mlp_dim / vis.width,
                layer_norm_eps=vis.layer_norm_eps, projection_dim=c.llm.hidden_size,
                depth=c.aligner_depth, num_image_tokens=vq.grid_size**2, hidden_act="gelu")
  vqd = dict(model_type="janus_vqgan", embed_dim=vq.codebook_dim, num_embeddings=vq.codebook_size,
             latent_channels=vq.z_channels, base_channels=vq.base_channels,
             channel_multiplier=list(vq.channel_multipliers), num_res_blocks=vq.num_res_blocks,
             projection_dim=c.llm.hidden_size, num_hidden_layers=c.generation_aligner_depth,
             image_token_embed_dim=c.llm.hidden_size, num_patches=vq.grid_size, hidden_act="gelu")
  out = dict(model_type="janus", architectures=["JanusForConditionalGeneration"],
             text_config=text, vision_config=vision, vq_config=vqd, tie_word_embeddings=False)
  if image_token_id is not None:
    out["image_token_id"] = int(image_token_id)
  return out


# ---------------------------------------------------------------------------------------------
# Whole directories and the command line.

class _TiedHead(Mapping):
  """Tensors of a transformers checkpoint saved with tied embeddings (JanusConfig's top-level
  tie_word_embeddings defaults to True, and save_pretrained then leaves lm_head out): the text
  head reads embed_tokens, as transformers computes it."""

  HEAD, EMBED = "lm_head.weight", "model.language_model.embed_tokens.weight"

  def __init__(self, source):
    self._source = source

  def __getitem__(self, key: str) -> np.ndarray:
    return self._source[self.EMBED if key == self.HEAD else key]

  def __iter__(self):
    return iter([*self._source.keys(), self.HEAD])

  def __len__(self) -> int:
    return len(self._source.keys()) + 1

  def __contains__(self, key) -> bool:
    return key == self.HEAD or key in self._source

  def describe(self, key: str) -> str:
    inner = self._source.describe(self.EMBED if key == self.HEAD else key)
    return f"{inner} (tied: read as {self.HEAD!r})" if key == self.HEAD else inner

  def shape(self, key: str) -> tuple[int, ...]:
    return self._source.shape(self.EMBED if key == self.HEAD else key)

  def dtype(self, key: str) -> np.dtype | None:
    return self._source.dtype(self.EMBED if key == self.HEAD else key)


def stored_dtype(tensors) -> str:
  """"bfloat16" if the checkpoint's token embedding is stored in 16 bits, else "float32"."""
  for key in ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"):
    if key in tensors:
      return "bfloat16" if np.dtype(tensors.dtype(key)).itemsize == 2 else "float32"
  return "float32"


def convert_directory(src: str, dtype: str | None = "bfloat16", place=None
                      ) -> tuple[ml_collections.ConfigDict, Any]:
  """(model config, params) from a PyTorch checkpoint directory in either format.

  dtype: the params' dtype; None: as stored (bfloat16 for 16-bit checkpoints, else float32).
  place(path, leaf) puts each finished leaf where it should live (default: a jax array on the
  default device; orbax saves jax arrays without a second host copy, unlike numpy ones).
  """
  from janus_jax import pretrained, torch_io

  config_path = os.path.join(src, "config.json")
  cfg_json = pretrained.read_json(config_path)
  schema = detect_schema(cfg_json, config_path)
  model_config = model_config_from_json(cfg_json, config_path)
  tensors = torch_io.TensorSource(src)
  model_config.dtype = model_config.param_dtype = dtype or stored_dtype(tensors)
  view = original_format.OriginalAsHF(tensors) if schema == "original" else tensors
  if (schema == "hf" and _TiedHead.HEAD not in tensors and _TiedHead.EMBED in tensors
      and cfg_json.get("tie_word_embeddings", True)):
    print(f"{src}: no {_TiedHead.HEAD} and tie_word_embeddings is true: the text head reads "
          "the token embedding", file=sys.stderr)
    view = _TiedHead(tensors)
  place = place or (lambda _, leaf: jax.device_put(leaf))
  params = params_from_hf_state_dict(view, janus_lib.build(model_config), source=src, place=place)
  return model_config, params


def convert_checkpoint(src: str, dst: str, dtype: str = "bfloat16", overwrite: bool = False,
                       family: str | None = None) -> None:
  from janus_jax import pretrained

  pretrained.check_destination(dst, overwrite, keep=(src,))
  model_config, params = convert_directory(src, dtype)
  pretrained.write_converted(dst, params, model_config, family or pretrained.detect_family(src),
                             os.path.abspath(src), overwrite)


def export_to_pytorch(ckpt: str, out: str, overwrite: bool = False, dtype: str | None = None) -> None:
  """A converted (or trained) directory -> `transformers`-format model.safetensors + config.json.

  dtype: the exported tensors' dtype (default: the params'). Tensors are fetched and written one
  at a time."""
  from janus_jax import pretrained, torch_io

  pretrained.check_destination(out, overwrite, keep=(ckpt,))
  loaded = pretrained.load_pretrained(ckpt, with_tokenizer=False)
  image_token_id = boi_id = None
  token_ids = {}
  try:
    from janus_jax import tokenizer as tokenizer_lib
    tok = tokenizer_lib.Tokenizer.from_dir(ckpt)
    image_token_id, boi_id = tok.image_placeholder_id, tok.begin_of_image_id
    token_ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  except (FileNotFoundError, KeyError, ValueError):
    pass
  with pretrained.atomic_directory(out, overwrite, keep=(ckpt,)) as tmp:
    state = hf_tensors(loaded.params, dtype)
    torch_io.write_safetensors(os.path.join(tmp, "model.safetensors"), state)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config_dict(loaded.config, image_token_id, token_ids), f, indent=2)
    pretrained.copy_side_files(ckpt, tmp)
    _write_generation_config(tmp, token_ids, boi_id)


def _write_generation_config(directory: str, token_ids: dict[str, int], boi_id: int | None) -> None:
  """generation_config.json with the token ids `transformers`' generate needs: its image mode
  reads `generation_kwargs["boi_token_id"]` and fails without it. A copied one (from the
  converted source) keeps its other fields; the ids come from the tokenizer, as config.json's
  do. Its `_from_model_config` flag goes: with it set, `transformers` drops `generation_kwargs`
  on load."""
  path = os.path.join(directory, "generation_config.json")
  gen = json.load(open(path)) if os.path.exists(path) else {}
  gen.pop("_from_model_config", None)
  gen.update(token_ids)
  if boi_id is not None:
    gen["generation_kwargs"] = {**gen.get("generation_kwargs", {}), "boi_token_id": boi_id}
  if gen:
    with open(path, "w") as f:
      json.dump(gen, f, indent=2)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m janus_jax.convert",
      description="Convert a Janus / Janus-Pro PyTorch checkpoint directory (original or "
                  "transformers format) to a janus_jax directory, or back with --to-pytorch.")
  parser.add_argument("src", help="PyTorch checkpoint directory (or, with --to-pytorch, a janus_jax one)")
  parser.add_argument("dst", help="output directory (written atomically)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                      help="params dtype (default bfloat16; with --to-pytorch: as stored)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing dst")
  parser.add_argument("--to-pytorch", action="store_true",
                      help="export a janus_jax directory to transformers-format safetensors")
  parser.add_argument("--family", choices=("janus", "janus_pro"), default=None,
                      help="prompt template family (default: detected from the tokenizer files)")
  args = parser.parse_args(argv)
  if args.to_pytorch and args.family:
    parser.error("--family has no effect with --to-pytorch (the template travels with the "
                 "tokenizer files)")
  try:
    if args.to_pytorch:
      export_to_pytorch(args.src, args.dst, args.overwrite, args.dtype)
    else:
      convert_checkpoint(args.src, args.dst, args.dtype or "bfloat16", args.overwrite, args.family)
  except (OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
    # str() of a KeyError is its message in quotes
    print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
