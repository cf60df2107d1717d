"""Tiny checkpoint directories in the released layouts, written from the oracle's random weights.

original format (deepseek-ai/Janus*): MultiModalityCausalLM key names, fused ViT qkv, the position
embedding's leading axis, the unused attention-pool tensors and `quantize.codebook_used`; config.json
in the DeepSeek schema plus our `arch` extension (the original code hard-codes those sizes).
hf format (deepseek-community/*): `JanusForConditionalGeneration.save_pretrained`.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

import oracle


def hf_to_original(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
  gen = torch.Generator().manual_seed(seed)
  out: dict[str, torch.Tensor] = {}
  qkv: dict[str, dict[str, torch.Tensor]] = {}
  for key, t in state.items():
    t = t.detach().clone()
    if key.startswith("model.language_model."):
      out["language_model.model." + key[len("model.language_model."):]] = t
    elif key == "lm_head.weight":
      out["language_model.lm_head.weight"] = t
    elif key.startswith("model.vision_model."):
      rest = key[len("model.vision_model."):]
      vt = "vision_model.vision_tower."
      if rest == "embeddings.position_embedding.weight":
        out[vt + "pos_embed"] = t[None]
      elif rest.startswith("embeddings.patch_embedding."):
        out[vt + "patch_embed.proj." + rest.split(".")[-1]] = t
      elif rest.startswith("post_layernorm."):
        out[vt + "norm." + rest.split(".")[-1]] = t
      else:
        layer, module, leaf = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest).groups()
        m = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if m:
          qkv.setdefault(f"{vt}blocks.{layer}.attn.qkv.{leaf}", {})[m[1]] = t
          continue
        names = {"self_attn.projection_layer": "attn.proj", "layer_norm1": "norm1",
                 "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        out[f"{vt}blocks.{layer}.{names[module]}.{leaf}"] = t
    elif key.startswith(("model.aligner.", "model.generation_aligner.")):
      prefix = "aligner." if key.startswith("model.aligner.") else "gen_aligner."
      layer = key.split(".")[2]
      index = 0 if layer == "fc1" else 2 * (int(key.split(".")[3]) + 1)
      out[f"{prefix}layers.{index}.{key.split('.')[-1]}"] = t
    elif key.startswith("model.generation_head."):
      out[key.replace("model.generation_head.proj_out.", "gen_head.output_mlp_projector.")
          .replace("model.generation_head.vision_head.", "gen_head.vision_head.")] = t
    elif key == "model.generation_embeddings.weight":
      out["gen_embed.weight"] = t
    elif key.startswith("model.vqmodel."):
      rest = key[len("model.vqmodel."):]
      rest = re.sub(r"^encoder\.down\.", "encoder.conv_blocks.", rest)
      rest = re.sub(r"^decoder\.up\.", "decoder.conv_blocks.", rest)
      rest = rest.replace(".block.", ".res.").replace(".mid.block_1.", ".mid.0.")
      rest = rest.replace(".mid.attn_1.", ".mid.1.").replace(".mid.block_2.", ".mid.2.")
      out["gen_vision_model." + rest] = t
    else:
      raise KeyError(key)
  for key, parts in qkv.items():
    out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
  w = state["model.vision_model.post_layernorm.weight"].shape[0]
  for name, shape in {"latent": (1, 1, w), "q.weight": (w, w), "kv.weight": (2 * w, w),
                      "proj.weight": (w, w), "norm.weight": (w,), "mlp.fc1.weight": (4 * w, w)}.items():
    out["vision_model.vision_tower.attn_pool." + name] = 0.2 * torch.randn(shape, generator=gen)
  out["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536)
  return out


def original_config(hf_config) -> dict:
  text, vis, vq = hf_config.text_config, hf_config.vision_config, hf_config.vq_config
  d = text.hidden_size
  return {
      "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality",
      "language_config": {"model_type": "llama", "vocab_size": text.vocab_size, "hidden_size": d,
                          "intermediate_size": text.intermediate_size,
                          "num_hidden_layers": text.num_hidden_layers,
                          "num_attention_heads": text.num_attention_heads,
                          "num_key_value_heads": text.num_key_value_heads,
                          "max_position_embeddings": text.max_position_embeddings,
                          "torch_dtype": "float32"},
      "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
          "image_size": vis.image_size, "model_name": "siglip_large_patch16_384",
          "select_feature": "same", "select_layer": -1,
          "arch": {"width": vis.hidden_size, "layers": vis.num_hidden_layers,
                   "heads": vis.num_attention_heads, "patch_size": vis.patch_size,
                   "mlp_ratio": vis.mlp_ratio}}},
      "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {
          "depth": vis.depth, "input_dim": vis.hidden_size, "n_embed": d, "projector_type": "mlp_gelu"}},
      "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
          "image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim,
          "arch": {"ch": vq.base_channels, "ch_mult": list(vq.channel_multiplier),
                   "num_res_blocks": vq.num_res_blocks, "z_channels": vq.latent_channels}}},
      "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {
          "depth": vq.num_hidden_layers, "input_dim": vq.embed_dim, "n_embed": d,
          "projector_type": "mlp_gelu"}},
      "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
          "image_token_embed": d, "image_token_size": vq.num_embeddings, "n_embed": d}},
  }


def write_original(directory: str, hf_model, layout: str = "safetensors") -> str:
  """layout: "safetensors" | "bin" | "bin_shards" (two .bin shards + index)."""
  os.makedirs(directory, exist_ok=True)
  state = hf_to_original(hf_model.state_dict())
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(original_config(hf_model.config), f)
  if layout == "safetensors":
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
  elif layout == "bin":
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
  else:
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
      torch.save({k: state[k] for k in ks}, os.path.join(directory, name))
      weight_map.update({k: name for k in ks})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  return directory


def write_hf(directory: str, hf_model) -> str:
  hf_model.save_pretrained(directory)
  return directory


def build_oracle(variant: str = "gqa", seed: int = 3):
  return oracle.build(variant, seed)
