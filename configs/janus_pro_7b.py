"""Janus-Pro-7B (deepseek-ai/Janus-Pro-7B)."""

import ml_collections

from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model = presets.janus_7b()
  return config
