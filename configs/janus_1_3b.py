"""Janus-1.3B (deepseek-ai/Janus-1.3B): the same shapes as Janus-Pro-1B; its own chat roles.

Training uses the Janus-Pro stage table (the Janus v1 table in the reference facts is unverified).
"""

from janus_jax import recipes
from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = recipes.training_config(presets.janus_1b(), recipes.janus_pro_stages(stage3_steps=80_000))
  config.family = "janus"
  return config
