"""A tiny end-to-end training config over the data tests' datasets (tests/data_fixtures.py).

  python train.py --config=tests/train_e2e_config.py:ROOT   (ROOT holds data/ and tok/ from
  data_fixtures.build_all / make_tokenizer)
"""

import os

import ml_collections

from janus_jax import recipes
from janus_jax.data import pipeline
from janus_jax.models import presets


def get_config(root: str = "") -> ml_collections.ConfigDict:
  model = presets.janus(
      presets.llm(32, 2, 2, 64, vocab_size=512, max_position_embeddings=256),
      presets.vision(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
      presets.vq(codebook_size=64, codebook_dim=8, z_channels=32, base_channels=32,
                 channel_multipliers=(1, 1, 1, 1), num_res_blocks=1, grid_size=2))
  s = recipes.stage
  stages = ml_collections.ConfigDict(dict(
      stage1=s(recipes.STAGE1_PARTS, 1e-2, 0, 4, 4, (1, 0, 3)),
      # (weighted understanding tokens: train.py's loss_weights path runs in every e2e test)
      stage2=s(recipes.STAGE2_PARTS, 3e-3, 1, 6, 4, (2, 3, 5), loss_weights=(2, 1, 1))))
  c = recipes.training_config(model, stages)
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.data.update(dict(seq_len=96, system_prompt="", max_images_per_row=2, image_size=16, gen_image_size=16,
                     num_image_tokens_und=4, num_image_tokens_gen=4, vq_batch=4, read_threads=0))
  data_dir = os.path.join(root, "data")
  c.data.sources.understanding = pipeline.source_config("chat_conversations/t", data_dir=data_dir)
  c.data.sources.text = pipeline.source_config("text_files/t", data_dir=data_dir)
  c.data.sources.generation = pipeline.source_config("image_captions/t", data_dir=data_dir)
  c.tokenizer = os.path.join(root, "tok")
  c.workdir = os.path.join(root, "run")
  c.mesh = (2, 1, 1)
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.log_every = 1
  return c
