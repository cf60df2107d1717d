"""The original deepseek-ai checkpoint format, seen through `transformers` key names.

deepseek-ai/Janus-1.3B, Janus-Pro-1B and Janus-Pro-7B store `MultiModalityCausalLM` keys (fused ViT
qkv, `pos_embed` with a leading axis, the never-run attention pool, `quantize.codebook_used`) and a
config.json whose vision tower and VQ sizes are hard-coded by name in the original code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from janus_jax.models import presets

# Tensors in checkpoints that the model never uses.
IGNORED_KEYS = re.compile(r"(^|\.)(attn_pool\.|codebook_used$|rotary_emb\.inv_freq$)")


def original_to_hf_key(key: str) -> list[tuple[str, Any]]:
  """An original-format key -> [(HF key, transform)], [] for tensors never used.

  transform is None (unchanged), ("third", i) for the fused ViT qkv, or "squeeze0".
  """
  if IGNORED_KEYS.search(key):
    return []
  if key.startswith("language_model.model."):
    return [("model.language_model." + key[len("language_model.model."):], None)]
  if key == "language_model.lm_head.weight":
    return [("lm_head.weight", None)]
  vt = "vision_model.vision_tower."
  if key.startswith(vt):
    rest = key[len(vt):]
    hv = "model.vision_model."
    if rest == "pos_embed":
      return [(hv + "embeddings.position_embedding.weight", "squeeze0")]
    if rest.startswith("patch_embed.proj."):
      return [(hv + "embeddings.patch_embedding." + rest.split(".")[-1], None)]
    if rest.startswith("norm."):
      return [(hv + "post_layernorm." + rest.split(".")[-1], None)]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if m:
      layer, module, leaf = m.groups()
      base = f"{hv}encoder.layers.{layer}."
      if module == "attn.qkv":
        return [(f"{base}self_attn.{p}_proj.{leaf}", ("third", i)) for i, p in enumerate("qkv")]
      names = {"attn.proj": "self_attn.projection_layer", "norm1": "layer_norm1",
               "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
      if module in names:
        return [(f"{base}{names[module]}.{leaf}", None)]
  for orig, hf in (("aligner.", "model.aligner."), ("gen_aligner.", "model.generation_aligner.")):
    m = re.fullmatch(re.escape(orig) + r"layers\.(\d+)\.(weight|bias)", key)
    if m:
      if int(m[1]) % 2:  # Sequential(Linear, GELU, Linear, ...): odd indices hold no weights
        return [(key, None)]
      index = int(m[1]) // 2
      return [(hf + ("fc1" if index == 0 else f"hidden_layers.{index - 1}") + "." + m[2], None)]
  if key.startswith("gen_head."):
    return [(key.replace("gen_head.output_mlp_projector.", "model.generation_head.proj_out.")
             .replace("gen_head.vision_head.", "model.generation_head.vision_head."), None)]
  if key == "gen_embed.weight":
    return [("model.generation_embeddings.weight", None)]
  if key.startswith("gen_vision_model."):
    rest = key[len("gen_vision_model."):]
    rest = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", rest)
    rest = re.sub(r"^decoder\.conv_blocks\.", "decoder.up.", rest)
    rest = rest.replace(".res.", ".block.")
    rest = re.sub(r"\.mid\.0\.", ".mid.block_1.", rest)
    rest = re.sub(r"\.mid\.1\.", ".mid.attn_1.", rest)
    rest = re.sub(r"\.mid\.2\.", ".mid.block_2.", rest)
    return [("model.vqmodel." + rest, None)]
  return [(key, None)]  # unknown: reported as unexpected by the mapping


def hf_to_original_key(hf: str) -> str:
  """The original-format key an HF key is read from (the inverse of original_to_hf_key), for
  naming a tensor the checkpoint lacks; the three q / k / v projections share the fused qkv."""
  rules = [
      (r"model\.language_model\.(.+)", r"language_model.model.\1"),
      (r"lm_head\.weight", "language_model.lm_head.weight"),
      (r"model\.vision_model\.embeddings\.position_embedding\.weight", "pos_embed"),
      (r"model\.vision_model\.embeddings\.patch_embedding\.(\w+)", r"patch_embed.proj.\1"),
      (r"model\.vision_model\.post_layernorm\.(\w+)", r"norm.\1"),
      (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(\w+)",
       r"blocks.\1.attn.qkv.\2"),
      (r"model\.generation_embeddings\.weight", "gen_embed.weight"),
      (r"model\.generation_head\.proj_out\.(.+)", r"gen_head.output_mlp_projector.\1"),
      (r"model\.generation_head\.vision_head\.(.+)", r"gen_head.vision_head.\1"),
  ]
  for pattern, repl in rules:
    if re.fullmatch(pattern, hf):
      out = re.sub(pattern, repl, hf)
      return out if out.startswith(("language_model.", "gen_")) else "vision_model.vision_tower." + out
  vision_names = {"self_attn.projection_layer": "attn.proj", "layer_norm1": "norm1",
                  "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
  m = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
  if m and m[2] in vision_names:
    return f"vision_model.vision_tower.blocks.{m[1]}.{vision_names[m[2]]}.{m[3]}"
  m = re.fullmatch(r"model\.(aligner|generation_aligner)\.(fc1|hidden_layers\.(\d+))\.(weight|bias)", hf)
  if m:
    index = 0 if m[2] == "fc1" else 2 * (int(m[3]) + 1)  # Linears at the Sequential's even indices
    return f"{'aligner' if m[1] == 'aligner' else 'gen_aligner'}.layers.{index}.{m[4]}"
  if hf.startswith("model.vqmodel."):
    rest = hf[len("model.vqmodel."):]
    rest = re.sub(r"^encoder\.down\.", "encoder.conv_blocks.", rest)
    rest = re.sub(r"^decoder\.up\.", "decoder.conv_blocks.", rest)
    rest = rest.replace(".block.", ".res.")
    for i, name in enumerate(("block_1", "attn_1", "block_2")):
      rest = rest.replace(f".mid.{name}.", f".mid.{i}.")
    return "gen_vision_model." + rest
  return hf


class OriginalAsHF(Mapping):
  """An original-format tensor source seen through `transformers` key names (lazily)."""

  def __init__(self, source: Mapping[str, np.ndarray]):
    self._source = source
    self._map: dict[str, tuple[str, Any]] = {}
    for key in source.keys():
      for hf, transform in original_to_hf_key(key):
        if hf in self._map:  # e.g. lm_head.weight next to language_model.lm_head.weight
          raise ValueError(f"{getattr(source, 'directory', 'checkpoint')}: tensors "
                           f"{self._map[hf][0]!r} and {key!r} both map to {hf!r}")
        self._map[hf] = (key, transform)

  def __getitem__(self, hf: str) -> np.ndarray:
    key, transform = self._map[hf]
    tensor = self._source[key]
    shape = self._shape(key, transform, tuple(tensor.shape))
    if transform == "squeeze0":
      return tensor.reshape(shape)
    if transform is not None:
      third = shape[0]
      return tensor[transform[1] * third:(transform[1] + 1) * third]
    return tensor

  def shape(self, hf: str) -> tuple[int, ...]:
    """The tensor's shape under its HF name, from the source's header (nothing is read)."""
    key, transform = self._map[hf]
    return self._shape(key, transform, tuple(self._source.shape(key)))

  def dtype(self, hf: str) -> np.dtype | None:
    return getattr(self._source, "dtype", lambda key: None)(self._map[hf][0])

  @staticmethod
  def _shape(key: str, transform: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "squeeze0":
      if len(shape) == 3 and shape[0] != 1:
        raise ValueError(f"{key}: expected shape [1, positions, width], got {shape}")
      return shape[1:] if len(shape) == 3 else shape
    if transform is not None:
      if not shape or shape[0] % 3:
        raise ValueError(f"{key}: a fused qkv of shape {shape} does not split in three along "
                         "its first axis")
      return (shape[0] // 3, *shape[1:])
    return shape

  def describe(self, hf: str) -> str:
    """The original key (and file) behind an HF key name, for error messages."""
    if hf not in self._map:  # a tensor the checkpoint lacks: name the key it would have
      return f"{hf_to_original_key(hf)!r} (original format), read as {hf!r}"
    key = self._map[hf][0]
    inner = getattr(self._source, "describe", repr)(key)
    return f"{inner}, read as {hf!r}"

  def __iter__(self):
    return iter(self._map)

  def __len__(self) -> int:
    return len(self._map)

  def __contains__(self, hf) -> bool:
    return hf in self._map


# LlamaConfig defaults: the Pro-7B config.json lists only a few language fields.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)
# The original code picks the SigLIP tower by name.
SIGLIP_PRESETS = {"siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16,
                                                   mlp_ratio=4.0)}
VQ16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256)


def _params(cfg: Mapping[str, Any], block: str) -> dict[str, Any]:
  if block not in cfg:
    raise KeyError(f"config.json: original-format config lacks {block!r}")
  return dict(cfg[block].get("params", {}))


def config_from_original(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our model config from a deepseek-ai `MultiModalityCausalLM` config.json.

  Extension for small models (the original code hard-codes the tower and VQ sizes by name and
  ignores this): `vision_config.params.arch = {width, layers, heads, patch_size, mlp_ratio}` and
  `gen_vision_config.params.arch = {ch, ch_mult, num_res_blocks, z_channels}`.
  """
  lang = {**LLAMA_DEFAULTS, **cfg["language_config"]}
  heads = lang["num_attention_heads"]
  llm = presets.llm(
      lang["hidden_size"], lang["num_hidden_layers"], heads, lang["intermediate_size"],
      num_kv_heads=lang["num_key_value_heads"] or heads, vocab_size=lang["vocab_size"],
      head_dim=lang.get("head_dim") or lang["hidden_size"] // heads,
      rope_theta=float(lang["rope_theta"]), rms_norm_eps=lang["rms_norm_eps"],
      max_position_embeddings=lang["max_position_embeddings"])
  vp = _params(cfg, "vision_config")
  arch = vp.get("arch") or SIGLIP_PRESETS.get(vp.get("model_name", ""))
  if arch is None:
    raise ValueError(f"config.json: unknown vision tower {vp.get('model_name')!r} and no "
                     f"vision_config.params.arch; known: {sorted(SIGLIP_PRESETS)}")
  select_layer = vp.get("select_layer", -1)
  layers = arch["layers"]
  depth = min(layers, layers + select_layer + 1) if select_layer <= 0 else min(layers, select_layer)
  image_size = vp.get("image_size", 384)
  vision = presets.vision(image_size, arch["patch_size"], arch["width"], depth, arch["heads"],
                          int(arch["width"] * arch.get("mlp_ratio", 4.0)))
  gv = _params(cfg, "gen_vision_config")
  vq_arch = {**VQ16, **gv.get("arch", {})}
  vq = presets.vq(gv.get("image_token_size", 16384), gv.get("n_embed", 8), vq_arch["z_channels"],
                  vq_arch["ch"], tuple(vq_arch["ch_mult"]), vq_arch["num_res_blocks"],
                  grid_size=image_size // arch["patch_size"])
  gh = _params(cfg, "gen_head_config")
  if gh.get("n_embed", llm.hidden_size) != llm.hidden_size:
    raise ValueError("config.json: gen_head_config.params.n_embed must equal the LLM hidden size")
  return presets.janus(llm, vision, vq, aligner_depth=_params(cfg, "aligner_config").get("depth", 2),
                       generation_aligner_depth=_params(cfg, "gen_aligner_config").get("depth", 2))
