"""A tiny random Janus for tests and smoke runs: every code path, about a million parameters."""

import ml_collections

from janus_jax import recipes
from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = recipes.training_config(presets.tiny(), tiny_stages())
  config.model.dtype = "float32"
  config.model.remat_policy = "none"
  config.data.seq_len = 48
  config.data.max_images_per_row = 1
  config.checkpoint_every = 2
  config.log_every = 1
  config.workdir = "runs/tiny"
  config.mesh = (-1, 1, 1)
  return config


def tiny_stages():
  s = recipes.stage
  return ml_collections.ConfigDict(dict(
      stage1=s(recipes.STAGE1_PARTS, 1e-2, 2, 6, 8, (1, 0, 3)),
      stage2=s(recipes.STAGE2_PARTS, 3e-3, 2, 6, 8, (2, 3, 5)),
      stage3=s(recipes.STAGE3_PARTS, 5e-3, 0, 6, 8, (5, 1, 4))))
