"""Janus-Pro-7B (deepseek-ai/Janus-Pro-7B): the model, and the Janus-Pro three-stage recipe."""

from janus_jax import recipes
from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = recipes.training_config(presets.janus_7b(), recipes.janus_pro_stages(stage3_steps=40_000))
  config.mesh = (-1, 8, 1)  # FSDP over 8 devices keeps the 7B state within an 80 GB GPU
  return config
