"""Training recipes as data: the three Janus-Pro stages and the training defaults around them.

configs/*.py call `training_config(...)` and then override what their job needs; the stage table is
`config.stages.stage1..stage3`, each row naming its trainable parts, learning rate, warm-up, steps,
global batch size and mixture (understanding : text : text-to-image).
"""

from __future__ import annotations

import ml_collections

STAGE1_PARTS = ("understanding_aligner", "generation_aligner", "generation_embed", "image_head")
STAGE2_PARTS = STAGE1_PARTS + ("llm",)
STAGE3_PARTS = STAGE2_PARTS + ("understanding_encoder",)


def stage(trainable, learning_rate: float, warmup_steps: int, steps: int, batch_size: int,
          mixture) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      trainable=tuple(trainable), learning_rate=learning_rate, warmup_steps=warmup_steps,
      steps=steps, batch_size=batch_size, mixture=tuple(float(m) for m in mixture)))


def janus_pro_stages(stage3_steps: int) -> ml_collections.ConfigDict:
  """Janus-Pro, Table 2. Stage 2 was planned for 360K steps and stopped at 270K (the report);
  stage 3 ran 80K steps for 1B and 40K for 7B. Whether the generation embedding trains is not
  stated; it trains from stage 1 on here."""
  return ml_collections.ConfigDict(dict(
      stage1=stage(STAGE1_PARTS, 1e-3, 600, 20_000, 256, (1, 0, 3)),
      stage2=stage(STAGE2_PARTS, 1e-4, 5_000, 270_000, 512, (2, 3, 5)),
      stage3=stage(STAGE3_PARTS, 4e-5, 0, stage3_steps, 128, (5, 1, 4)),
  ))


def data_config(seq_len: int = 4096, image_size: int = 384, num_image_tokens: int = 576
                ) -> ml_collections.ConfigDict:
  """Sources are tfds datasets (array_record) named by the user; see janus_jax/data/pipeline.py."""

  def source(**features):
    return ml_collections.ConfigDict(dict(name="", split="train", data_dir="", features=features))

  return ml_collections.ConfigDict(dict(
      seq_len=seq_len, pack=True, max_images_per_row=2, image_size=image_size,
      gen_image_size=image_size, num_image_tokens_und=num_image_tokens,
      # Probability of replacing a caption with padding so the unconditional branch of CFG is
      # learnt. Not in the Janus / Janus-Pro reports; JanusFlow reports 10%, assumed here.
      cfg_drop=0.1,
      sources=ml_collections.ConfigDict(dict(
          understanding=source(image="image", question="question", answer="answer"),
          text=source(text="text"),
          generation=source(image="image", caption="caption")))))


def training_config(model: ml_collections.ConfigDict, stages: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model
  c.model.dtype = "bfloat16"        # compute
  c.model.param_dtype = "float32"   # master weights
  c.model.remat_policy = "full"
  c.stages = stages
  c.stage = 0                       # 0: every stage back to back; k: only stage k
  c.optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                                               clip_norm=1.0))
  c.data = data_config(image_size=model.vision.image_size,
                       num_image_tokens=(model.vision.image_size // model.vision.patch_size) ** 2)
  c.family = "janus_pro"            # chat template: "janus_pro" or "janus"
  c.tokenizer = ""                  # directory with tokenizer.json / *.model ("" = init_from's)
  c.init_from = ""                  # a converted checkpoint (params only) to start stage 1 from
  c.workdir = "runs/janus"
  c.mesh = (-1, 1, 1)               # (data, fsdp, tensor); -1 = the remaining devices
  c.seed = 0
  c.log_every = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.peak_flops_per_device = 0.0     # 0: look up the device kind (or measure, on CPU)
  c.distributed = False             # call jax.distributed.initialize() (multi-host)
  return c
