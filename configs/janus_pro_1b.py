"""Janus-Pro-1B (deepseek-ai/Janus-Pro-1B): the model, and the Janus-Pro three-stage recipe.

  python train.py --config=configs/janus_pro_1b.py --config.stage=3 \
      --config.init_from=/path/to/converted/Janus-Pro-1B \
      --config.data.sources.understanding.name=my_chat_dataset ...
"""

from janus_jax import recipes
from janus_jax.models import presets


def get_config(arg=None):
  del arg
  return recipes.training_config(presets.janus_1b(), recipes.janus_pro_stages(stage3_steps=80_000))
