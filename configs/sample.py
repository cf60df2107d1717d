"""Defaults for sample.py; each field is also a flag (--config.cfg_weight=3 or --cfg=3)."""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.checkpoint = "runs/digits/model"  # what `python train.py` leaves behind
  c.dtype = ""                        # "" = as stored (16-bit PyTorch weights: bfloat16)
  # text-to-image
  c.num_images = 4                    # images per prompt
  c.cfg_weight = 5.0
  c.temperature = 1.0
  c.top_k = 0
  c.top_p = 1.0
  c.seed = 0
  c.out = "samples"
  # understanding
  c.max_new_tokens = 512              # the reference's limit; decoding stops at EOS
  c.answer_temperature = 0.0          # greedy, as the reference's inference.py
  c.answer_top_k = 0                  # 0 = off
  c.answer_top_p = 1.0                # 1 = off (the reference's web demo: temperature 0.1, 0.95)
  return c
