"""Model-size presets as ConfigDicts; configs/*.py compose them into job configs.

Sizes are the released ones (reference facts, section 2): SigLIP-L/16 at 384 px, LlamaGen VQ-16
and the DeepSeek-LLM 1.3B / 7B trunks. Missing Llama fields default as `LlamaConfig` does.
"""

from __future__ import annotations

import ml_collections


def llm(hidden_size: int, num_layers: int, num_heads: int, mlp_dim: int, *, num_kv_heads: int | None = None,
        vocab_size: int = 102400, head_dim: int | None = None, rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6, max_position_embeddings: int = 16384) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim or hidden_size // num_heads,
      mlp_dim=mlp_dim, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
      max_position_embeddings=max_position_embeddings))


def vision(image_size: int = 384, patch_size: int = 16, width: int = 1024, depth: int = 24,
           num_heads: int = 16, mlp_dim: int = 4096) -> ml_collections.ConfigDict:
  """SigLIP-L/16-384 by default, as `siglip_large_patch16_384` with select_layer=-1."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
      mlp_dim=mlp_dim, layer_norm_eps=1e-6))


def vq(codebook_size: int = 16384, codebook_dim: int = 8, z_channels: int = 256,
       base_channels: int = 128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
       grid_size: int = 24) -> ml_collections.ConfigDict:
  """VQ-16 by default. grid_size: image tokens per side that generation produces."""
  return ml_collections.ConfigDict(dict(
      codebook_size=codebook_size, codebook_dim=codebook_dim, z_channels=z_channels,
      base_channels=base_channels, channel_multipliers=tuple(channel_multipliers),
      num_res_blocks=num_res_blocks, grid_size=grid_size))


def janus(llm_config, vision_config=None, vq_config=None, *, aligner_depth: int = 2,
          generation_aligner_depth: int = 2, dtype: str = "float32", param_dtype: str = "float32",
          remat_policy: str = "none", scan_layers: bool = True,
          materialize_grad_transpose: bool = False) -> ml_collections.ConfigDict:
  """A full model config. The image head's hidden width equals the LLM width, as released.
  scan_layers False: the LLM's and the ViT's layers run as Python loops, not scans (faster steps
  for small models on CPUs; compile time grows with depth). materialize_grad_transpose: every
  trained Dense layer (LLM, ViT, aligners, image head) computes its weight gradient as x^T @ g
  from a materialised x^T (faster on XLA:CPU; `matmul.materialized_transpose_dot`)."""
  return ml_collections.ConfigDict(dict(
      llm=llm_config, vision=vision_config or vision(), vq=vq_config or vq(),
      aligner_depth=aligner_depth, generation_aligner_depth=generation_aligner_depth,
      image_head_dim=llm_config.hidden_size, dtype=dtype, param_dtype=param_dtype,
      remat_policy=remat_policy, scan_layers=scan_layers,
      materialize_grad_transpose=materialize_grad_transpose))


def janus_1b() -> ml_collections.ConfigDict:
  """Janus-1.3B and Janus-Pro-1B: DeepSeek-LLM 1.3B (2048 wide, 24 layers, MHA)."""
  return janus(llm(2048, 24, 16, 5632))


def janus_7b() -> ml_collections.ConfigDict:
  """Janus-Pro-7B: DeepSeek-LLM 7B (4096 wide, 30 layers, MHA)."""
  return janus(llm(4096, 30, 32, 11008))


def tiny() -> ml_collections.ConfigDict:
  """A few hundred thousand parameters that still exercise every path (GQA, nin shortcuts, ...)."""
  return janus(
      llm(64, 2, 4, 128, num_kv_heads=2, vocab_size=256, max_position_embeddings=512),
      vision(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=128),
      vq(codebook_size=64, codebook_dim=8, z_channels=32, base_channels=32,
         channel_multipliers=(1, 2), num_res_blocks=2, grid_size=4))
