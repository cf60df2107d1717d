"""A tiny random Janus for tests and smoke runs: every code path, a few hundred thousand params."""

import ml_collections

from janus_jax.models import presets


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model = presets.tiny()
  return config
