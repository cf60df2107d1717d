"""Janus-1.3B (deepseek-ai/Janus-1.3B): the same shapes as Janus-Pro-1B."""

import ml_collections

from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model = presets.janus_1b()
  return config
