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
          mixture, cooldown_steps: int = 0,
          learning_rate_scales: dict[str, float] | None = None,
          loss_weights=(1.0, 1.0, 1.0), image_label_smoothing: float = 0.0
          ) -> ml_collections.ConfigDict:
  """One row of the stage table; cooldown_steps > 0 decays the learning rate linearly to zero
  over the stage's last steps (training.learning_rate_schedule); learning_rate_scales
  {part: s} trains those parts at s times the stage's rate (training.make_optimizer);
  loss_weights (understanding, text, generation) weights each task's tokens in the loss
  (training.loss_and_metrics); image_label_smoothing eps trains the image head against
  (1 - eps) one-hot + eps uniform targets (MaskGIT's 0.1), which bounds how unlikely any image
  token can become and so how far classifier-free guidance can lift one."""
  return ml_collections.ConfigDict(dict(
      trainable=tuple(trainable), learning_rate=learning_rate, warmup_steps=warmup_steps,
      steps=steps, batch_size=batch_size, mixture=tuple(float(m) for m in mixture),
      cooldown_steps=cooldown_steps,
      # Every trainable part listed (1.0: unscaled), so that a flag can set any of them:
      # --config.stages.stage2.learning_rate_scales.llm=0.5
      learning_rate_scales=ml_collections.ConfigDict(
          {**{part: 1.0 for part in trainable}, **dict(learning_rate_scales or {})}),
      loss_weights=tuple(float(w) for w in loss_weights),
      image_label_smoothing=float(image_label_smoothing)))


def janus_pro_stages(stage3_steps: int) -> ml_collections.ConfigDict:
  """Janus-Pro, Table 2. Stage 2 was planned for 360K steps and stopped at 270K (the report);
  stage 3 ran 80K steps for 1B and 40K for 7B. Whether the generation embedding trains is not
  stated; it trains from stage 1 on here."""
  return ml_collections.ConfigDict(dict(
      stage1=stage(STAGE1_PARTS, 1e-3, 600, 20_000, 256, (1, 0, 3)),
      stage2=stage(STAGE2_PARTS, 1e-4, 5_000, 270_000, 512, (2, 3, 5)),
      stage3=stage(STAGE3_PARTS, 4e-5, 0, stage3_steps, 128, (5, 1, 4)),
  ))


def data_config(model: ml_collections.ConfigDict, seq_len: int = 4096) -> ml_collections.ConfigDict:
  """The data block (fields: janus_jax/data/pipeline.py). Sources are tfds datasets named by the
  user: --config.data.sources.generation.name=my_t2i_dataset --config.data.sources.generation.data_dir=..."""
  from janus_jax.data import pipeline

  c = pipeline.default_config()
  c.seq_len = seq_len
  c.image_size = model.vision.image_size
  c.num_image_tokens_und = (model.vision.image_size // model.vision.patch_size) ** 2
  c.num_image_tokens_gen = model.vq.grid_size**2
  c.image_codebook_size = model.vq.codebook_size
  c.gen_image_size = model.vq.grid_size * 2 ** (len(model.vq.channel_multipliers) - 1)
  c.max_images_per_row = 2
  # Probability of replacing a caption with padding so that CFG's unconditional branch is learnt.
  # Not stated in the Janus / Janus-Pro reports; JanusFlow reports 10%: an assumption.
  c.cfg_drop = 0.1
  c.sources = ml_collections.ConfigDict({
      task: pipeline.source_config("") for task in ("understanding", "text", "generation")})
  return c


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
  c.data = data_config(model)
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
  c.coordinator_address = ""        # "" = auto-detect (TPU pods, SLURM, Open MPI, ...)
  c.num_processes = 0
  c.process_id = -1
  c.compilation_cache_dir = ""      # a persistent XLA compilation cache ("" = off)
  c.compiler_options = ml_collections.ConfigDict()  # XLA options for every training compile (stage 0 too)
  return c
