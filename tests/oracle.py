"""The PyTorch oracle: `transformers`' Janus built from tiny random configs (no downloads).

Every tensor is randomised (norm weights 1 + 0.1 N, everything else 0.2 N) so that a swapped or
untransposed tensor cannot pass.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import JanusConfig, JanusForConditionalGeneration

# Two variants: GQA + VQ (1, 2) with 2 res blocks; MHA + VQ (1, 1, 2) with 1 res block.
VARIANTS = {
    "gqa": dict(kv_heads=2, ch_mult=[1, 2], res_blocks=2),
    "mha": dict(kv_heads=4, ch_mult=[1, 1, 2], res_blocks=1),
}


def hf_config(variant: str) -> JanusConfig:
  v = VARIANTS[variant]
  text = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=v["kv_heads"],
              max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, pad_token_id=0)
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, mlp_ratio=4.0, projection_dim=64, depth=2, num_image_tokens=16)
  vq = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
            channel_multiplier=v["ch_mult"], num_res_blocks=v["res_blocks"], projection_dim=64,
            num_hidden_layers=2, image_token_embed_dim=64)
  return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=5,
                     tie_word_embeddings=False)


def randomise_(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = p.ndim == 1 and any(s in name for s in ("norm", "layernorm"))
      p.copy_(1 + 0.1 * noise if is_norm and name.endswith("weight") else 0.2 * noise)


def build(variant: str, seed: int = 0) -> JanusForConditionalGeneration:
  torch.manual_seed(seed)
  model = JanusForConditionalGeneration(hf_config(variant)).eval()
  model.config._attn_implementation = "eager"
  randomise_(model, seed)
  return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
