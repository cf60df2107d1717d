"""Janus-Pro-1B (deepseek-ai/Janus-Pro-1B)."""

import ml_collections

from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model = presets.janus_1b()
  return config
